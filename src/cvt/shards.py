"""WebDataset tar shards (`data.dataset: wds`): `write_shards` (`cvt shards`) writes them from an image folder, and
`ShardStream` reads them, split across ranks and DataLoader workers.

A shard folder, as write_shards makes it:

    ROOT/index.json            the classes, and each split's shards with the class of every sample, in order
    ROOT/train-000000.tar ...  WebDataset samples: KEY.jpg (or .png, ...: the image file's own bytes), KEY.cls (the
                               class index as text) and KEY.path.txt (the file it came from)
    ROOT/val-000000.tar ...    the held-out split, where the folder had one or --val-fraction made one

The index tells every process, before it reads anything, how many samples it will get: the engine plans the epoch's
steps by it, and the reader checks each shard against it.

Splitting. Each epoch the training shards are shuffled by (seed, epoch) and dealt out to world x workers readers
(reader rank + world * worker, as webdataset's split_by_node then split_by_worker deal them), and each reader
shuffles its samples in a buffer of data.shuffle_buffer, seeded by (seed, epoch, reader). Every reader yields the
same number of samples, the training samples / readers rounded down to whole micro-batches, so that every rank takes
the same number of steps (DistributedDataParallel needs that). When the shards divide evenly among the readers
(`cvt shards` writes equal shards, the last one aside: choose --shard-size so that their count is a multiple of
ranks x workers), an epoch reads every sample once. Otherwise a reader with more samples stops at the share (the
rest, under a shard's worth, is left out of that epoch, other samples the next, as the shuffle changes) and one
with fewer reads its shards again from the start up to it. The held-out stream deals its shards out in order and
reads every sample once.

Resume. An epoch's order is a function of (seed, epoch) alone, and each sample's augmentation of (seed, epoch, the
sample) alone (call_seeded, as the engine's EpochSamples does for map-style sets), whichever worker reads it.
`set_epoch(epoch, skip)` gives that epoch's stream from this rank's skip-th sample on: each reader passes over the
samples before the resume point (read from its tars but not decoded), and the workers trade roles so that the
loader's first micro-batch is the next unseen one. A run resumed at an epoch boundary, or from a checkpoint inside
an epoch, so reads and augments the samples an uninterrupted run does, in the same order.
"""
from __future__ import annotations

import dataclasses
import json
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from .data import (Readers, call_seeded, check_bad_images, check_root, held_out_split, image_folder, read_image,
                   read_or_skip, sample_seed)
from .files import atomic_path, write_atomic

INDEX_NAME = "index.json"
INDEX_FORMAT = "cvt-shards-1"
IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)  # those ImageFolder lists, and so the writer
REWRITE = "write the shards again with `cvt shards`"


class ShardError(ValueError):
    """A shard that cannot be read, or that holds other samples than index.json says."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """One tar file and what a split reads of it: the positions of its samples there (ascending) and their classes."""

    path: Path
    size: int                   # samples in the tar
    start: int                  # the number of its first sample in the split (samples are numbered over its shards)
    positions: tuple[int, ...]
    labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RawSample:
    """A sample of a shard as it is stored: the image file's bytes, not yet decoded."""

    image: bytes
    label: int
    number: int  # in the split, over its shards
    name: str    # the file it came from and where it is now, for error messages


