"""The one training loop: the paper's ImageNet recipes, fine-tuning and the digits default, on a CPU, a GPU or
many of them (`torchrun`).

    config = load_config("configs/cvt13_imagenet.yaml", ["train.epochs=10"])
    summary = train(config, "runs/cvt13")

`train` claims the output folder (one run at a time, `RunFolder`) and checks the config (a resume goes on with
the checkpoint's, `resume_changes`); `run_training` wires the parts, each a function of its own: the processes,
the data, the model, the optimisation, the training state (resumed from a checkpoint or new), then for each epoch
`train_one_epoch`, `evaluate_epoch`, a checkpoint and its `EpochRecord`, and the summary. Everything it writes
goes into the output directory: `last.pth` (every epoch, and every train.checkpoint_every_steps inside one),
`best.pth`, the last few `epoch_NNNN.pth`, `metrics.jsonl` / `metrics.csv`, `curves.png`, `summary.json` and,
with train.tensorboard, `tensorboard/`. Files are written to a temporary name and renamed, so none is ever
half-written; a resume removes the temporaries a kill left and redoes what it left undone.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import importlib.util
import fcntl
import io
import itertools
import json
import math
import os
import random
import shutil
import socket
import time
import types
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .data import (Readers, build_datasets, build_eval_dataset, call_seeded, collate_skipping, eval_crop,
                   sample_seed, train_sampler)
from .accel import accelerate_training, compile_model, optimize_for_inference
from .files import copy_atomic, remove_stale_temporaries, save_atomic, save_figure, write_atomic, yaml_load
from .flops import count_params
from .model import ZOO, create_model, load_model, unknown_model_error
from .weights import TRAINING_FORMAT, load_checkpoint, read_torch_file

if typing.TYPE_CHECKING:
    from matplotlib.figure import Figure

# Every key a recipe may set. The values are the built-in default run (`cvt train` with no config, `make demo`;
# configs/digits.yaml spells it out): a small CvT on scikit-learn's 8 x 8 digits upsampled to 32 x 32, in about
# two minutes on a 2-core CPU. Every recipe in configs/ is laid over them, directly or through its `base` recipes.
DEFAULTS: dict[str, Any] = {
    "name": "digits_cvt_tiny",
    "seed": 0,
    "model": {
        "name": "cvt_13_224",                 # a zoo name (cvt.list_models())
        # CvT overrides. A recipe's mapping is the complete set; `model.args.KEY=VALUE` on the command line
        # sets one of them.
        "args": {"embed_dims": [16, 32, 48], "depths": [1, 1, 2], "num_heads": [1, 2, 3], "img_size": 32},
        "pretrained": None,                   # a checkpoint to fine-tune from
        "reset_head": False,                  # a fresh head even when the class count matches (a new label set)
        "sync_bn": False,                     # SyncBatchNorm across GPUs under torchrun
        "compile": False,                     # torch.compile
        "grad_checkpointing": False,          # recompute each block's activations in the backward pass
    },
    "data": {
        "dataset": "digits",                  # one of cvt.data.DATASETS
        "root": None,
        "img_size": 32,
        "val_fraction": 0.2,                  # the held-out share of each class, for a set with no held-out split
                                              # (digits; imagefolder without val/; wds, hfds), fixed and seeded
        "workers": 0,                         # loader processes per training process
        "bad_images": "error",                # or "skip": leave unreadable images out and count them
        "repeated_aug": 0,                    # n > 1: each image n times an epoch, on different ranks (timm's
                                              # RepeatAugSampler, map-style sets); 0: off
        "shuffle_buffer": 1000,               # wds: samples each loader worker shuffles among
        "image_column": "image",              # hfds: the column of the images (bytes, a path, or an Image feature)
        "label_column": "label",              # hfds: the column of the class indices
        "eval_crop_pct": 1.0,                 # null: the model's (0.875 at 224, 1.0 at 384)
        "eval_crop_mode": "squash",           # null: the model's ("center" at 224, "squash" at 384)
        "augment": {                          # arguments of timm.data.create_transform
            "scale": [0.6, 1.0],
            "ratio": [0.8, 1.25],
            "hflip": 0.0,                     # digits are not mirror-symmetric
            "color_jitter": None,
            "auto_augment": None,             # e.g. rand-m9-mstd0.5-inc1 (RandAugment)
            "interpolation": "bicubic",
            "re_prob": 0.0,                   # random erasing
            "re_mode": "pixel",
            "re_count": 1,
        },
    },
    "train": {
        "epochs": 15,                         # all of them, cool-down included
        "steps": None,                        # optimizer steps instead of epochs (the fine-tuning recipes)
        "batch_size": 64,                     # global: over all processes and accumulated micro-batches
        "micro_batch_size": None,             # per process and forward pass; null: batch_size / processes
        "optimizer": "adamw",                 # a timm optimizer name ("momentum": SGD with momentum)
        "lr": 2.0e-3,
        "lr_base_batch": None,                # lr is for this batch size and scales linearly; null: no scaling
        "weight_decay": 0.05,                 # not on norms, biases, class tokens, position embeddings
        "layer_decay": None,                  # layer-wise lr decay (timm's): each layer's lr x decay^(depth left)
        "momentum": 0.9,
        "warmup_epochs": 1,
        "warmup_lr": 1.0e-6,
        "min_lr": 1.0e-5,
        "cooldown_epochs": 0,                 # the last epochs, at min_lr
        "label_smoothing": 0.1,
        "mixup": 0.0,
        "cutmix": 0.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "clip_grad": None,                    # max gradient norm
        "amp": None,                          # "bf16" or "fp16" autocast (fp16 with a gradient scaler)
        "ema_decay": None,                    # keep (and evaluate) an EMA of the weights
        "device": "auto",                     # auto: cuda if available, else cpu
        "resume": None,                       # true: OUTPUT/last.pth if there is one, or a checkpoint path
        "epochs_per_run": None,               # stop after this many epochs (time-limited jobs), then resume
        "checkpoint_every_steps": None,       # also write last.pth every this many steps inside an epoch
        "keep_epoch_checkpoints": 3,
        "tensorboard": False,                 # TensorBoard scalars in OUTPUT/tensorboard (pip install tensorboard)
        "progress": True,                     # tqdm bar
        "accel": True,                        # the training speed-ups of cvt.accel.accelerate_training
    },
}
# The type of each key that its default does not give (a null default, a key that also takes null, fractional
# warm-up epochs), with an example value; every other key takes its default's type. `Path`: a string or an
# os.PathLike. `model.args` is open: CvT checks its own arguments.
TYPES: dict[str, tuple[Any, Any]] = {
    "model.pretrained": (Path | None, "CvT-13-384x384-IN-22k.pth"),
    "data.root": (Path | None, "/data/imagenet"),
    "data.eval_crop_pct": (float | None, 0.875),
    "data.eval_crop_mode": (str | None, "center"),
    "data.augment.color_jitter": (float | list[float] | None, 0.4),
    "data.augment.auto_augment": (str | None, "rand-m9-mstd0.5-inc1"),
    "train.steps": (int | None, 10000),
    "train.micro_batch_size": (int | None, 128),
    "train.lr_base_batch": (int | None, 256),
    "train.layer_decay": (float | None, 0.75),
    "train.warmup_epochs": (float, 5),
    "train.clip_grad": (float | None, 1.0),
    "train.amp": (str | None, "bf16"),
    "train.ema_decay": (float | None, 0.9998),
    "train.resume": (bool | Path | None, True),
    "train.epochs_per_run": (int | None, 10),
    "train.checkpoint_every_steps": (int | None, 1000),
}
# The smallest value a numeric key takes, where its type alone allows nonsense.
MINIMUMS: dict[str, float] = {
    "train.epochs": 1, "train.steps": 1, "train.batch_size": 1, "train.micro_batch_size": 1, "train.lr": 0,
    "train.lr_base_batch": 1, "train.weight_decay": 0, "train.warmup_epochs": 0, "train.warmup_lr": 0,
    "train.min_lr": 0, "train.cooldown_epochs": 0, "train.label_smoothing": 0, "train.mixup": 0, "train.cutmix": 0,
    "train.clip_grad": 0, "train.ema_decay": 0, "train.epochs_per_run": 1, "train.checkpoint_every_steps": 1,
    "train.keep_epoch_checkpoints": 0, "data.img_size": 1, "data.workers": 0,
}
# The keys a resumed run may change (`cvt train --resume KEY=VALUE`): its length, its learning rate (both re-plan
# the schedule from the resumed step), the remedies the divergence message names, and where and how it runs. Every
# other key comes from the checkpoint's config.
RESUMABLE = ("train.epochs", "train.steps", "train.lr", "train.clip_grad", "train.amp", "train.resume",
             "train.epochs_per_run", "train.checkpoint_every_steps", "train.keep_epoch_checkpoints",
             "train.micro_batch_size", "train.device", "train.progress", "train.tensorboard", "data.root",
             "data.workers", "data.bad_images")
# Optimizer steps between the host's reads of the loss (the progress bar, the divergence check). A read waits for
# the device to finish all queued work, so it is not done every step.
CHECK_EVERY = 10

# ---------------------------------------------------------------------------------------------------------------
# Configuration

# How error messages name a type: (one value, several values).
TYPE_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
              str: ("a string", "strings"), Path: ("a path", "paths"), type(None): ("null", "nulls")}


def key_type(key: str) -> tuple[Any, Any]:
    """The type of the dotted config key and an example value: its entry in TYPES, else its default's type (a list
    default: a list of its items' type) and the default."""
    if key in TYPES:
        return TYPES[key]
    default = DEFAULTS
    for part in key.split("."):
        default = default[part]
    return (list[type(default[0])] if isinstance(default, list) else type(default)), default


