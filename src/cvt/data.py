"""Datasets and transforms for training and evaluation.

Every dataset is read from a local root in its own on-disk format; nothing is downloaded. A missing or wrong root is
an error that lists the files expected where. Training images go through timm's augmentation pipeline, evaluation
images through the paper's eval transform (the model's `crop_pct` / `crop_mode`).

    train_set, val_set, class_names = build_datasets(config["data"], model.pretrained_cfg)

Every image file is opened by `read_image`: decompression bombs and undecodable files are an `UnreadableImageError`
(which `data.bad_images=skip` turns into a skipped, counted sample), and 16-bit or float pixels are scaled to 8 bits.
A set without a held-out split takes `data.val_fraction` of its training images out, by `held_out_split`.

The folder formats, CIFAR, Pets, Flowers and `hfds` (a Hugging Face `datasets` folder or parquet files, read with
random access) are map-style: the engine's sampler splits them across ranks and the DataLoader across workers. `wds`
(WebDataset tar shards, cvt.shards) is a stream that splits itself across ranks and workers.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, Sampler
from torchvision import datasets as tvd

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "pets", "flowers102", "wds", "hfds")
BAD_IMAGES = ("error", "skip")  # data.bad_images: stop at an unreadable image, or leave it out and count it
# The seed of every held-out split: fixed, so that runs of different seeds (an ablation's) share one held-out set.
SPLIT_SEED = 0

# Files (relative to the root) each format needs, as its reader expects them: a trailing "/" is a folder. hfds has
# three layouts (hf_tables says which); imagefolder's val/ is optional (data.val_fraction holds out of train/).
EXPECTED_FILES = {
    "imagefolder": ["train/"],
    "cifar10": [f"cifar-10-batches-py/{f}" for f in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]],
    "cifar100": [f"cifar-100-python/{f}" for f in ("train", "test", "meta")],
    "pets": [f"oxford-iiit-pet/{f}" for f in ("images/", "annotations/trainval.txt", "annotations/test.txt")],
    "flowers102": [f"flowers-102/{f}" for f in ("jpg/", "imagelabels.mat", "setid.mat")],
    "wds": ["index.json"],
}
LAYOUT_HINTS = {
    "imagefolder": "ImageNet-style folders: ROOT/train/<class>/*.jpg, and ROOT/val/<class>/*.jpg or "
                   "data.val_fraction of train/ held out",
    "cifar10": "the extracted cifar-10-python.tar.gz",
    "cifar100": "the extracted cifar-100-python.tar.gz",
    "pets": "the extracted images.tar.gz and annotations.tar.gz of Oxford-IIIT Pets",
    "flowers102": "102flowers.tgz extracted to jpg/, with imagelabels.mat and setid.mat beside it",
    "wds": "WebDataset tar shards and their index.json, as `cvt shards` writes them",
    "hfds": "a Hugging Face datasets folder written by save_to_disk (a Dataset or a DatasetDict), or parquet "
            "files (train*.parquet and validation*/val*/test*.parquet, by file or folder name)",
}


def check_root(dataset: str, root: str | os.PathLike | None, expected: list[str] | None = None) -> Path:
    """The dataset's root, or an error naming every expected file that is missing (`expected`, by default the
    format's EXPECTED_FILES; where there are none, the root must be a folder)."""
    if dataset not in LAYOUT_HINTS:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs data.root (a local folder holding "
                         f"{LAYOUT_HINTS[dataset]}); nothing is downloaded")
    root = Path(root).expanduser()
    expected = EXPECTED_FILES.get(dataset, []) if expected is None else expected
    if not expected and not root.is_dir():
        raise FileNotFoundError(f"{dataset} root {str(root)!r} is not a folder: expected one holding "
                                f"{LAYOUT_HINTS[dataset]}; nothing is downloaded")
    present = lambda f: (root / f).is_dir() if f.endswith("/") else (root / f).is_file()  # noqa: E731
    missing = [f for f in expected if not present(f)]
    if missing:
        raise FileNotFoundError(
            f"{dataset} root {str(root)!r} lacks {', '.join(missing)}: expected "
            f"{', '.join(str(root / f) for f in expected)} ({LAYOUT_HINTS[dataset]}); nothing is downloaded")
    return root


