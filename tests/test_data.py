"""Datasets in torchvision's on-disk formats, written tiny by the tests themselves; transforms; unreadable images."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cvt.data import (EXPECTED_FILES, Digits, SafeImages, UnreadableImageError, build_datasets, check_root,
                      collate_skipping, eval_crop)
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