def is_of_type(value: Any, kind: Any) -> bool:
    """Whether `value` is of `kind`: a float may be an int, a bool is neither, a list may be a tuple."""
    if isinstance(kind, types.UnionType):
        return any(is_of_type(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, (list, tuple)) and all(is_of_type(v, typing.get_args(kind)[0]) for v in value)
    if kind in (int, float):
        return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    if kind is Path:
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, kind)


def type_name(kind: Any, plural: bool = False) -> str:
    if isinstance(kind, types.UnionType):
        *names, last = [type_name(k, plural) for k in typing.get_args(kind)]
        return f"{', '.join(names)} or {last}"
    if typing.get_origin(kind) is list:
        return f"a list of {type_name(typing.get_args(kind)[0], plural=True)}"
    return TYPE_NAMES[kind][plural]


def check_type(key: str, value: Any) -> None:
    """`value` is of the key's type (`key_type`) and at least its MINIMUMS entry."""
    kind, example = key_type(key)
    if not is_of_type(value, kind):
        text = example if isinstance(example, str) else json.dumps(example)
        raise ValueError(f"config key {key!r} takes {type_name(kind)}, e.g. {key}={text}; "
                         f"got {json.dumps(value, default=repr)}")
    if key in MINIMUMS and value is not None and value < MINIMUMS[key]:
        raise ValueError(f"config key {key!r} must be at least {MINIMUMS[key]}, got {value}")


def merge_config(base: dict, update: dict, where: str = "") -> dict:
    """`base` with `update` laid over it; a key `base` lacks is an error suggesting the close ones, and so is a
    value of the wrong type (`check_type`).

    `model.args` is open: any CvT argument may go there (the model checks them), and a mapping given for it
    replaces the one in `base`.
    """
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(where + c for c in close)}?" if close
                    else f"the keys here are {', '.join(where + k for k in base)}")
            raise ValueError(f"unknown config key {path!r}: {hint}")
        if path == "model.args":
            if not isinstance(value, dict):
                raise ValueError(f"model.args is a mapping of CvT arguments, got {value!r}")
            out[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} is a section ({', '.join(base[key])}), got {value!r}")
            out[key] = merge_config(base[key], value, f"{path}.")
        else:
            check_type(path, value)
            out[key] = copy.deepcopy(value)
    return out


def read_recipe(path: Path, derived: tuple[Path, ...] = ()) -> dict:
    """The config of the recipe file at `path`: the config of its `base` (a recipe file, relative to this one's
    folder; the defaults where it names none) with the file's keys laid over it. `derived`: the recipes that
    named this one as their base, for the errors."""
    if path.resolve() in [p.resolve() for p in derived]:
        chain = " -> ".join(str(p) for p in (*derived, path))
        raise ValueError(f"{path}: a cycle of base recipes ({chain})")
    if not path.is_file():
        where = f"the base of {derived[-1]}" if derived else "the recipes are in configs/"
        raise FileNotFoundError(f"no config file {path} ({where})")
    recipe = yaml_load(path.read_text(), source=path) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} is not a YAML mapping of config sections")
    base = recipe.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{path}: base names the recipe file this one changes (e.g. base: digits.yaml), "
                         f"got {base!r}")
    config = read_recipe(path.parent / base, (*derived, path)) if base else copy.deepcopy(DEFAULTS)
    try:
        return merge_config(config, recipe)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> dict:
    """A recipe: the YAML file at `path` through its chain of bases and dotted `key=value` overrides with
    YAML-typed values (`train.lr=1e-3`, `model.args.depths=[1,2,10]`). Without a file the overrides change `base`:
    by default the built-in digits run, or a recorded run's config (`recorded_config`)."""
    config = read_recipe(Path(path)) if path is not None else merge_config(DEFAULTS, base or {})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected a dotted key=value override (e.g. train.epochs=5), got {item!r}")
        value = yaml_load(text, source=f"the override {item!r}")
        if key.startswith("model.args."):  # one CvT argument; the recipe's others stay
            key, value = "model.args", {**config["model"]["args"], key[len("model.args."):]: value}
        *parents, last = key.split(".")
        for parent in reversed(parents):  # "a.b=v" becomes {"a": {"b": v}}, checked by merge_config
            value = {last: value}
            last = parent
        config = merge_config(config, {last: value})
    return config


