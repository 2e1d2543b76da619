"""Datasets in torchvision's on-disk formats, written tiny by the tests themselves; transforms; unreadable images."""
import io
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cvt.data import (EXPECTED_FILES, Digits, SafeImages, UnreadableImageError, build_datasets, build_eval_dataset,
                      check_root, collate_skipping, eval_crop)
from cvt.engine import load_config
from cvt.model import ZOO

IMAGENET_CFG = ZOO["cvt_13_224"][1]


def image(label: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """An RGB image whose colour says its class (learnable), with noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(37 * label) % 256, (91 * label) % 256, (151 * label) % 256], dtype=np.float64)
    return np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def write_cifar(root, num_classes: int = 10, per_class: int = 3, test_per_class: int = 1):
    """cifar-10-batches-py/ or cifar-100-python/ as the extracted archives hold them."""
    folder, label_key, meta_name, names_key = (
        ("cifar-10-batches-py", "labels", "batches.meta", "label_names") if num_classes == 10
        else ("cifar-100-python", "fine_labels", "meta", "fine_label_names"))
    base = root / folder
    base.mkdir(parents=True)

    def batch(labels, seed):
        data = np.stack([image(c, seed=seed + i).transpose(2, 0, 1).reshape(-1) for i, c in enumerate(labels)])
        return {"data": data, label_key: list(labels)}

    train_labels = [c for c in range(num_classes) for _ in range(per_class)]
    test_labels = [c for c in range(num_classes) for _ in range(test_per_class)]
    if num_classes == 10:
        for i in range(5):  # the training set split over five batches
            with open(base / f"data_batch_{i + 1}", "wb") as f:
                pickle.dump(batch(train_labels[i::5], seed=100 * i), f)
        files = {"test_batch": batch(test_labels, seed=999)}
    else:
        files = {"train": batch(train_labels, seed=0), "test": batch(test_labels, seed=999)}
    files[meta_name] = {names_key: [f"class_{c}" for c in range(num_classes)]}
    for name, obj in files.items():
        with open(base / name, "wb") as f:
            pickle.dump(obj, f)
    return root


def write_imagefolder(root, classes=("cat", "dog", "fish"), per_class: int = 4):
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(image(c, seed=i)).save(root / split / name / f"{i}.png")
    return root


def write_pets(root):
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    breeds = [("Abyssinian", 2), ("american_bulldog", 1), ("Bengal", 2)]  # (breed, species: 1 cat 2 dog)
    for split, ids in (("trainval", (1, 2)), ("test", (3,))):
        lines = []
        for label, (breed, species) in enumerate(breeds, 1):
            for i in ids:
                Image.fromarray(image(label, seed=i)).save(base / "images" / f"{breed}_{i}.jpg")
                lines.append(f"{breed}_{i} {label} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_flowers(root, num_classes: int = 3):
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels = [c + 1 for c in range(num_classes) for _ in range(3)]  # 1-based, three images per class
    for image_id, label in enumerate(labels, 1):
        Image.fromarray(image(label, seed=image_id)).save(base / "jpg" / f"image_{image_id:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[0::3], "valid": ids[1::3], "tstid": ids[2::3]})
    return root


def data_config(dataset, root, *extra):
    return load_config(None, [f"data.dataset={dataset}", f"data.root={root}", "data.img_size=32", *extra])["data"]


@pytest.mark.parametrize("dataset, writer, n_train, n_val, classes", [
    ("cifar10", lambda r: write_cifar(r, 10), 30, 10, [f"class_{c}" for c in range(10)]),
    ("cifar100", lambda r: write_cifar(r, 100, per_class=1), 100, 100, [f"class_{c}" for c in range(100)]),
    ("imagefolder", write_imagefolder, 12, 6, ["cat", "dog", "fish"]),
    ("pets", write_pets, 6, 3, ["Abyssinian", "American Bulldog", "Bengal"]),
    ("flowers102", write_flowers, 6, 3, None),
])
def test_each_format_reads_from_a_local_root(tmp_path, dataset, writer, n_train, n_val, classes):
    writer(tmp_path)
    train_set, val_set, class_names = build_datasets(data_config(dataset, tmp_path), IMAGENET_CFG)
    assert (len(train_set), len(val_set)) == (n_train, n_val)
    if classes is not None:
        assert class_names == classes
    else:  # Flowers-102: torchvision's 102 names, whatever the labels present
        assert len(class_names) == 102 and class_names[0] == "pink primrose"
    x, y = train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    labels = sorted({val_set[i][1] for i in range(len(val_set))})
    assert labels == sorted(set(labels)) and all(0 <= c < len(class_names) for c in labels)
    images, targets, skipped = collate_skipping([train_set[i] for i in range(2)])
    assert images.shape == (2, 3, 32, 32) and targets.shape == (2,) and skipped == 0


def test_cifar_labels_and_pixels_survive_the_round_trip(tmp_path):
    write_cifar(tmp_path, 10)
    cfg = data_config("cifar10", tmp_path)
    from cvt.data import load_split

    raw, _ = load_split(cfg, train=False, transform=None)
    assert [raw[i][1] for i in range(10)] == list(range(10))
    assert np.array_equal(np.asarray(raw[3][0]), image(3, seed=999 + 3))


@pytest.mark.parametrize("dataset", sorted(EXPECTED_FILES))
def test_a_missing_root_names_every_expected_file(tmp_path, dataset):
    with pytest.raises(FileNotFoundError) as err:
        check_root(dataset, tmp_path)
    message = str(err.value)
    for f in EXPECTED_FILES[dataset]:
        assert str(tmp_path / f) in message
    assert "nothing is downloaded" in message


def test_a_partly_missing_root_names_what_lacks(tmp_path):
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks cifar-10-batches-py/data_batch_3:"):
        build_datasets(data_config("cifar10", tmp_path), IMAGENET_CFG)


def test_no_root_and_unknown_dataset_are_clear_errors():
    with pytest.raises(ValueError, match="needs data.root"):
        check_root("pets", None)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*cifar10"):
        check_root("cifar", "/tmp")


def test_digits_split_is_stratified_and_independent_of_the_seed():
    train, val = Digits(True), Digits(False)
    assert (len(train), len(val)) == (1437, 360)
    counts = np.bincount(val.targets)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class's ~180
    torch.manual_seed(123)
    np.random.seed(123)
    assert Digits(False).targets == val.targets
    image_, label = val[0]
    assert image_.size == (8, 8) and image_.mode == "RGB" and 0 <= label <= 9
    # Train and held-out images are different images: no sample is in both.
    train_keys = {im.tobytes() for im in train.images}
    assert sum(im.tobytes() in train_keys for im in val.images) < 5  # a few digits are pixel-identical


def test_eval_crop_follows_the_paper_unless_the_config_says_otherwise():
    data = load_config(None, ["data.eval_crop_pct=null", "data.eval_crop_mode=null"])["data"]
    assert eval_crop(data, ZOO["cvt_13_224"][1]) == (0.875, "center")
    assert eval_crop(data, ZOO["cvt_13_384"][1]) == (1.0, "squash")
    assert eval_crop(load_config(None)["data"], ZOO["cvt_13_224"][1]) == (1.0, "squash")


def write_corrupt_imagefolder(root):
    write_imagefolder(root)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    return bad


def test_an_unreadable_image_is_an_error_naming_it(tmp_path):
    bad = write_corrupt_imagefolder(tmp_path)
    train_set, _, _ = build_datasets(data_config("imagefolder", tmp_path), IMAGENET_CFG)
    index = train_set.dataset.samples.index((str(bad), 1))
    with pytest.raises(UnreadableImageError, match=f"unreadable image {bad}.*data.bad_images=skip"):
        train_set[index]


def test_skipped_images_are_dropped_and_counted(tmp_path):
    bad = write_corrupt_imagefolder(tmp_path)
    train_set, _, _ = build_datasets(data_config("imagefolder", tmp_path, "data.bad_images=skip"), IMAGENET_CFG)
    index = train_set.dataset.samples.index((str(bad), 1))
    assert train_set[index] is None
    images, targets, skipped = collate_skipping([train_set[i] for i in (0, index, 1)])
    assert images.shape[0] == 2 and skipped == 1
    with pytest.raises(UnreadableImageError, match="all 1 images of a batch"):
        collate_skipping([None])
    with pytest.raises(ValueError, match=r"data.bad_images must be one of \('error', 'skip'\)"):
        SafeImages(train_set.dataset, "ignore", "training")


def test_the_papers_randaugment_survives_its_top_magnitude():
    """'rand-m9-mstd0.5-inc1' draws magnitudes up to 10, where timm posterizes to 0 bits: Pillow must accept it
    (pyproject keeps Pillow below 13, which refuses), or training stops mid-epoch."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    assert posterize(Image.new("RGB", (8, 8), (200, 100, 50)), 0).getpixel((0, 0)) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Held-out splits, evaluation folders, repeated augmentation

def test_the_held_out_split_is_stratified_fixed_and_disjoint():
    from cvt.data import held_out_split

    labels = np.repeat(np.arange(5), [4, 6, 8, 10, 12])
    train_idx, val_idx = held_out_split(labels, 0.25)
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(labels)
    assert set(labels[train_idx]) == set(labels[val_idx]) == set(range(5))
    np.random.seed(7)
    torch.manual_seed(7)
    again = held_out_split(labels, 0.25)
    assert np.array_equal(again[1], val_idx)  # whatever the run's seed
    with pytest.raises(ValueError, match="smallest class, 0, has 1"):
        held_out_split([0, 1, 1, 1], 0.5)
    with pytest.raises(ValueError, match="data.val_fraction must be between 0 and 1"):
        held_out_split(labels, 1.5)


def test_an_image_folder_without_val_holds_out_val_fraction_of_train(tmp_path):
    write_imagefolder(tmp_path, per_class=4)
    shutil.rmtree(tmp_path / "val")
    train_set, val_set, names = build_datasets(data_config("imagefolder", tmp_path, "data.val_fraction=0.25"),
                                               IMAGENET_CFG)
    assert (len(train_set), len(val_set), names) == (9, 3, ["cat", "dog", "fish"])
    train_files = {train_set.dataset.dataset.samples[i][0] for i in train_set.dataset.indices}
    val_files = {val_set.dataset.dataset.samples[i][0] for i in val_set.dataset.indices}
    assert not train_files & val_files
    assert sorted(val_set[i][1] for i in range(3)) == [0, 1, 2]  # one of each class
    assert val_set[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("layout", ["val only", "class folders only", "train only"])
def test_evaluation_needs_no_train_folder(tmp_path, layout):
    write_imagefolder(tmp_path, per_class=4)
    if layout == "val only":
        shutil.rmtree(tmp_path / "train")
        expected = 6
    elif layout == "class folders only":
        shutil.rmtree(tmp_path / "train")
        for folder in (tmp_path / "val").iterdir():
            folder.rename(tmp_path / folder.name)
        (tmp_path / "val").rmdir()
        expected = 6
    else:  # the held-out share of train/, as training holds it out
        shutil.rmtree(tmp_path / "val")
        expected = 3
    val_set, names = build_eval_dataset(data_config("imagefolder", tmp_path, "data.val_fraction=0.25"),
                                        IMAGENET_CFG)
    assert (len(val_set), names) == (expected, ["cat", "dog", "fish"])


def test_cvt_eval_runs_on_a_validation_folder_alone(tmp_path, capsys):
    import json

    from cvt.cli import main
    from cvt.model import CvT
    from helpers import TINY

    write_imagefolder(tmp_path / "data", per_class=1)
    shutil.rmtree(tmp_path / "data" / "train")
    CvT(num_classes=3, img_size=32, **TINY).save_pretrained(str(tmp_path / "weights"))
    main(["eval", "--checkpoint", str(tmp_path / "weights"), "--data", "imagefolder", "--root",
          str(tmp_path / "data"), "--img-size", "32", "--json"])
    assert json.loads(capsys.readouterr().out)["images"] == 6


def test_repeated_augmentation_gives_each_copy_its_own_augmentation():
    from cvt.data import Copies, NumberedCopies, train_sampler
    from cvt.engine import EpochSamples

    dataset = list(range(12))
    per_rank = []
    for rank in (0, 1):
        sampler, sampled = train_sampler(dataset, 3, rank, 2, seed=0)
        assert isinstance(sampler, NumberedCopies) and isinstance(sampled, Copies)
        sampler.set_epoch(1)
        per_rank.append(list(sampler))
    numbers = per_rank[0] + per_rank[1]
    assert len(numbers) == len(set(numbers)) == 12  # timm's epoch: about one pass, every copy numbered apart
    images = [n % 12 for n in numbers]
    assert all(images.count(i) == 3 for i in set(images))  # each image three times
    assert all({n % 12 for n in ranks} & {n % 12 for n in per_rank[1 - r]} for r, ranks in enumerate(per_rank))
    # The copies of an image are augmented under different seeds by the engine's per-sample seeding.
    augmented = EpochSamples(Copies([0] * 12), seed=0)
    with_noise = EpochSamples(Copies(RandomDraws(12)), seed=0)
    draws = [float(with_noise[n]) for n in numbers if n % 12 == images[0]]
    assert len(set(draws)) == 3 and augmented[numbers[0]] == 0
    with pytest.raises(ValueError, match="data.repeated_aug is the number of augmented copies"):
        train_sampler(dataset, -1, 0, 1, seed=0)


class RandomDraws(torch.utils.data.Dataset):
    """A draw from torch's generator per sample: which seed the sample was read under."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(())


def test_the_engine_trains_with_repeated_augmentation():
    from cvt.engine import Processes, build_data, training_config

    cfg = training_config(load_config(None, ["data.repeated_aug=3"]))
    data = build_data(cfg, Processes(0, 1, torch.device("cpu"), False))
    assert data.steps_per_epoch == 1280 // 64  # RepeatAugSampler's epoch: 1,437 images cut to whole 256s
    data.start_epoch(0, skip=19)
    [(images, targets, skipped)] = list(data.train_loader)
    assert images.shape == (64, 3, 32, 32) and skipped == 0


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets

def png_bytes(label: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image(label, size=8, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache (where parquet files are converted to Arrow) inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def hf_rows(labels, broken: int | None = None):
    import datasets

    images = [{"bytes": b"not a PNG" if i == broken else png_bytes(c, seed=i), "path": None}
              for i, c in enumerate(labels)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": images, "label": list(labels)}, features=features)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_hugging_face_dataset_reads_its_train_and_validation_splits(tmp_path, hf_cache, layout):
    import datasets

    train, val = hf_rows([0, 1, 2] * 3), hf_rows([2, 1, 0])
    if layout == "save_to_disk":
        datasets.DatasetDict(train=train, validation=val).save_to_disk(str(tmp_path / "set"))
    else:
        train.to_parquet(str(tmp_path / "set" / "data" / "train-00000-of-00001.parquet"))
        val.to_parquet(str(tmp_path / "set" / "data" / "validation-00000-of-00001.parquet"))
    train_set, val_set, names = build_datasets(data_config("hfds", tmp_path / "set"), IMAGENET_CFG)
    assert (len(train_set), len(val_set), names) == (9, 3, ["a", "b", "c"])
    x, y = val_set[0]
    assert x.shape == (3, 32, 32) and y == 2


def test_a_hugging_face_dataset_without_validation_holds_out_and_skips_bad_images(tmp_path, hf_cache):
    hf_rows([0, 1, 2] * 4, broken=5).save_to_disk(str(tmp_path / "set"))
    cfg = data_config("hfds", tmp_path / "set", "data.val_fraction=0.25", "data.bad_images=skip")
    train_set, val_set, names = build_datasets(cfg, IMAGENET_CFG)
    assert (len(train_set), len(val_set)) == (9, 3)
    held_out = val_set.dataset  # SafeImages of a Part of the rows
    assert sorted(held_out.dataset.targets[i] for i in held_out.indices) == [0, 1, 2]
    samples = [train_set[i] for i in range(9)] + [val_set[i] for i in range(3)]
    assert sum(s is None for s in samples) == 1  # row 5, on whichever side it fell
    with pytest.raises(UnreadableImageError, match=r"row 5 of .*set \(split train\).*data.bad_images=skip"):
        [s for ds in build_datasets(data_config("hfds", tmp_path / "set", "data.val_fraction=0.25"),
                                    IMAGENET_CFG)[:2] for s in (ds[i] for i in range(len(ds)))]


def test_a_parquet_file_with_other_columns_names_the_file_and_the_keys(tmp_path, hf_cache):
    hf_rows([0, 1, 2] * 2).rename_column("label", "fine_label").to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(ValueError, match=r"train.parquet has columns \['image', 'fine_label'\], not \['image', "
                                         r"'label'\] \(data.image_column, data.label_column\)"):
        build_datasets(data_config("hfds", tmp_path), IMAGENET_CFG)
    train_set, _, _ = build_datasets(data_config("hfds", tmp_path, "data.label_column=fine_label",
                                                 "data.val_fraction=0.5"), IMAGENET_CFG)
    assert len(train_set) == 3
    (tmp_path / "train.parquet").write_bytes(b"PAR1 but truncated")
    with pytest.raises(ValueError, match="train.parquet is not a readable parquet file"):
        build_datasets(data_config("hfds", tmp_path), IMAGENET_CFG)


# ---------------------------------------------------------------------------------------------------------------
# Hostile images and pickles

@pytest.mark.parametrize("limit", [20, 40])  # 8 x 8 = 64 pixels: over twice the limit (an error), over it (a warning)
def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch, limit):
    from cvt.data import read_image

    Image.fromarray(image(0, size=8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UnreadableImageError, match=r"bomb.png: a possible decompression bomb .*MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "bomb.png")


def test_a_decompression_bomb_in_a_training_folder_is_skipped_and_counted(tmp_path, monkeypatch):
    write_imagefolder(tmp_path)
    Image.fromarray(image(1, size=64)).save(tmp_path / "train" / "dog" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 32 x 32 images pass, 64 x 64 is over twice it
    train_set, _, _ = build_datasets(data_config("imagefolder", tmp_path, "data.bad_images=skip"), IMAGENET_CFG)
    index = train_set.dataset.samples.index((str(tmp_path / "train" / "dog" / "huge.png"), 1))
    assert collate_skipping([train_set[i] for i in (0, index)])[2] == 1


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    from cvt.data import read_image

    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65,520
    Image.fromarray(ramp).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    pixels = np.asarray(read_image(tmp_path / "16bit.png"))
    assert pixels.shape == (8, 8, 3) and np.abs(pixels[..., 0] - ramp / 257).max() <= 0.5
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tif")
    assert np.asarray(read_image(tmp_path / "float.tif", "L")).max() == 255
    Image.fromarray((np.arange(64, dtype=np.int32) * 10**6).reshape(8, 8)).save(tmp_path / "int32.tif")
    assert np.asarray(read_image(tmp_path / "int32.tif", "L"))[0, :2].tolist() == [0, 4]  # its own range


def test_attention_pictures_read_images_the_same_way(tmp_path):
    from cvt.inspect import load_image
    from cvt.model import CvT
    from helpers import TINY

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "16bit.png")
    picture, _ = load_image(tmp_path / "16bit.png", CvT(img_size=32, **TINY))
    assert np.asarray(picture).max() < 200  # 30000 / 257, where convert("RGB") made it 255


def test_only_read_image_opens_image_files():
    """Every image cvt reads goes through cvt.data.read_image, which bounds and scales it."""
    from pathlib import Path

    import cvt

    opened = [f"{path.name}:{n}" for path in Path(cvt.__file__).parent.glob("*.py")
              for n, line in enumerate(path.read_text().splitlines(), 1) if "Image.open(" in line]
    assert len(opened) == 1 and opened[0].startswith("data.py:")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    from cvt.data import UnsafePickleError

    write_cifar(tmp_path, 10)
    marker = tmp_path / "code_ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(marker), "labels": [0]}, f)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle .*data_batch_1: it holds posix.system"):
        build_datasets(data_config("cifar10", tmp_path), IMAGENET_CFG)
    assert not marker.exists()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_random_and_damaged_bytes_are_an_unreadable_image_or_a_picture(tmp_path, image_format):
    """The image reader, fuzzed: truncations, flipped bytes and noise give an UnreadableImageError naming the
    file (or, where the damage still decodes, an RGB picture), never another error."""
    from cvt.data import UnreadableImageError, read_image

    buffer = io.BytesIO()
    Image.fromarray(image(3, size=24)).save(buffer, format=image_format)
    valid = buffer.getvalue()
    rng = np.random.default_rng(0)
    damaged = [valid[:n] for n in (0, 1, 8, len(valid) // 3, len(valid) // 2, len(valid) - 1)]
    for _ in range(12):
        flipped = bytearray(valid)
        for i in rng.integers(0, len(valid), size=4):
            flipped[i] ^= int(rng.integers(1, 256))
        damaged.append(bytes(flipped))
    damaged += [bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in (16, 700)]
    for i, data in enumerate(damaged):
        path = tmp_path / f"damaged_{i}.{image_format.lower()}"
        path.write_bytes(data)
        try:
            picture = read_image(path)
        except UnreadableImageError as e:
            assert str(path) in str(e)
        else:
            assert picture.mode == "RGB"  # a flipped header byte may change its size