# ---------------------------------------------------------------------------------------------------------------
# Reading images and pickles

class UnreadableImageError(ValueError):
    """An image that cannot be decoded: missing, truncated, not an image, or a decompression bomb."""


# Greyscale modes of more than 8 bits (16-bit PNG and TIFF, 32-bit integer and float), which convert("RGB") clips.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_image(source: str | os.PathLike | bytes, mode: str = "RGB", name: str | None = None) -> Image.Image:
    """An image file (a path, or its bytes with `name` saying where they came from) decoded in full and converted
    to `mode`. Every image cvt reads goes through here. Any failure is an UnreadableImageError naming the file,
    including a decompression bomb: an image over Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`), at its warning
    level too, since decoding one would take gigabytes."""
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                return to_8_bit(image).convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImageError(f"unreadable image {name}: a possible decompression bomb ({e}); if the image "
                                   "is genuine, raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for missing, truncated or undecodable data
        raise UnreadableImageError(f"unreadable image {name}: {e}") from None


def to_8_bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image scaled to 8-bit "L" (other modes as they are): its type's range maps onto
    0..255 (0..65535 for 16-bit and integer pixels, 0..1 for float ones), or, for values outside that range, the
    image's own minimum..maximum."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = 0.0, (1.0 if image.mode == "F" else 65535.0)
    if pixels.min() < low or pixels.max() > high:
        low, high = pixels.min(), max(pixels.max(), pixels.min() + 1e-12)
    return Image.fromarray(np.round((pixels - low) * (255 / (high - low))).astype(np.uint8))


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that holds more than plain data (a crafted file's call to a function), refused unrun."""


class DataOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and scalars, lists, dicts, strings, bytes and numbers, what CIFAR's python batches hold,
    and refuses any other global before it is called: a crafted pickle cannot run code."""

    # The functions numpy pickles arrays and scalars with, taken from numpy's own reduce so that the module path of
    # the file's numpy (numpy.core in CIFAR's, numpy._core since numpy 2) does not matter.
    NUMPY_GLOBALS = {"ndarray": np.ndarray, "dtype": np.dtype, "_reconstruct": np.zeros(0).__reduce__()[0],
                     "scalar": np.float64(0).__reduce__()[0]}

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self.NUMPY_GLOBALS:
            return self.NUMPY_GLOBALS[name]
        raise UnsafePickleError(f"it holds {module}.{name}, which a data file never does")


def load_data_pickle(path: str | os.PathLike) -> Any:
    """A pickle of plain data (a CIFAR batch) read through DataOnlyUnpickler; anything else is an error naming it."""
    try:
        with open(path, "rb") as f:
            return DataOnlyUnpickler(f, encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"refusing to unpickle {path}: {e} (a crafted file would run code there): "
                                "extract the original archive again") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e}): "
                         "extract the original archive again") from None


# torchvision's readers verify the downloaded archives' MD5s. A local copy (a re-packed subset, a test's tiny
# fixture) is checked for presence by check_root instead. Each reader opens its files through load_data_pickle
# (torchvision unpickles CIFAR as it is) and read_image.
class LocalCIFAR10(tvd.CIFAR10):
    def __init__(self, root: str, train: bool, transform: Callable | None = None):
        tvd.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        folder = Path(root, self.base_folder)
        batches = [load_data_pickle(folder / name) for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [t for b in batches for t in (b["labels"] if "labels" in b else b["fine_labels"])]
        self.classes = load_data_pickle(folder / self.meta["filename"])[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class LocalCIFAR100(LocalCIFAR10, tvd.CIFAR100):
    pass


class LocalFlowers102(tvd.Flowers102):
    def _check_integrity(self) -> bool:
        return True

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = read_image(self._image_files[index])
        return (self.transform(image) if self.transform else image), self._labels[index]


class LocalOxfordIIITPet(tvd.OxfordIIITPet):
    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = read_image(self._images[index])
        return (self.transform(image) if self.transform else image), self._labels[index]


# ---------------------------------------------------------------------------------------------------------------
# Held-out splits

def held_out_split(labels: Sequence[int], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the training part and of the held-out part (`fraction` of each class) of a set that has no
    held-out split: scikit-learn's stratified split at SPLIT_SEED, so it is the same in every run, and both parts
    hold every class."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction must be between 0 and 1 (the held-out share), got {fraction}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(counts.min())
    held_out = math.ceil(fraction * len(labels))
    if smallest < 2 or not len(classes) <= held_out <= len(labels) - len(classes):
        raise ValueError(f"a held-out share of {fraction} cannot keep all {len(classes)} classes in both parts of "
                         f"{len(labels)} samples (the smallest class, {classes[counts.argmin()]}, has {smallest}): "
                         "give the set a validation split, or change data.val_fraction")
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=SPLIT_SEED,
                                          stratify=labels)
    for part, idx in (("training", train_idx), ("held-out", val_idx)):
        absent = np.setdiff1d(classes, labels[idx])
        if absent.size:
            raise ValueError(f"a held-out share of {fraction} leaves {absent.size} classes (e.g. {absent[0]}) out "
                             f"of the {part} part; the smallest class has {smallest} samples: choose data.val_fraction "
                             f"between {1 / smallest:.3g} and {1 - 1 / smallest:.3g}")
    return train_idx, val_idx


class Part(Dataset):
    """The samples of `dataset` at `indices` (one side of a held-out split), through their own transform."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None):
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[self.indices[index]]
        return (self.transform(image) if self.transform else image), label


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 real images shipped with it) as RGB PIL images, split by
    held_out_split."""

    def __init__(self, train: bool, val_fraction: float = 0.2, transform: Callable | None = None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255 / 16)).round().astype(np.uint8)  # pixel values are 0..16
        idx = held_out_split(digits.target, val_fraction)[0 if train else 1]
        self.images, self.targets = images[idx], digits.target[idx].tolist()
        self.classes = [str(d) for d in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


# ---------------------------------------------------------------------------------------------------------------
# Per-sample augmentation seeds, and unreadable images

Sample = TypeVar("Sample")


def sample_seed(*key: int) -> int:
    """The augmentation seed of one sample, from the run's seed, the epoch and where the sample is: the same in
    every process, since a tuple of ints hashes the same everywhere (no PYTHONHASHSEED salt)."""
    return hash(key) % 2**63


def call_seeded(seed: int, read: Callable[[], Sample]) -> Sample:
    """`read()` with torch's, Python's and numpy's generators seeded by `seed`, the process's own left as they were:
    a sample's augmentation then depends on the sample alone, not on the worker that reads it or on where a resume
    started (as the engine's EpochSamples does for map-style sets). Only the CPU generator is seeded, the one that
    fork_rng restores and the transforms draw from: `torch.manual_seed` would also queue a seed for every
    accelerator, formatting the call stack for each, a cost paid per sample, and would reseed a CUDA generator in
    use without restoring it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return read()
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_bad_images(bad_images: str) -> str:
    if bad_images not in BAD_IMAGES:
        raise ValueError(f"data.bad_images must be one of {BAD_IMAGES}, got {bad_images!r}")
    return bad_images


def read_or_skip(read: Callable[[], Sample], bad_images: str, where: str) -> Sample | None:
    """`read()`, or on an unreadable image None (`bad_images="skip"`, for collate_skipping to count) or an error that
    says where it is and what to do."""
    try:
        return read()
    except UnreadableImageError as e:
        if bad_images == "skip":
            return None
        raise UnreadableImageError(f"{e} ({where}). Fix or remove it, or skip such images: data.bad_images=skip "
                                   "in training, --bad-images skip for cvt eval") from None


class SafeImages(Dataset):
    """Wraps a dataset so that an unreadable image either raises an error naming it (`bad_images="error"`) or
    becomes None (`"skip"`), which `collate_skipping` drops and counts."""

    def __init__(self, dataset: Dataset, bad_images: str, split: str):
        self.dataset, self.bad_images, self.split = dataset, check_bad_images(bad_images), split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        return read_or_skip(lambda: self.dataset[index], self.bad_images, f"sample {index} of the {self.split} set")


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; also return how many were skipped."""
    kept = [s for s in batch if s is not None]
    if not kept:
        raise UnreadableImageError(f"all {len(batch)} images of a batch were unreadable: check data.root")
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, len(batch) - len(kept)


def train_transform(data_cfg: dict, model_cfg: dict) -> Callable:
    """timm's training pipeline (RandomResizedCrop, flip, RandAugment, colour jitter, random erasing)."""
    from timm.data import create_transform

    aug = dict(data_cfg["augment"])
    for key in ("scale", "ratio"):
        if aug.get(key) is not None:
            aug[key] = tuple(aug[key])
    return create_transform(data_cfg["img_size"], is_training=True, mean=model_cfg["mean"], std=model_cfg["std"],
                            **aug)


def eval_crop(data_cfg: dict, model_cfg: dict) -> tuple[float, str]:
    """(crop_pct, crop_mode) of the eval transform: the data config's, else the model's."""
    return (data_cfg.get("eval_crop_pct") or model_cfg.get("crop_pct", 1.0),
            data_cfg.get("eval_crop_mode") or model_cfg.get("crop_mode", "center"))


def eval_transform(data_cfg: dict, model_cfg: dict) -> Callable:
    """The paper's eval transform: resize and centre-crop at `crop_pct` (0.875 at 224) or squash (at 384), unless
    the data config sets its own."""
    from timm.data import create_transform

    crop_pct, crop_mode = eval_crop(data_cfg, model_cfg)
    return create_transform(data_cfg["img_size"], is_training=False, crop_pct=crop_pct, crop_mode=crop_mode,
                            interpolation=model_cfg.get("interpolation", "bicubic"), mean=model_cfg["mean"],
                            std=model_cfg["std"])


@dataclasses.dataclass(frozen=True)
class Readers:
    """The processes that read a streaming set (wds), which splits itself among them: this one's `rank` of `world`,
    the training micro-batch (every rank takes the same number of them) and the seed of the shard shuffle. Map-style
    sets do not use it: the engine's sampler splits those."""

    rank: int = 0
    world: int = 1
    batch_size: int = 1
    seed: int = 0


def held_out_part(dataset: Dataset, targets: Sequence[int], data_cfg: dict, train: bool,
                  transform: Callable | None) -> Part:
    """The training part (train=True) or the held-out part of `dataset` (untransformed, with classes `targets`), as
    data.val_fraction splits a set that has no held-out split."""
    return Part(dataset, held_out_split(targets, data_cfg["val_fraction"])[0 if train else 1], transform)


def image_folder(path: Path, transform: Callable | None) -> tvd.ImageFolder:
    try:
        return tvd.ImageFolder(str(path), transform=transform, loader=read_image)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Expected {LAYOUT_HINTS['imagefolder']}; for evaluation alone, ROOT/val/<class>/ "
                                "or ROOT/<class>/ will do") from None


def image_folder_split(data_cfg: dict, train: bool, transform: Callable | None) -> tuple[Dataset, list[str]]:
    """ROOT/train/ for training and ROOT/val/ held out; without val/, data.val_fraction of train/ held out. For
    evaluation alone (train=False) without train/, ROOT itself may be the folder of class folders."""
    root = check_root("imagefolder", data_cfg["root"], None if train else [])
    train_dir, val_dir = root / "train", root / "val"
    if not train and (val_dir.is_dir() or not train_dir.is_dir()):
        folder = image_folder(val_dir if val_dir.is_dir() else root, transform)
        return folder, folder.classes
    if val_dir.is_dir():
        folder = image_folder(train_dir, transform)
        return folder, folder.classes
    folder = image_folder(train_dir, None)
    return held_out_part(folder, folder.targets, data_cfg, train, transform), folder.classes


# The names a Hugging Face dataset's held-out split goes by, in the order one is chosen.
HELD_OUT_SPLITS = ("validation", "val", "test")


def parquet_split(path: Path, root: Path) -> str:
    """"train" or "held-out", by the file's or its folders' names (train-00000-of-00004.parquet, validation/...);
    files named neither are training files (a set with no held-out split)."""
    names = [part.lower() for part in path.relative_to(root).with_suffix("").parts]
    return "held-out" if any(n.startswith(HELD_OUT_SPLITS) for n in names) and not any(
        n.startswith("train") for n in names) else "train"


def check_columns(present: Sequence[str], data_cfg: dict, where: str | os.PathLike) -> None:
    wanted = [data_cfg["image_column"], data_cfg["label_column"]]
    if not set(wanted) <= set(present):
        raise ValueError(f"{where} has columns {list(present)}, not {wanted} (data.image_column, data.label_column): "
                         "set those keys to its image and class-index columns, or rename the columns")


def hf_tables(root: Path, data_cfg: dict) -> dict[str, tuple[Any, str] | None]:
    """The training rows and the held-out rows (None where the set has none) of a Hugging Face dataset, each with
    where they come from: a save_to_disk folder (a Dataset, or a DatasetDict with a train split) or parquet files.
    A file or split without the configured columns is an error naming it."""
    import datasets

    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if "train" not in splits:
            raise ValueError(f"{root} holds the splits {list(splits)} and none named train: name the training split "
                             "train (DatasetDict(train=...)) and save it again")
        held_out = next((name for name in HELD_OUT_SPLITS if name in splits), None)
        tables = {"train": (splits["train"], f"{root} (split train)"),
                  "held-out": (splits[held_out], f"{root} (split {held_out})") if held_out else None}
        for table, where in filter(None, tables.values()):
            check_columns(table.column_names, data_cfg, where)
        return tables
    import pyarrow
    import pyarrow.parquet as pq

    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"hfds root {str(root)!r} holds no dataset_dict.json, state.json or *.parquet: "
                                f"expected {LAYOUT_HINTS['hfds']}")
    by_split: dict[str, list[str]] = {}
    for f in files:
        try:
            check_columns(pq.read_schema(f).names, data_cfg, f)
        except pyarrow.ArrowException as e:
            raise ValueError(f"{f} is not a readable parquet file ({e}): write it again, or remove it") from None
        by_split.setdefault(parquet_split(f, root), []).append(str(f))
    if "train" not in by_split:
        raise ValueError(f"{root}'s parquet files are all held-out ones ({', '.join(by_split['held-out'][:3])}): "
                         "name the training files train*.parquet")
    return {split: (datasets.Dataset.from_parquet(by_split[split]), f"{', '.join(by_split[split][:3])}")
            if split in by_split else None for split in ("train", "held-out")}