def config_leaves(config: dict, where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every value of a config; model.args, a mapping replaced whole, is one value."""
    for key, value in config.items():
        if isinstance(value, dict) and f"{where}{key}" != "model.args":
            yield from config_leaves(value, f"{where}{key}.")
        else:
            yield f"{where}{key}", value


def resume_changes(recorded: dict, requested: dict) -> list[str]:
    """How the config `requested` for a resumed run changes the checkpoint's `recorded` one, described: in
    RESUMABLE keys only. Any other difference is an error listing them."""
    # Compared as JSON: a tuple and a list, a Path and a string, are the same value.
    old = {key: json.dumps(value, default=str) for key, value in config_leaves(merge_config(DEFAULTS, recorded))}
    new = {key: json.dumps(value, default=str) for key, value in config_leaves(requested)}
    changed = [key for key in new if old.get(key) != new[key]]
    refused = [f"{key} (recorded {old.get(key)}, given {new[key]})" for key in changed if key not in RESUMABLE]
    if refused:
        raise ValueError(f"a resumed run keeps the config its checkpoint records, and a resume may not change "
                         f"{'; '.join(refused)}. Leave them out (`cvt train --resume` takes every key from the "
                         f"checkpoint), or start a new run in another --output. A resume may change "
                         f"{', '.join(RESUMABLE)}")
    return [f"{key} {old.get(key)} -> {new[key]}" for key in changed if key != "train.resume"]


# ---------------------------------------------------------------------------------------------------------------
# Processes, devices, randomness

@dataclasses.dataclass
class Processes:
    """This process among the training processes: torchrun's rank and world size (0 and 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    started_group: bool  # whether `train` started the process group, and so ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} asked for, but torch finds no CUDA GPU here: use cpu (or auto)")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but there are {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_name: str) -> Processes:
    """This process's rank, world size and device. torchrun sets WORLD_SIZE and friends: NCCL on GPUs, gloo on the
    CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    started = False
    if world > 1 and not dist.is_initialized():
        # torchrun's agent keeps its store across elastic restarts, where a restarted process could read the
        # addresses that the killed attempt's processes published and fail to connect: each attempt has its own keys.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"cvt/attempt_{attempt}", store))
        started = True
    return Processes(dist.get_rank() if world > 1 else 0, world, device, started)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain numbers (a weights_only checkpoint holds them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def gather(value: Any, world: int) -> list[Any]:
    """Every process's `value`, in rank order; all processes call it together."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def on_main(processes: Processes, work: Callable[[], Any]) -> Any:
    """`work()` run by the main process; its result, or the error it raised, on every process, so that all go on
    with the same value or stop with the same message."""
    result, error = None, None
    if processes.is_main:
        try:
            result = work()
        except (OSError, ValueError) as e:
            error = e
    if processes.world > 1:
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise error
    return result


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Files

# What a run writes into its output folder, besides epoch_NNNN.pth and the lock.
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "metrics.csv", "curves.png", "summary.json", "tensorboard")


class RunFolder:
    """The output folder of a run, the run's alone while it runs: the main process holds an exclusive lock on its
    `.lock` file. The kernel drops the lock when the process ends, however it ends, so a killed run leaves none."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.lock: Any = None  # the open .lock file while the run holds it

    def run_files(self) -> list[Path]:
        """The files of a run already in the folder."""
        named = [self.directory / name for name in RUN_FILES]
        return [p for p in named if p.exists()] + sorted(self.directory.glob("epoch_*.pth"))

    def claim(self, resume: bool | str | os.PathLike | None, overwrite: bool) -> Path | None:
        """Lock the folder (checking that it can be written), remove what a killed run left half-written, and
        return train.resume's checkpoint (None: the run starts). A new run into a folder that holds another is
        refused unless `overwrite`, which deletes the other's files first."""
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"the output {directory} is a file: give --output a folder")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.lock = open(directory / ".lock", "a+")
        except OSError as e:
            raise PermissionError(f"cannot write to the output folder {directory} ({e.strerror}): give --output "
                                  "a folder you can write to") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.release()
            raise FileExistsError(f"{directory} is the output of a run in progress ({holder}): wait for it to end, "
                                  "or give this run another --output") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"cvt train, PID {os.getpid()} on {socket.gethostname()}\n")
        self.lock.flush()
        remove_stale_temporaries(directory)
        checkpoint = checkpoint_to_resume(resume, directory)
        earlier = self.run_files()
        if earlier and not resume:
            if not overwrite:
                raise FileExistsError(f"{directory} holds an earlier run ({', '.join(p.name for p in earlier)}): "
                                      "continue it with --resume, delete it with --overwrite, or give this run "
                                      "another --output")
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return checkpoint

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def checkpoint_to_resume(resume: bool | str | os.PathLike | None, directory: Path) -> Path | None:
    """train.resume's checkpoint. True: DIRECTORY/last.pth if there is one, else none and the run starts, so that
    a restarted job (torchrun --max-restarts, a requeued batch job) runs the same command as its first start. A
    path must be a file."""
    if not resume:
        return None
    if resume is True:
        last = directory / "last.pth"
        return last if last.exists() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"nothing to resume from: no checkpoint {resume}")
    return Path(resume)


def write_metrics(rows: list[dict[str, Any]], output_dir: Path) -> None:
    """metrics.jsonl and metrics.csv: one row per epoch."""
    write_atomic(output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output_dir / "metrics.csv", text.getvalue())


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> Figure:
    """Loss (training and held-out) and held-out top-1 per epoch under `title` (the run and its model); returns
    the matplotlib Figure written to `path`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the caller's process
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    # A marker on each epoch, since a line through one point (a one-epoch run) draws nothing; past a few dozen
    # epochs the markers would merge into a thick line.
    line = dict(marker="o", markersize=4) if len(rows) <= 40 else {}
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="training", **line)
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="held-out", **line)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["top1"] for r in rows], label="model", **line)
    if "ema_top1" in rows[0]:
        ax_acc.plot(epochs, [r["ema_top1"] for r in rows], label="EMA", **line)
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="held-out top-1")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, one tick for one
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Models, checkpoints, evaluation

def read_training_checkpoint(path: str | os.PathLike, mmap: bool = True) -> dict[str, Any] | None:
    """The whole state of a checkpoint written by `train` (config, optimizer, ...); None for any other weights.

    Recognised by its content, whatever its name, as `weights.load_checkpoint` recognises it; `weights_only`,
    and by default mmap, so that reading the config or the epoch does not load the tensors. A truncated or
    damaged file is an UnreadableCheckpointError, not "another file"."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    state = read_torch_file(path, mmap=mmap)
    return state if isinstance(state, dict) and state.get("format") == TRAINING_FORMAT else None


def resumable_checkpoint(path: str | os.PathLike, mmap: bool = True) -> dict[str, Any]:
    """`read_training_checkpoint`, where any other file is an error: what a resume reads."""
    state = read_training_checkpoint(path, mmap)
    if state is None:
        raise ValueError(f"{path} is not a training checkpoint written by `cvt train`; to start from its "
                         "weights, set model.pretrained instead")
    return state