def read_shard(shard: Shard) -> Iterator[RawSample]:
    """The samples of `shard` at its positions, checked against the index: a tar that cannot be read, a sample
    without an image or a class, or another class or count than index.json gives, is a ShardError naming the shard."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    wanted, labels = set(shard.positions), dict(zip(shard.positions, shard.labels))
    count = 0
    try:
        with open(shard.path, "rb") as stream:
            for position, sample in enumerate(group_by_keys(tar_file_expander([{"url": str(shard.path),
                                                                                   "stream": stream}]))):
                count = position + 1
                if position in wanted:
                    yield raw_sample(shard, sample, position, labels[position])
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # webdataset appends the stream
        raise ShardError(f"shard {shard.path} cannot be read after {count} samples ({type(e).__name__}: {reason}): "
                         f"it is truncated or not a tar file; {REWRITE}") from None
    if count != shard.size:
        raise ShardError(f"shard {shard.path} holds {count} samples where {INDEX_NAME} says {shard.size}: it is "
                         f"truncated or was replaced; {REWRITE}")


def raw_sample(shard: Shard, sample: dict[str, Any], position: int, label: int) -> RawSample:
    key = sample["__key__"]
    images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
    try:
        stored = int(sample["cls"])
    except (KeyError, ValueError):
        stored = None
    if not images or stored is None:
        parts = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"sample {key} of shard {shard.path} holds {parts}, not an image (.jpg, .png, ...) and its "
                         f"class index as text (.cls); {REWRITE}")
    if stored != label:
        raise ShardError(f"sample {key} of shard {shard.path} is of class {stored} where {INDEX_NAME} says {label}: "
                         f"the index is not this shard's; {REWRITE}")
    source = sample.get("path.txt", b"").decode() or key
    return RawSample(sample[images[0]], label, shard.start + position, f"{source} (sample {key} of shard {shard.path})")


class ShardStream(IterableDataset):
    """A split of a shard folder read as a stream by this rank's loader workers (module docstring: how it is split,
    shuffled and resumed). Unreadable images go by data.bad_images, as SafeImages does for map-style sets."""

    def __init__(self, shards: list[Shard], transform: Callable | None, data_cfg: dict, readers: Readers,
                 train: bool):
        self.shards, self.transform, self.readers, self.train = shards, transform, readers, train
        self.bad_images = check_bad_images(data_cfg["bad_images"])
        self.workers, self.shuffle_buffer = max(1, data_cfg["workers"]), data_cfg["shuffle_buffer"]
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer is the number of samples each worker shuffles among, at least 1, "
                             f"got {self.shuffle_buffer}")
        if train and data_cfg["repeated_aug"] > 1:
            raise ValueError("data.repeated_aug needs a map-style set (its sampler picks the copies): a wds stream "
                             "cannot repeat samples across ranks; set data.repeated_aug=0, or use hfds or imagefolder")
        self.split = "training" if train else "held-out"
        self.epoch, self.skip = 0, 0
        samples, readers_total = sum(len(s.positions) for s in shards), readers.world * self.workers
        if train and len(shards) < readers_total:
            raise ValueError(f"{len(shards)} training shards cannot feed {readers.world} ranks x {self.workers} "
                             f"loader workers: each reads shards of its own. Write smaller shards (cvt shards "
                             "--shard-size), or set fewer data.workers")
        # Each training reader's share of an epoch, in whole micro-batches.
        self.per_reader = samples // readers_total // readers.batch_size * readers.batch_size
        if train and self.per_reader == 0:
            raise ValueError(f"the training shards hold {samples} samples, fewer than one micro-batch of "
                             f"{readers.batch_size} for each of {readers.world} ranks x {self.workers} workers: "
                             "lower train.batch_size or data.workers")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Read `epoch`, from this rank's `skip`-th training sample on (a whole number of micro-batches: a resume
        inside the epoch). The engine calls it before each epoch, as it does a sampler's."""
        if skip % self.readers.batch_size:
            raise ValueError(f"a stream resumes at a whole micro-batch of {self.readers.batch_size}, not at sample "
                             f"{skip}")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        """This rank's samples per epoch (after `skip`)."""
        if self.train:
            return self.per_reader * self.workers - self.skip
        return sum(len(s.positions) for s in self.shards[self.readers.rank::self.readers.world])

    def reader_shards(self, reader: int, readers_total: int) -> list[Shard]:
        order = (np.random.default_rng([self.readers.seed, self.epoch]).permutation(len(self.shards)) if self.train
                 else np.arange(len(self.shards)))
        return [self.shards[i] for i in order[reader::readers_total]]

    def __iter__(self) -> Iterator[tuple[Any, int] | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.train and workers != self.workers:
            raise ValueError(f"the training stream was planned for {self.workers} loader workers per rank but runs "
                             f"under {workers}: give its DataLoader num_workers=data.workers")
        if not self.train:
            shards = self.reader_shards(self.readers.rank + self.readers.world * worker, self.readers.world * workers)
            for sample in (sample for shard in shards for sample in read_shard(shard)):
                yield read_or_skip(lambda: self.decode(sample), self.bad_images, f"the {self.split} shards")
            return
        # The loader takes micro-batches from its workers in turn, worker 0 first. Each worker plays a reader's role,
        # rotated on a resume so that the worker asked first plays the role whose micro-batch comes next; each role
        # then passes over its micro-batches before the resume point.
        batch, skipped_batches = self.readers.batch_size, self.skip // self.readers.batch_size
        role = (worker + skipped_batches) % workers
        reader = self.readers.rank + self.readers.world * role
        passed = max(0, -(-(skipped_batches - role) // workers)) * batch
        for n, (passes, sample) in enumerate(self.train_samples(self.reader_shards(reader, self.readers.world *
                                                                                   workers), reader)):
            if n >= passed:
                seed = sample_seed(self.readers.seed, self.epoch, passes, sample.number)
                yield read_or_skip(lambda: call_seeded(seed, lambda: self.decode(sample)), self.bad_images,
                                   f"the {self.split} shards")

    def train_samples(self, shards: list[Shard], reader: int) -> Iterator[tuple[int, RawSample]]:
        """Exactly per_reader samples of `shards`, buffer-shuffled, passing over them again where they hold fewer;
        each with the number of the pass it is from."""
        import webdataset

        yielded, passes = 0, 0
        while True:
            rng = random.Random(f"{self.readers.seed}:{self.epoch}:{reader}:{passes}")
            one_pass = (s for shard in shards for s in read_shard(shard))
            before = yielded
            for sample in webdataset.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(one_pass):
                yield passes, sample
                yielded += 1
                if yielded == self.per_reader:
                    return
            if yielded == before:
                raise ValueError(f"training reader {reader} was dealt shards with no samples of this split "
                                 f"({', '.join(str(s.path) for s in shards)}): write more, smaller shards")
            passes += 1

    def decode(self, sample: RawSample) -> tuple[Any, int]:
        image = read_image(sample.image, name=sample.name)
        return (self.transform(image) if self.transform else image), sample.label


def read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not a readable shard index ({type(e).__name__}: {e}); {REWRITE}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path} is not a cvt shard index (its format is not {INDEX_FORMAT!r}); {REWRITE}")
    return index


def split_shards(root: Path, entries: list[dict[str, Any]], chosen: np.ndarray | None = None) -> list[Shard]:
    """The shards of an index's split, each with all its samples, or with those at `chosen`, positions in the
    split's samples counted over its shards in order."""
    paths = [root / e["file"] for e in entries]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{INDEX_NAME} lists shards that are not there: {', '.join(missing[:5])}; {REWRITE}")
    shards, start = [], 0
    chosen = np.sort(chosen) if chosen is not None else None
    for path, entry in zip(paths, entries):
        labels = entry["labels"]
        positions = (range(len(labels)) if chosen is None else
                     chosen[(chosen >= start) & (chosen < start + len(labels))] - start)
        shards.append(Shard(path, len(labels), start, tuple(int(p) for p in positions),
                            tuple(labels[p] for p in positions)))
        start += len(labels)
    return shards


def shard_split(data_cfg: dict, train: bool, transform: Callable | None,
                readers: Readers) -> tuple[ShardStream, list[str]]:
    """The training or held-out stream of a shard folder and its class names: its val shards, or, where it has
    none, data.val_fraction of its training samples held out (by held_out_split, read from the training shards)."""
    root = check_root("wds", data_cfg["root"])
    index = read_index(root)
    splits = index["splits"]
    if "val" in splits:
        shards = split_shards(root, splits["train" if train else "val"])
    else:
        labels = [label for entry in splits["train"] for label in entry["labels"]]
        shards = split_shards(root, splits["train"], held_out_split(labels, data_cfg["val_fraction"])[0 if train
                                                                                                    else 1])
    return ShardStream(shards, transform, data_cfg, readers, train), list(index["classes"])


# ---------------------------------------------------------------------------------------------------------------
# Writing: `cvt shards`

def folder_splits(folder: Path, val_fraction: float | None) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """The (file, class) samples of each split of an image folder (FOLDER/train/ and val/, or FOLDER/<class>/ as a
    training split alone; without val/, `val_fraction` of each class held out as val), and the class names."""
    train_dir = folder / "train" if (folder / "train").is_dir() else folder
    train = image_folder(train_dir, None)
    splits = {"train": train.samples}
    if train_dir != folder and (folder / "val").is_dir():
        val = image_folder(folder / "val", None)
        if val.classes != train.classes:
            differing = sorted(set(val.classes) ^ set(train.classes))
            raise ValueError(f"{folder}'s train/ and val/ have different classes (differing: {differing[:10]}): "
                             "every class needs a folder in both")
        splits["val"] = val.samples
        if val_fraction is not None:
            raise ValueError(f"{folder} has a val/ folder: --val-fraction is for a folder without one; drop it")
    elif val_fraction is not None:
        train_idx, val_idx = held_out_split(train.targets, val_fraction)
        splits = {"train": [train.samples[i] for i in sorted(train_idx)],
                  "val": [train.samples[i] for i in sorted(val_idx)]}
    return splits, train.classes


def write_shard(path: Path, samples: list[tuple[str, int]], first_key: int, folder: Path, progress: tqdm) -> dict:
    """One tar of `samples`, written under a temporary name, read back and checked, then renamed to `path`; its
    index entry."""
    from webdataset import TarWriter

    labels = [label for _, label in samples]
    with atomic_path(path) as tmp:
        with TarWriter(str(tmp), encoder=False) as tar:  # encoder=False: each image file's bytes as they are
            for key, (file, label) in enumerate(samples, first_key):
                file = Path(file)
                tar.write({"__key__": f"{key:09d}", file.suffix.lower().lstrip("."): file.read_bytes(),
                           "cls": str(label).encode(), "path.txt": str(file.relative_to(folder)).encode()})
                progress.update()
        for _ in read_shard(Shard(tmp, len(labels), first_key, tuple(range(len(labels))), tuple(labels))):
            pass
    return {"file": path.name, "labels": labels}


def write_shards(folder: str | Path, output: str | Path, shard_size: int = 1000, val_fraction: float | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Write an image folder as WebDataset shards in `output` (new or empty) and index.json last: each split's
    samples shuffled by `seed` (so that every shard mixes the classes) and cut into shards of `shard_size`, each
    written atomically and read back against what it should hold (count and classes) before it takes its name.
    Returns a summary: the classes, and each split's samples and shards."""
    folder, output = Path(folder).expanduser(), Path(output).expanduser()
    if shard_size < 1:
        raise ValueError(f"--shard-size is the number of samples per shard, at least 1, got {shard_size}")
    if output.is_dir() and ((output / INDEX_NAME).exists() or any(output.glob("*.tar"))):
        raise ValueError(f"{output} already holds shards: write into a new or empty folder, or remove them first")
    splits, classes = folder_splits(folder, val_fraction)
    index: dict[str, Any] = {"format": INDEX_FORMAT, "classes": classes, "splits": {}}
    rng = np.random.default_rng(seed)
    for split, samples in splits.items():
        samples = [samples[i] for i in rng.permutation(len(samples))]
        with tqdm(total=len(samples), desc=f"{split} shards", unit="img") as progress:
            index["splits"][split] = [
                write_shard(output / f"{split}-{number:06d}.tar", samples[start:start + shard_size], start, folder,
                            progress)
                for number, start in enumerate(range(0, len(samples), shard_size))]
    write_atomic(output / INDEX_NAME, json.dumps(index))
    return {"classes": len(classes), "splits": {split: {"samples": sum(len(e["labels"]) for e in entries),
                                                        "shards": len(entries)}
                                                for split, entries in index["splits"].items()}}