class HFImages(Dataset):
    """The rows of a Hugging Face dataset as (image, class index), each image read by read_image from the bytes or
    the path its row holds (a datasets Image feature, a binary column or a path column)."""

    def __init__(self, table: Any, where: str, data_cfg: dict, transform: Callable | None = None):
        import datasets

        self.image_column, self.label_column = data_cfg["image_column"], data_cfg["label_column"]
        table = table.select_columns([self.image_column, self.label_column])
        if isinstance(table.features[self.image_column], datasets.Image):
            table = table.cast_column(self.image_column, datasets.Image(decode=False))  # its bytes, for read_image
        self.table, self.where, self.transform = table, where, transform

    @property
    def targets(self) -> list[int]:
        return list(self.table[self.label_column])

    def class_names(self) -> list[str]:
        """The label feature's names, else "0".."N-1" up to the largest class index."""
        import datasets

        feature = self.table.features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        targets = self.targets
        if not targets or min(targets) < 0:
            raise ValueError(f"{self.where}: column {self.label_column!r} must hold class indices 0, 1, ... (found "
                             f"{min(targets) if targets else 'no rows'}): set data.label_column to that column")
        return [str(i) for i in range(max(targets) + 1)]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.table[index]
        value = row[self.image_column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        source = (value.get("bytes") or path) if isinstance(value, dict) else value
        image = read_image(source, name=f"{path or f'row {index}'} of {self.where}")
        return (self.transform(image) if self.transform else image), int(row[self.label_column])


def hf_split(data_cfg: dict, train: bool, transform: Callable | None) -> tuple[Dataset, list[str]]:
    """The training or held-out rows of a Hugging Face dataset (data.val_fraction of train held out where it has no
    held-out split), and the class names of its training rows."""
    tables = hf_tables(check_root("hfds", data_cfg["root"]), data_cfg)
    names = HFImages(*tables["train"], data_cfg).class_names()
    if tables["held-out"] is not None:
        return HFImages(*tables["train" if train else "held-out"], data_cfg, transform), names
    rows = HFImages(*tables["train"], data_cfg)
    return held_out_part(rows, rows.targets, data_cfg, train, transform), names


def load_split(data_cfg: dict, train: bool, transform: Callable | None,
               readers: Readers = Readers()) -> tuple[Dataset, list[str]]:
    """One split of the configured dataset (the held-out split for train=False) and its class names."""
    name = data_cfg["dataset"]
    if name == "digits":
        ds = Digits(train, data_cfg["val_fraction"], transform)
        return ds, ds.classes
    if name == "imagefolder":
        return image_folder_split(data_cfg, train, transform)
    if name == "hfds":
        return hf_split(data_cfg, train, transform)
    if name == "wds":
        from .shards import shard_split

        return shard_split(data_cfg, train, transform, readers)
    root = check_root(name, data_cfg["root"])
    if name in ("cifar10", "cifar100"):
        cls = LocalCIFAR10 if name == "cifar10" else LocalCIFAR100
        ds = cls(str(root), train=train, transform=transform)
        return ds, list(ds.classes)
    if name == "pets":
        ds = LocalOxfordIIITPet(str(root), split="trainval" if train else "test", transform=transform)
        return ds, list(ds.classes)
    # Flowers-102: the transfer protocol trains on train + val (2,040 images) and reports on test.
    splits = ("train", "val") if train else ("test",)
    parts = [LocalFlowers102(str(root), split=s, transform=transform) for s in splits]
    return ConcatDataset(parts) if len(parts) > 1 else parts[0], list(parts[0].classes)


def guard_images(dataset: Dataset, bad_images: str, split: str) -> Dataset:
    """`dataset` wrapped in SafeImages; a stream (wds) applies data.bad_images to its samples itself."""
    return dataset if isinstance(dataset, IterableDataset) else SafeImages(dataset, bad_images, split)


def build_datasets(data_cfg: dict, model_cfg: dict,
                   readers: Readers = Readers()) -> tuple[Dataset, Dataset, list[str]]:
    """Training set (augmented), held-out set (eval transform) and class names, wrapped for unreadable images."""
    train_set, class_names = load_split(data_cfg, True, train_transform(data_cfg, model_cfg), readers)
    val_set, val_names = load_split(data_cfg, False, eval_transform(data_cfg, model_cfg), readers)
    if val_names != class_names:
        extra = sorted(set(val_names) ^ set(class_names))
        raise ValueError(f"the training and held-out splits have different classes (differing: {extra[:10]}); "
                         "every class needs a folder in both")
    bad = data_cfg["bad_images"]
    return guard_images(train_set, bad, "training"), guard_images(val_set, bad, "held-out"), class_names


def build_eval_dataset(data_cfg: dict, model_cfg: dict) -> tuple[Dataset, list[str]]:
    """The held-out split only, with the eval transform (for `cvt eval`)."""
    val_set, class_names = load_split(data_cfg, False, eval_transform(data_cfg, model_cfg))
    return guard_images(val_set, data_cfg["bad_images"], "held-out"), class_names


class NumberedCopies(Sampler):
    """A RepeatAugSampler's indices, each copy of an image numbered apart: index + N * (rank + world * k) for this
    rank's k-th copy of it this epoch. The engine seeds each sample's augmentation by its index (EpochSamples), and
    the copies of an image, on this rank or another, must be augmented differently; `Copies` reads them."""

    def __init__(self, sampler: Sampler, size: int, rank: int, world: int):
        self.sampler, self.size, self.rank, self.world = sampler, size, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        copies: dict[int, int] = {}
        for index in self.sampler:
            k = copies[index] = copies.get(index, -1) + 1
            yield index + self.size * (self.rank + self.world * k)


class Copies(Dataset):
    """`dataset` read at the numbered copies of NumberedCopies: copy index i + N * c is image i."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def train_sampler(dataset: Dataset, repeated_aug: int, rank: int, world: int, seed: int) -> tuple[Sampler, Dataset]:
    """The training sampler of a map-style set, and the dataset it indexes: each rank's shuffled share of the set,
    reshuffled by set_epoch. With data.repeated_aug = n > 1, timm's RepeatAugSampler: each image n times an epoch,
    its copies on different ranks (its shuffle is seeded by the epoch alone, and its epoch is about one pass)."""
    from torch.utils.data.distributed import DistributedSampler

    if repeated_aug < 0:
        raise ValueError(f"data.repeated_aug is the number of augmented copies of each image (0: off), got "
                         f"{repeated_aug}")
    if repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        repeats = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=repeated_aug)
        return NumberedCopies(repeats, len(dataset), rank, world), Copies(dataset)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed), dataset