@dataclasses.dataclass
class TrainingState:
    """Everything a training checkpoint holds, and its files in `directory`: `last.pth` every epoch, copied to
    `best.pth` when the epoch is the best so far and to `epoch_NNNN.pth`, of which the last `keep_epochs` stay.

    The modules and optimisation state are restored in place on `load`; `epoch` (those done), `step`, `seconds`,
    `history` and `best` say where the run is; `model_name`, `model_args`, `pretrained_cfg` and `config` describe it
    (they are what `cvt.weights` and `model_from_checkpoint` read). The learning-rate schedule is not kept: it is a
    function of the config and the step. A checkpoint written inside an epoch (train.checkpoint_every_steps) holds
    each process's `EpochProgress` in `epoch_progress`; one written at an epoch's end holds None there.
    """

    directory: Path
    keep_epochs: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    model_name: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    config: dict[str, Any]
    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best: dict[str, Any] = dataclasses.field(default_factory=lambda: {"top1": -1.0, "epoch": 0})
    epoch_progress: list[dict[str, Any]] | None = None

    @property
    def last(self) -> Path:
        return self.directory / "last.pth"

    def record(self, row: dict[str, Any], seconds: float) -> None:
        """The end of the epoch of `row` (a metrics row), `seconds` into the run."""
        self.history.append(row)
        self.epoch, self.seconds = row["epoch"], seconds
        if row["top1"] > self.best["top1"]:
            self.best = {"top1": row["top1"], "epoch": row["epoch"]}

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint, with `rng` (every process's `rng_state`, in rank order)."""
        return {
            "format": TRAINING_FORMAT,
            "model": self.model.state_dict(),
            "model_name": self.model_name,
            "model_args": self.model_args,
            "pretrained_cfg": self.pretrained_cfg,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng,
            "epoch": self.epoch,
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "best": self.best,
            "epoch_progress": self.epoch_progress,
            "config": self.config,
        }

    def save(self, rng: list[dict[str, Any]]) -> None:
        """Write last.pth: the point from which a resume goes on."""
        save_atomic(self.state_dict(rng), self.last)

    def copy_epoch(self) -> None:
        """At an epoch's end, after `save`: last.pth copied to epoch_NNNN.pth (the last `keep_epochs` of them are
        kept) and, when the epoch is the best so far, to best.pth. Repeating it is harmless, which a resume does to
        finish what a kill left undone."""
        if self.keep_epochs:
            copy_atomic(self.last, self.directory / f"epoch_{self.epoch:04d}.pth")
            for old in sorted(self.directory.glob("epoch_*.pth"))[:-self.keep_epochs]:
                old.unlink()
        if self.best["epoch"] == self.epoch:
            copy_atomic(self.last, self.directory / "best.pth")

    def load(self, path: Path, rank: int = 0, world: int = 1) -> None:
        """Restore the checkpoint at `path`; this process's random generators too when as many processes wrote
        it (with another number each keeps its fresh seeding)."""
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume from: no checkpoint {path}")
        saved = resumable_checkpoint(path, mmap=False)
        progress = saved.get("epoch_progress")
        if progress is not None and len(progress) != world:
            raise ValueError(f"{path} was written inside epoch {saved['epoch'] + 1} by {len(progress)} processes: "
                             f"resume it with as many, or from an epoch's checkpoint (epoch_NNNN.pth)")
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path} does not fit this run's model and optimizer "
                             f"({str(e).splitlines()[0]}): it is another run's checkpoint") from None
        if saved["scaler"]:  # empty from a run without fp16 (train.amp may change on a resume)
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        if len(saved["rng"]) == world:
            set_rng_state(saved["rng"][rank])
        self.epoch, self.step, self.seconds = saved["epoch"], saved["step"], saved["seconds"]
        self.history, self.best, self.epoch_progress = saved["history"], saved["best"], progress


def checkpoint_note(path: Path) -> str:
    """Where a stopped run can go on from, and how."""
    state = read_training_checkpoint(path)
    if state is None:
        return "no checkpoint was written before it, so start it again with the change"
    return (f"the last good checkpoint is {path} (step {state['step']}): go on from it with the change, "
            f"`cvt train --resume --output {path.parent} KEY=VALUE`")


# The pretrained_cfg fields a run sets from its data config (build_model) and its checkpoints keep.
TRAINED_CFG = ("input_size", "crop_pct", "crop_mode")


def build_model(model_cfg: dict, num_classes: int,
                data_cfg: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The configured model, from scratch or fine-tuned from `pretrained`, and a note on where its weights came
    from. Fine-tuning keeps a checkpoint's architecture (under `model.args`) but not its image size, zoo name or
    labels, so that weights trained at 224 move to a 384 model and a head of another class count is replaced.

    With the run's `data_cfg`, the model's pretrained_cfg says how its held-out images are prepared (TRAINED_CFG:
    data.img_size and the eval crop), which its checkpoints carry to `cvt predict`, `cvt eval`, `cvt export` and
    `timm.data.resolve_model_data_config`."""
    name, args = model_cfg["name"], dict(model_cfg["args"] or {})
    if not model_cfg["pretrained"]:
        model, provenance = create_model(name, num_classes=num_classes, **args), {}
    else:
        checkpoint = load_checkpoint(model_cfg["pretrained"])
        checkpoint = dataclasses.replace(checkpoint, model_name=None, pretrained_cfg={}, model_args={
            k: v for k, v in checkpoint.model_args.items() if k != "img_size"})
        model = create_model(name, num_classes=num_classes, pretrained=checkpoint, **args)
        if model_cfg["reset_head"]:
            model.reset_classifier(num_classes)
        provenance = {"pretrained": str(model_cfg["pretrained"]), "pretrained_classes": checkpoint.num_classes,
                      "head_replaced": model_cfg["reset_head"] or checkpoint.num_classes != num_classes}
    if data_cfg is not None:
        # The held-out set's transform (build_data): data.img_size, and the data config's crop, else the zoo's.
        crop_pct, crop_mode = eval_crop(data_cfg, ZOO[name][1])
        size = data_cfg["img_size"]
        model.pretrained_cfg = model.default_cfg = dict(
            model.pretrained_cfg, input_size=(model.in_chans, size, size), crop_pct=crop_pct, crop_mode=crop_mode)
    return model, provenance


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and top-5 (%) and mean cross-entropy over the loader, summed over all processes (each holds its own
    shard of the held-out set, so nothing is counted twice)."""
    model.eval()
    # Sums on the device (loss, top-1, top-5) and counts on the host: a host-to-device copy per batch would wait.
    totals, images_seen, skipped_seen = torch.zeros(3, dtype=torch.float64, device=device), 0, 0
    for images, targets, skipped in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               top[:, 0].sum().double(), top.any(dim=1).sum().double()])
        images_seen, skipped_seen = images_seen + len(targets), skipped_seen + skipped
    totals = torch.cat([totals, totals.new_tensor([images_seen, skipped_seen])])
    loss, top1, top5, n, skipped = all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("the held-out set is empty: nothing to evaluate")
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(n),
            "skipped": int(skipped)}


