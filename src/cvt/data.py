"""Datasets and transforms for training and evaluation.

Every dataset is read from a local root in torchvision's on-disk format; nothing is downloaded. A missing or wrong
root is an error that lists the files expected where. Training images go through timm's augmentation pipeline,
evaluation images through the paper's eval transform (the model's `crop_pct` / `crop_mode`).

    train_set, val_set, class_names = build_datasets(config["data"], model.pretrained_cfg)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tvd

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "pets", "flowers102")
BAD_IMAGES = ("error", "skip")  # data.bad_images: stop at an unreadable image, or leave it out and count it

# Files (relative to the root) each format needs, as torchvision's readers expect them: a trailing "/" is a folder.
EXPECTED_FILES = {
    "imagefolder": ["train/", "val/"],
    "cifar10": [f"cifar-10-batches-py/{f}" for f in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]],
    "cifar100": [f"cifar-100-python/{f}" for f in ("train", "test", "meta")],
    "pets": [f"oxford-iiit-pet/{f}" for f in ("images/", "annotations/trainval.txt", "annotations/test.txt")],
    "flowers102": [f"flowers-102/{f}" for f in ("jpg/", "imagelabels.mat", "setid.mat")],
}
LAYOUT_HINTS = {
    "imagefolder": "ImageNet-style folders: ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg",
    "cifar10": "the extracted cifar-10-python.tar.gz",
    "cifar100": "the extracted cifar-100-python.tar.gz",
    "pets": "the extracted images.tar.gz and annotations.tar.gz of Oxford-IIIT Pets",
    "flowers102": "102flowers.tgz extracted to jpg/, with imagelabels.mat and setid.mat beside it",
}


def check_root(dataset: str, root: str | os.PathLike | None) -> Path:
    """The dataset's root, or an error naming every expected file that is missing."""
    if dataset not in EXPECTED_FILES:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs data.root (a local folder holding "
                         f"{LAYOUT_HINTS[dataset]}); nothing is downloaded")
    root = Path(root).expanduser()
    present = lambda f: (root / f).is_dir() if f.endswith("/") else (root / f).is_file()  # noqa: E731
    missing = [f for f in EXPECTED_FILES[dataset] if not present(f)]
    if missing:
        raise FileNotFoundError(
            f"{dataset} root {str(root)!r} lacks {', '.join(missing)}: expected "
            f"{', '.join(str(root / f) for f in EXPECTED_FILES[dataset])} ({LAYOUT_HINTS[dataset]}); "
            "nothing is downloaded")
    return root


# torchvision's CIFAR and Flowers readers verify the downloaded archives' MD5s. A local copy (a re-packed subset, a
# test's tiny fixture) is checked for presence by check_root instead; the reading itself is torchvision's.
class LocalCIFAR10(tvd.CIFAR10):
    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        import pickle

        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class LocalCIFAR100(LocalCIFAR10, tvd.CIFAR100):
    pass


class LocalFlowers102(tvd.Flowers102):
    def _check_integrity(self) -> bool:
        return True


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 real images shipped with it) as RGB PIL images.

    A stratified split with a fixed seed, so the held-out set is the same whatever the run's seed.
    """

    def __init__(self, train: bool, val_fraction: float = 0.2, transform: Callable | None = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255 / 16)).round().astype(np.uint8)  # pixel values are 0..16
        train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=val_fraction, random_state=0,
                                              stratify=digits.target)
        idx = train_idx if train else val_idx
        self.images, self.targets = images[idx], digits.target[idx].tolist()
        self.classes = [str(d) for d in digits.target_names]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded, with data.bad_images=error."""


class SafeImages(Dataset):
    """Wraps a dataset so that an unreadable image either raises an error naming it (`bad_images="error"`) or
    becomes None (`"skip"`), which `collate_skipping` drops and counts."""

    def __init__(self, dataset: Dataset, bad_images: str, split: str):
        if bad_images not in BAD_IMAGES:
            raise ValueError(f"data.bad_images must be one of {BAD_IMAGES}, got {bad_images!r}")
        self.dataset, self.bad_images, self.split = dataset, bad_images, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        try:
            return self.dataset[index]
        except (OSError, SyntaxError) as e:  # what PIL raises for a missing, truncated or undecodable file
            if self.bad_images == "skip":
                return None
            samples = getattr(self.dataset, "samples", None)
            where = f" {samples[index][0]}" if samples else ""
            raise UnreadableImageError(f"unreadable image{where} (sample {index} of the {self.split} set): {e}. "
                               "Fix or remove it, or set data.bad_images=skip to skip such images") from e


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


def load_split(data_cfg: dict, train: bool, transform: Callable | None) -> tuple[Dataset, list[str]]:
    """One split of the configured dataset (the held-out split for train=False) and its class names."""
    name = data_cfg["dataset"]
    if name == "digits":
        ds = Digits(train, data_cfg["val_fraction"], transform)
        return ds, ds.classes
    root = check_root(name, data_cfg["root"])
    if name == "imagefolder":
        ds = tvd.ImageFolder(str(root / ("train" if train else "val")), transform=transform)
        return ds, ds.classes
    if name in ("cifar10", "cifar100"):
        cls = LocalCIFAR10 if name == "cifar10" else LocalCIFAR100
        ds = cls(str(root), train=train, transform=transform)
        return ds, list(ds.classes)
    if name == "pets":
        ds = tvd.OxfordIIITPet(str(root), split="trainval" if train else "test", transform=transform)
        return ds, list(ds.classes)
    # Flowers-102: the transfer protocol trains on train + val (2,040 images) and reports on test.
    splits = ("train", "val") if train else ("test",)
    parts = [LocalFlowers102(str(root), split=s, transform=transform) for s in splits]
    return ConcatDataset(parts) if len(parts) > 1 else parts[0], list(parts[0].classes)


def build_datasets(data_cfg: dict, model_cfg: dict) -> tuple[Dataset, Dataset, list[str]]:
    """Training set (augmented), held-out set (eval transform) and class names, wrapped for unreadable images."""
    train_set, class_names = load_split(data_cfg, True, train_transform(data_cfg, model_cfg))
    val_set, val_names = load_split(data_cfg, False, eval_transform(data_cfg, model_cfg))
    if val_names != class_names:
        extra = sorted(set(val_names) ^ set(class_names))
        raise ValueError(f"the training and held-out splits have different classes (differing: {extra[:10]}); "
                         "every class needs a folder in both")
    bad = data_cfg["bad_images"]
    return SafeImages(train_set, bad, "training"), SafeImages(val_set, bad, "held-out"), class_names


def build_eval_dataset(data_cfg: dict, model_cfg: dict) -> tuple[Dataset, list[str]]:
    """The held-out split only, with the eval transform (for `cvt eval`)."""
    val_set, class_names = load_split(data_cfg, False, eval_transform(data_cfg, model_cfg))
    return SafeImages(val_set, data_cfg["bad_images"], "held-out"), class_names