def eval_loader(dataset, batch_size: int, workers: int, rank: int = 0, world: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Every `world`-th image from `rank` on: the shards partition the set without padding."""
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    return DataLoader(shard, batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
                      pin_memory=pin_memory)


def evaluate_checkpoint(checkpoint: str | os.PathLike, model_name: str | None = None,
                        data: dict[str, Any] | None = None, batch_size: int = 64,
                        device: str = "auto") -> dict[str, Any]:
    """Evaluate a checkpoint on a held-out split. A checkpoint written by `train` brings its data config (dataset,
    split, image size, eval transform); `data` keys override it, and are needed for any other checkpoint."""
    from timm.data import resolve_model_data_config

    state = read_training_checkpoint(checkpoint)
    if state is not None:
        data_cfg = merge_config(DEFAULTS["data"], state["config"]["data"], "data.")
    elif data and data.get("dataset"):
        # The model's own eval transform at its native size, unless `data` says otherwise.
        data_cfg = dict(DEFAULTS["data"], eval_crop_pct=None, eval_crop_mode=None, img_size=None)
    else:
        raise ValueError(f"{checkpoint} was not written by `cvt train`: say which data to evaluate it on "
                         "(--data DATASET --root DIR)")
    data_cfg = merge_config(data_cfg, data or {}, "data.")
    model = load_model(checkpoint, model_name)
    model_cfg = resolve_model_data_config(model)  # what it was trained or evaluated at, carried by the checkpoint
    _, h, w = model_cfg["input_size"]
    data_cfg["img_size"] = data_cfg["img_size"] or (h if h == w else (h, w))
    dataset, class_names = build_eval_dataset(data_cfg, model_cfg)
    if len(class_names) != model.num_classes:
        raise ValueError(f"{data_cfg['dataset']} has {len(class_names)} classes but the model predicts "
                         f"{model.num_classes}: evaluate it on the data it was trained or fine-tuned for")
    device_ = pick_device(device)
    fast = optimize_for_inference(model.to(device_), compile=False)
    result = evaluate(fast, eval_loader(dataset, batch_size, data_cfg["workers"]), device_)
    return dict(result, dataset=data_cfg["dataset"], img_size=data_cfg["img_size"], checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# Training: the parts `train` wires

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_config(config: dict) -> dict:
    """`config` laid over the defaults, and checked before any set-up: the model name, the length, train.amp."""
    cfg = merge_config(DEFAULTS, config)
    t_cfg = cfg["train"]
    if cfg["model"]["name"] not in ZOO:
        raise unknown_model_error(cfg["model"]["name"])
    if not (t_cfg["epochs"] >= 1 or (t_cfg["steps"] or 0) >= 1):
        raise ValueError("train.epochs (or train.steps) must be at least 1")
    if t_cfg["amp"] not in AMP_DTYPES:
        raise ValueError(f"train.amp must be null, bf16 or fp16, got {t_cfg['amp']!r}")
    if t_cfg["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e "
                         "'.[tensorboard]' in the repository), or set train.tensorboard=false")
    return cfg


@dataclasses.dataclass
class TrainingData:
    """The data and how the run goes through it: this process's micro-batches, `accumulation` of them per
    optimizer step, `steps_per_epoch`, and the run's length (`epochs`, `total_steps`)."""

    seed: int
    class_names: list[str]
    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader  # of EpochSamples through a ResumableSampler, or of a stream (wds)
    train_order: Any          # what set_epoch(epoch, skip) shuffles: the ResumableSampler, or the stream itself
    val_loader: DataLoader    # this process's shard of the held-out set
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    epochs: int
    total_steps: int

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle and augment for `epoch`, from its `skip`-th micro-batch on (a resume inside the epoch)."""
        self.train_loader.dataset.epoch = epoch
        self.train_order.set_epoch(epoch, skip * self.micro_batch)


class EpochSamples(Dataset):
    """The training set, each sample augmented under its own seed (the run's seed, the epoch, the index): an image
    gets the same augmentation in an epoch whichever worker loads it and wherever a resume starts, so skipping the
    samples a checkpoint had seen resumes exactly. The process's own generators are left as they were."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return call_seeded(sample_seed(self.seed, self.epoch, index), lambda: self.dataset[index])


class ResumableSampler(Sampler):
    """An epoch's indices from `sampler` (a DistributedSampler), from the `skip`-th on."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def build_data(cfg: dict, processes: Processes) -> TrainingData:
    d_cfg, t_cfg, world = cfg["data"], cfg["train"], processes.world
    micro = t_cfg["micro_batch_size"] or t_cfg["batch_size"] // world
    if micro < 1 or t_cfg["batch_size"] % (micro * world):
        raise ValueError(f"train.batch_size {t_cfg['batch_size']} is not a multiple of micro_batch_size {micro} x "
                         f"{world} processes: make it one, so that gradient accumulation reaches it exactly")
    accumulation = t_cfg["batch_size"] // (micro * world)
    train_set, val_set, class_names = build_datasets(d_cfg, ZOO[cfg["model"]["name"]][1],
                                                     Readers(processes.rank, world, micro, cfg["seed"]))
    pin_memory = processes.device.type == "cuda"
    if isinstance(train_set, IterableDataset):
        # A stream (wds) splits itself across ranks and workers, and shuffles, seeds and skips by its set_epoch.
        order, loader_set, loader_args = train_set, train_set, {}
        val_loader = DataLoader(val_set, micro, num_workers=d_cfg["workers"], collate_fn=collate_skipping,
                                pin_memory=pin_memory)
    else:
        sampler, sampled = train_sampler(train_set, d_cfg["repeated_aug"], processes.rank, world, cfg["seed"])
        order = ResumableSampler(sampler)
        loader_set, loader_args = EpochSamples(sampled, cfg["seed"]), {"sampler": order}
        val_loader = eval_loader(val_set, micro, d_cfg["workers"], processes.rank, world, pin_memory)
    # Workers restart every epoch (not persistent) so that they take the epoch of EpochSamples; the loader's own
    # generator draws their seeds, so that the draw leaves the process's generator, which a checkpoint keeps, alone.
    train_loader = DataLoader(loader_set, micro, num_workers=d_cfg["workers"], collate_fn=collate_skipping,
                              drop_last=True, pin_memory=pin_memory, generator=torch.Generator(), **loader_args)
    steps_per_epoch = len(train_loader) // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch of "
                         f"{t_cfg['batch_size']}: lower train.batch_size")
    if t_cfg["steps"]:
        total_steps, epochs = t_cfg["steps"], math.ceil(t_cfg["steps"] / steps_per_epoch)
    else:
        total_steps, epochs = t_cfg["epochs"] * steps_per_epoch, t_cfg["epochs"]
    return TrainingData(cfg["seed"], class_names, train_set, val_set, train_loader, order, val_loader, micro,
                        accumulation, steps_per_epoch, epochs, total_steps)


@dataclasses.dataclass
class TrainingModels:
    """The model being trained, in the form each use needs."""

    model: nn.Module            # the weights: what the optimizer updates and checkpoints hold
    ema: Any                    # timm's ModelEmaV3 of them (train.ema_decay), or None
    compiled: nn.Module         # what evaluation runs: torch.compile's wrapper (model.compile), else the model
    distributed: nn.Module      # what training runs: `compiled` in DistributedDataParallel under torchrun
    provenance: dict[str, Any]  # where the weights came from (`build_model`)

    @property
    def ema_model(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None


def build_models(cfg: dict, processes: Processes, num_classes: int) -> TrainingModels:
    from timm.utils import ModelEmaV3

    m_cfg, device = cfg["model"], processes.device
    model, provenance = build_model(m_cfg, num_classes, cfg["data"])
    if provenance.get("head_replaced"):
        processes.log(f"fine-tuning from {provenance['pretrained']}: new {num_classes}-class head "
                      f"(the checkpoint's had {provenance['pretrained_classes']})")
    model.to(device)
    model.set_grad_checkpointing(m_cfg["grad_checkpointing"])
    if cfg["train"]["accel"]:
        accelerate_training(model, device, compiled=m_cfg["compile"])
    if m_cfg["sync_bn"] and processes.world > 1:
        if device.type != "cuda":
            raise ValueError("model.sync_bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): "
                             "unset it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEmaV3(model, decay=cfg["train"]["ema_decay"]) if cfg["train"]["ema_decay"] else None
    compiled = compile_model(model) if m_cfg["compile"] else model
    distributed = compiled
    if processes.world > 1:
        distributed = nn.parallel.DistributedDataParallel(compiled,
                                                          device_ids=[device] if device.type == "cuda" else None)
    return TrainingModels(model, ema, compiled, distributed, provenance)


@dataclasses.dataclass
class Optimization:
    """The optimizer and its per-step schedule, mixed precision, and the loss (with Mixup / CutMix)."""

    lr: float                       # train.lr, scaled to the batch size by train.lr_base_batch
    optimizer: torch.optim.Optimizer
    scheduler: Any                  # timm's CosineLRScheduler, stepped per optimizer step
    scaler: torch.amp.GradScaler    # on for fp16 only
    amp_dtype: torch.dtype | None
    clip_grad: float | None
    mixup: Any                      # timm's Mixup, or None
    criterion: nn.Module

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_optimization(t_cfg: dict, model: nn.Module, data: TrainingData, device: torch.device) -> Optimization:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    lr = t_cfg["lr"] * (t_cfg["batch_size"] / t_cfg["lr_base_batch"] if t_cfg["lr_base_batch"] else 1)
    # torch's Adam/AdamW: one fused kernel per step over all parameters, on the CPU and CUDA alike.
    fused = {"fused": True} if t_cfg["optimizer"] in ("adam", "adamw") else {}
    optimizer = create_optimizer_v2(model, opt=t_cfg["optimizer"], lr=lr, weight_decay=t_cfg["weight_decay"],
                                    momentum=t_cfg["momentum"], layer_decay=t_cfg["layer_decay"], **fused)
    # Warm-up from warmup_lr, cosine decay to min_lr, then the cool-down epochs at min_lr.
    cosine_steps = max(1, data.total_steps - t_cfg["cooldown_epochs"] * data.steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=cosine_steps, lr_min=t_cfg["min_lr"],
                                  warmup_t=round(t_cfg["warmup_epochs"] * data.steps_per_epoch),
                                  warmup_lr_init=t_cfg["warmup_lr"], t_in_epochs=False)
    amp_dtype = AMP_DTYPES[t_cfg["amp"]]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup = None
    if t_cfg["mixup"] > 0 or t_cfg["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=t_cfg["mixup"], cutmix_alpha=t_cfg["cutmix"], prob=t_cfg["mixup_prob"],
                      switch_prob=t_cfg["mixup_switch_prob"], label_smoothing=t_cfg["label_smoothing"],
                      num_classes=len(data.class_names))
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=t_cfg["label_smoothing"])
    return Optimization(lr, optimizer, scheduler, scaler, amp_dtype, t_cfg["clip_grad"], mixup, criterion)


def new_training_state(cfg: dict, output_dir: Path, models: TrainingModels, optimization: Optimization,
                       class_names: list[str]) -> TrainingState:
    """The state of a run at its start, with the description its checkpoints carry."""
    return TrainingState(
        directory=output_dir, keep_epochs=cfg["train"]["keep_epoch_checkpoints"], model=models.model,
        optimizer=optimization.optimizer, scaler=optimization.scaler,
        ema=models.ema_model, model_name=cfg["model"]["name"],
        model_args={k: v for k, v in models.model.config.items() if k != "num_classes"},
        pretrained_cfg={"label_names": class_names, **{k: models.model.pretrained_cfg[k] for k in TRAINED_CFG}},
        config=cfg)


def recorded_config(checkpoint: str | os.PathLike) -> dict:
    """The config a training checkpoint records: what a resume goes on with."""
    return resumable_checkpoint(checkpoint)["config"]


def resume(state: TrainingState, checkpoint: Path, changes: list[str], optimization: Optimization,
           data: TrainingData, processes: Processes) -> None:
    """Load `checkpoint` into `state` and set the learning rate this config's schedule gives its step: a new
    train.lr or length re-plans the schedule from there."""
    state.load(checkpoint, processes.rank, processes.world)
    if state.step > data.total_steps:
        raise ValueError(f"{checkpoint} is at step {state.step} (epoch {state.epoch}), past the {data.total_steps} "
                         "steps this config trains: give train.epochs (or train.steps) at least that many")
    optimization.scheduler.step_update(state.step)
    where = f"epoch {state.epoch}" + (" and part of the next" if state.epoch_progress else "")
    changed = f"; changed: {', '.join(changes)}" if changes else ""
    processes.log(f"resumed from {checkpoint}: {where}, step {state.step}{changed}")


def describe_run(cfg: dict, data: TrainingData, models: TrainingModels, optimization: Optimization,
                 processes: Processes) -> str:
    """The log line that opens a run."""
    return (f"{cfg['name']}: {cfg['model']['name']} ({count_params(models.model):,} parameters) on "
            f"{cfg['data']['dataset']} ({len(data.train_set)} training / {len(data.val_set)} held-out images, "
            f"{len(data.class_names)} classes), {data.epochs} epochs of {data.steps_per_epoch} steps, batch "
            f"{cfg['train']['batch_size']} = {data.micro_batch} x {processes.world} processes x "
            f"{data.accumulation} accumulated, lr {optimization.lr:.3g}, {processes.device}")


def epochs_of_this_run(t_cfg: dict, data: TrainingData, state: TrainingState) -> Iterator[int]:
    """The epochs this run trains: from the checkpoint's on, until the last step, or train.epochs_per_run of them."""
    end = data.epochs
    if t_cfg["epochs_per_run"]:
        end = min(end, state.epoch + t_cfg["epochs_per_run"])
    for epoch in range(state.epoch, end):
        if state.step >= data.total_steps:
            return
        yield epoch


class FirstNonFiniteLoss:
    """This process's first non-finite loss: its optimizer step (0: none yet) and value. They stay on the device,
    so that noting each loss costs no read by the host."""

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), device=device)
        self.value = torch.zeros((), device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.step == 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss.float(), self.value)

    def read_loss(self, loss: torch.Tensor, epoch: int, step: int, last_checkpoint: Path) -> float:
        """`loss` on the host; raises FloatingPointError, in every process together, if any process has noted a
        non-finite loss (their count is summed). One read of the device for both."""
        diverged = all_reduce_sum((self.step > 0).float())
        loss_now, diverged, first_step, first_loss = torch.stack([loss.float(), diverged, self.step,
                                                                  self.value]).tolist()
        if diverged:
            where = (f"is {first_loss} at epoch {epoch + 1}, step {int(first_step)}" if first_step
                     else f"stopped being finite in another process by epoch {epoch + 1}, step {step}")
            raise FloatingPointError(
                f"the loss {where}: training diverged and stopped. Lower train.lr, set train.clip_grad, or use "
                f"train.amp=bf16 rather than fp16; {checkpoint_note(last_checkpoint)}")
        return loss_now


def mix_batch(mixup: Any, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup / CutMix of the batch (soft targets), or the batch as it is without them."""
    if mixup is None:
        return images, targets
    if len(images) % 2:  # a skipped image left an odd batch: Mixup pairs images
        images, targets = images[:-1], targets[:-1]
    return mixup(images, targets)


def backward(model: nn.Module, optimization: Optimization, images: torch.Tensor, targets: torch.Tensor,
             accumulation: int, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch, its gradient scaled for accumulation; returns the loss, detached.
    `sync=False` skips DDP's gradient all-reduce: the last micro-batch of each step does it."""
    amp_dtype = optimization.amp_dtype
    with nullcontext() if sync else model.no_sync():
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = optimization.criterion(model(images), targets)
        optimization.scaler.scale(loss / accumulation).backward()
    return loss.detach()


def optimizer_step(models: TrainingModels, optimization: Optimization, state: TrainingState) -> None:
    """One step on the accumulated gradients (clipped to train.clip_grad), then the schedule's and the EMA's."""
    optimizer, scaler = optimization.optimizer, optimization.scaler
    if optimization.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(models.model.parameters(), optimization.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    optimization.scheduler.step_update(state.step)
    if models.ema is not None:
        models.ema.update(models.model, step=state.step)


@dataclasses.dataclass
class EpochProgress:
    """This process's sums over the micro-batches of the epoch so far. A checkpoint inside the epoch keeps them, so
    that a resumed epoch's metrics are the whole epoch's."""

    micro_steps: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0


def save_checkpoint(state: TrainingState, processes: Processes, progress: EpochProgress | None = None) -> None:
    """last.pth with every process's random generators and, inside an epoch, its `progress`: gathered by all the
    processes together, written by the main one."""
    gathered = gather((rng_state(), dataclasses.asdict(progress) if progress else None), processes.world)
    state.epoch_progress = [p for _, p in gathered] if progress else None
    if processes.is_main:
        state.save([rng for rng, _ in gathered])


def train_one_epoch(epoch: int, models: TrainingModels, optimization: Optimization, data: TrainingData,
                    state: TrainingState, processes: Processes, t_cfg: dict) -> dict[str, float]:
    """The optimizer steps of `epoch` from where the run is in it (fewer where train.steps ends the run in it),
    writing last.pth every train.checkpoint_every_steps. Returns the epoch's mean training loss and the images
    skipped (both over all processes), its speed and its seconds."""
    from tqdm import tqdm

    device, world, every = processes.device, processes.world, t_cfg["checkpoint_every_steps"]
    before = EpochProgress(**state.epoch_progress[processes.rank]) if state.epoch_progress else EpochProgress()
    done = state.step - epoch * data.steps_per_epoch  # the epoch's steps before a resume inside it
    data.start_epoch(epoch, skip=done * data.accumulation)
    models.distributed.train()
    steps = min(data.steps_per_epoch, data.total_steps - epoch * data.steps_per_epoch) - done
    micro_steps = steps * data.accumulation
    loss_sum, non_finite = torch.tensor(before.loss_sum, device=device), FirstNonFiniteLoss(device)
    skipped, images_seen, started = before.skipped, before.images, time.time() - before.seconds
    batches = tqdm(itertools.islice(data.train_loader, micro_steps), total=micro_steps,
                   desc=f"epoch {epoch + 1}/{data.epochs}", disable=not (processes.is_main and t_cfg["progress"]),
                   leave=False, dynamic_ncols=True)
    for i, (images, targets, n_skipped) in enumerate(batches):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        images, targets = mix_batch(optimization.mixup, images, targets)
        update = (i + 1) % data.accumulation == 0
        loss = backward(models.distributed, optimization, images, targets, data.accumulation,
                        sync=update or world == 1)
        non_finite.note(loss, state.step + 1)
        loss_sum += loss
        skipped, images_seen = skipped + n_skipped, images_seen + len(images)
        if not update:
            continue
        optimizer_step(models, optimization, state)
        if state.step % CHECK_EVERY == 0 or i + 1 == micro_steps:
            loss_now = non_finite.read_loss(loss, epoch, state.step, state.last)
            batches.set_postfix(loss=f"{loss_now:.3f}", lr=f"{optimization.current_lr:.2e}",
                                img_s=f"{images_seen * world / (time.time() - started):.0f}")
        if every and state.step % every == 0 and i + 1 < micro_steps:
            non_finite.read_loss(loss, epoch, state.step, state.last)  # never checkpoint a diverged run
            save_checkpoint(state, processes, EpochProgress(before.micro_steps + i + 1, loss_sum.item(), skipped,
                                                            images_seen, time.time() - started))
    batches.close()
    seconds = time.time() - started
    mean_loss = loss_sum / (before.micro_steps + micro_steps)
    train_loss, skipped = all_reduce_sum(torch.stack([mean_loss, torch.tensor(float(skipped), device=device)])).tolist()
    return {"train_loss": train_loss / world, "skipped": skipped,
            "images_per_second": images_seen * world / seconds, "seconds": seconds}


def evaluate_epoch(epoch: int, trained: dict[str, float], models: TrainingModels, optimization: Optimization,
                   data: TrainingData, state: TrainingState, processes: Processes) -> dict[str, Any]:
    """Evaluate the model (and its EMA) on the held-out set; returns the epoch's row of metrics.jsonl."""
    from timm.utils import distribute_bn

    device, amp_dtype = processes.device, optimization.amp_dtype
    ema = models.ema_model
    if processes.world > 1:  # every process evaluates rank 0's BatchNorm statistics, the ones its checkpoint holds
        for bn_model in (models.model, ema) if ema is not None else (models.model,):
            distribute_bn(bn_model, processes.world, reduce=False)
    val = evaluate(models.compiled, data.val_loader, device, amp_dtype)
    row = {"epoch": epoch + 1, "step": state.step, "lr": optimization.current_lr,
           "train_loss": trained["train_loss"], "val_loss": val["loss"], "top1": val["top1"], "top5": val["top5"],
           "images_per_second": trained["images_per_second"], "epoch_seconds": trained["seconds"],
           "skipped_images": int(trained["skipped"] + val["skipped"])}
    if ema is not None:
        ema_val = evaluate(ema, data.val_loader, device, amp_dtype)
        row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"], ema_loss=ema_val["loss"])
    return row


def describe_epoch(row: dict[str, Any], epochs: int) -> str:
    """The log line of an epoch's metrics row."""
    ema_note = f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else ""
    skip_note = f", skipped {row['skipped_images']} unreadable images" if row["skipped_images"] else ""
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, held-out loss "
            f"{row['val_loss']:.4f}, top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%{ema_note}, lr "
            f"{row['lr']:.2e}, {row['epoch_seconds']:.1f} s ({row['images_per_second']:.0f} img/s){skip_note}")


def summarize(cfg: dict, state: TrainingState, data: TrainingData, models: TrainingModels,
              processes: Processes) -> dict[str, Any]:
    """The run's result: the last epoch's metrics, the best epoch, and what ran where."""
    final = state.history[-1]
    summary = {
        "name": cfg["name"], "model": cfg["model"]["name"], "dataset": cfg["data"]["dataset"],
        "num_classes": len(data.class_names), "img_size": cfg["data"]["img_size"], "top1": final["top1"],
        "top5": final["top5"], "loss": final["val_loss"], "best_top1": state.best["top1"],
        "best_epoch": state.best["epoch"], "epochs": final["epoch"], "total_epochs": data.epochs,
        "steps": final["step"], "finished": final["epoch"] == data.epochs, "seconds": state.seconds,
        "params": count_params(models.model), "device": str(processes.device), "world_size": processes.world,
        "checkpoint": str(state.last), **models.provenance,
    }
    if models.ema is not None:
        summary.update(ema_top1=final["ema_top1"], ema_top5=final["ema_top5"], ema_loss=final["ema_loss"])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Training

class EpochRecord:
    """What the main process writes at each epoch's end after last.pth: its copies (`TrainingState.copy_epoch`),
    metrics.jsonl and metrics.csv, curves.png, and with train.tensorboard TensorBoard's scalars. Each write repeats
    harmlessly, so a resume does them again for an epoch whose last.pth a kill left without them."""

    def __init__(self, cfg: dict, state: TrainingState, models: TrainingModels):
        self.state = state
        self.title = (f"{cfg['name']}: {cfg['model']['name']} ({count_params(models.model):,} parameters) on "
                      f"{cfg['data']['dataset']}")
        self.tensorboard = None
        if cfg["train"]["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: the scalars an earlier, killed attempt logged past the resumed step are dropped
            self.tensorboard = SummaryWriter(str(state.directory / "tensorboard"), purge_step=state.step or None)

    def write(self) -> None:
        state = self.state
        state.copy_epoch()
        write_metrics(state.history, state.directory)
        plot_curves(state.history, state.directory / "curves.png", title=self.title)
        if self.tensorboard is not None:
            row = state.history[-1]
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key, value, global_step=row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def adapted_to_device(cfg: dict, processes: Processes) -> dict:
    """`cfg` as this machine runs it well, each change said once. On the CPU, fp16 autocast is slower than
    float32 and its gradient scaler does nothing there, so the run trains in float32; more loader workers than the
    CPU cores a process has only contend for them, so they are cut to that many. Checkpoints record the recipe's
    values, so a resume on a GPU machine gets them back."""
    run = copy.deepcopy(cfg)
    if processes.device.type == "cpu" and run["train"]["amp"] == "fp16":
        run["train"]["amp"] = None
        processes.log("train.amp=fp16 on the CPU: float16 autocast is slower there than float32, so this run "
                      "trains in float32 (train.amp=bf16 or train.amp=null chooses explicitly)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if run["data"]["workers"] > cores:
        processes.log(f"data.workers={run['data']['workers']}, but each training process here has {cores} CPU "
                      f"cores: using {cores} loader workers (set data.workers to at most {cores} to choose)")
        run["data"]["workers"] = cores
    return run


def train(config: dict, output_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Run one training, or go on with one (`train.resume`); returns the summary also written to summary.json.

    The output folder is the run's alone while it runs (`RunFolder`). A new run into a folder holding an earlier
    run is refused unless `overwrite`, which deletes the earlier run's files first. A resumed run goes on with the
    config its checkpoint records; `config` may change only the RESUMABLE keys."""
    cfg = training_config(config)
    processes = setup_distributed(cfg["train"]["device"])
    folder = RunFolder(Path(output_dir))
    try:
        checkpoint = on_main(processes, lambda: folder.claim(cfg["train"]["resume"], overwrite))
        changes = resume_changes(recorded_config(checkpoint), cfg) if checkpoint is not None else []
        return run_training(cfg, folder.directory, checkpoint, changes, processes)
    finally:
        folder.release()
        if processes.started_group:
            dist.destroy_process_group()


def run_training(cfg: dict, output_dir: Path, checkpoint: Path | None, changes: list[str],
                 processes: Processes) -> dict[str, Any]:
    """The run itself, in a folder `train` holds: set-up, the epochs from the checkpoint's on, the summary."""
    run_cfg = adapted_to_device(cfg, processes)
    t_cfg = run_cfg["train"]
    seed_everything(cfg["seed"])  # the same initial weights on every process
    data = build_data(run_cfg, processes)
    models = build_models(run_cfg, processes, len(data.class_names))
    optimization = build_optimization(t_cfg, models.model, data, processes.device)
    state = new_training_state(cfg, output_dir, models, optimization, data.class_names)
    seed_everything(cfg["seed"] + processes.rank)  # each process its own augmentation and dropout
    if checkpoint is not None:
        resume(state, checkpoint, changes, optimization, data, processes)
    processes.log(describe_run(cfg, data, models, optimization, processes))
    record = EpochRecord(cfg, state, models) if processes.is_main else None
    if record is not None and state.history and state.epoch_progress is None:
        record.write()  # what a kill after the last epoch's last.pth left undone
    started = time.time() - state.seconds  # the seconds of the runs before this one count
    for epoch in epochs_of_this_run(t_cfg, data, state):
        trained = train_one_epoch(epoch, models, optimization, data, state, processes, t_cfg)
        row = evaluate_epoch(epoch, trained, models, optimization, data, state, processes)
        state.record(row, seconds=time.time() - started)
        save_checkpoint(state, processes)
        if record is not None:
            record.write()
        processes.log(describe_epoch(row, data.epochs))
    state.seconds = time.time() - started
    summary = summarize(cfg, state, data, models, processes)
    if record is not None:
        write_atomic(state.directory / "summary.json", json.dumps(summary, indent=2))
        record.close()
    return summary
