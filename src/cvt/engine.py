"""The one training loop: the paper's ImageNet recipes, fine-tuning and the digits default, on a CPU, a GPU or
many of them (`torchrun`).

    config = load_config("configs/cvt13_imagenet.yaml", ["train.epochs=10"])
    summary = train(config, "runs/cvt13")

`train` reads top to bottom: distributed set-up, data, model, optimisation, resume, the loop, the end of each
epoch (evaluate, checkpoint, log) and the summary. Everything it writes goes into the output directory:
`last.pth` (every epoch), `best.pth`, the last few `epoch_NNNN.pth`, `metrics.jsonl` / `metrics.csv`,
`curves.png` and `summary.json`; files are written to a temporary name and renamed, so none is ever half-written.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import io
import itertools
import json
import math
import os
import pickle
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from .data import build_datasets, build_eval_dataset, collate_skipping, eval_crop
from .fast import compile_model, move_to, release_cpu_buffers, reuse_cpu_buffers
from .files import copy_atomic, save_atomic, write_atomic, yaml_load
from .flops import count_params
from .model import ZOO, create_model, unknown_model_error
from .weights import TRAINING_FORMAT, load_checkpoint, model_from_checkpoint

# Every key a recipe may set. The values are the built-in default run (`cvt train` with no config, `make demo`;
# configs/digits.yaml spells it out): a small CvT on scikit-learn's 8 x 8 digits upsampled to 32 x 32, in about
# two minutes on a 2-core CPU. The recipes in configs/ give every value that matters for them.
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
    },
    "data": {
        "dataset": "digits",                  # digits, imagefolder, cifar10, cifar100, pets, flowers102
        "root": None,
        "img_size": 32,
        "val_fraction": 0.2,                  # digits: the held-out share
        "workers": 0,                         # loader processes per training process
        "bad_images": "error",                # or "skip": leave unreadable images out and count them
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
        "resume": None,                       # true: OUTPUT/last.pth, or a checkpoint path
        "epochs_per_run": None,               # stop after this many epochs (time-limited jobs), then resume
        "keep_epoch_checkpoints": 3,
        "progress": True,                     # tqdm bar
    },
}
# Optimizer steps between the host's reads of the loss (the progress bar, the divergence check). A read waits for
# the device to finish all queued work, so it is not done every step.
CHECK_EVERY = 10

# ---------------------------------------------------------------------------------------------------------------
# Configuration

def merge_config(base: dict, update: dict, where: str = "") -> dict:
    """`base` with `update` laid over it; a key `base` lacks is an error suggesting the close ones.

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
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A recipe: the defaults, the YAML file at `path` (None: the built-in digits default) and dotted
    `key=value` overrides with YAML-typed values (`train.lr=1e-3`, `model.args.depths=[1,2,10]`)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path} (the recipes are in configs/)")
        recipe = yaml_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} is not a YAML mapping of config sections")
        config = merge_config(config, recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected a dotted key=value override (e.g. train.epochs=5), got {item!r}")
        value = yaml_load(text)
        if key.startswith("model.args."):  # one CvT argument; the recipe's others stay
            key, value = "model.args", {**config["model"]["args"], key[len("model.args."):]: value}
        *parents, last = key.split(".")
        for parent in reversed(parents):  # "a.b=v" becomes {"a": {"b": v}}, checked by merge_config
            value = {last: value}
            last = parent
        config = merge_config(config, {last: value})
    return config


# ---------------------------------------------------------------------------------------------------------------
# Processes, devices, randomness

def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group). torchrun sets WORLD_SIZE and friends:
    NCCL on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return (dist.get_rank() if world > 1 else 0), world, device, started


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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Files

def write_metrics(rows: list[dict[str, Any]], output_dir: Path) -> None:
    """metrics.jsonl and metrics.csv: one row per epoch."""
    write_atomic(output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output_dir / "metrics.csv", text.getvalue())


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss (training and held-out) and held-out top-1 per epoch."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the caller's process

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="training")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="held-out")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["top1"] for r in rows], label="model")
    if "ema_top1" in rows[0]:
        ax_acc.plot(epochs, [r["ema_top1"] for r in rows], label="EMA")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="held-out top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Models and checkpoints

def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The whole state of a checkpoint written by `train` (config, optimizer, ...); None for any other file.

    Recognised by its content, whatever its name, as `weights.load_checkpoint` recognises it; mmap, so that reading
    the config or the epoch does not load the tensors."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError):
        return None
    return state if isinstance(state, dict) and state.get("format") == TRAINING_FORMAT else None


def build_model(model_cfg: dict, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The configured model, from scratch or fine-tuned from `pretrained`, and a note on where its weights came
    from. Fine-tuning keeps a checkpoint's architecture (under `model.args`) but not its image size, zoo name or
    labels, so that weights trained at 224 move to a 384 model and a head of another class count is replaced."""
    name, args = model_cfg["name"], dict(model_cfg["args"] or {})
    if not model_cfg["pretrained"]:
        return create_model(name, num_classes=num_classes, **args), {}
    checkpoint = load_checkpoint(model_cfg["pretrained"])
    checkpoint = dataclasses.replace(checkpoint, model_name=None, pretrained_cfg={},
                                     model_args={k: v for k, v in checkpoint.model_args.items() if k != "img_size"})
    model = create_model(name, num_classes=num_classes, pretrained=checkpoint, **args)
    if model_cfg["reset_head"]:
        model.reset_classifier(num_classes)
    return model, {"pretrained": str(model_cfg["pretrained"]), "pretrained_classes": checkpoint.num_classes,
                   "head_replaced": model_cfg["reset_head"] or checkpoint.num_classes != num_classes}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and top-5 (%) and mean cross-entropy over the loader, summed over all processes (each holds its own
    shard of the held-out set, so nothing is counted twice). On the CPU each batch reuses the buffers of the one
    before (`reuse_cpu_buffers`), which are freed at the end."""
    model.eval()
    # Sums on the device (loss, top-1, top-5) and counts on the host: a host-to-device copy per batch would wait.
    totals, images_seen, skipped_seen = torch.zeros(3, dtype=torch.float64, device=device), 0, 0
    for images, targets, skipped in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with (reuse_cpu_buffers(enabled=device.type == "cpu"),
              torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               top[:, 0].sum().double(), top.any(dim=1).sum().double()])
        images_seen, skipped_seen = images_seen + len(targets), skipped_seen + skipped
    release_cpu_buffers()
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
    model = model_from_checkpoint(checkpoint, model_name)
    data_cfg["img_size"] = data_cfg["img_size"] or model.pretrained_cfg["input_size"][-1]
    dataset, class_names = build_eval_dataset(data_cfg, model.pretrained_cfg)
    if len(class_names) != model.num_classes:
        raise ValueError(f"{data_cfg['dataset']} has {len(class_names)} classes but the model predicts "
                         f"{model.num_classes}: evaluate it on the data it was trained or fine-tuned for")
    device_ = pick_device(device)
    result = evaluate(move_to(model, device_), eval_loader(dataset, batch_size, data_cfg["workers"]), device_)
    return dict(result, dataset=data_cfg["dataset"], img_size=data_cfg["img_size"], checkpoint=str(checkpoint))


def checkpoint_note(path: Path) -> str:
    state = read_training_checkpoint(path)
    if state is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint is {path} (epoch {state['epoch']}); resume from it with --resume"


# ---------------------------------------------------------------------------------------------------------------
# Training

def train(config: dict, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Run one training (resuming if `train.resume` says so); returns the summary also written to summary.json."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3, distribute_bn
    from tqdm import tqdm

    cfg = merge_config(DEFAULTS, config)
    m_cfg, d_cfg, t_cfg = cfg["model"], cfg["data"], cfg["train"]
    if m_cfg["name"] not in ZOO:
        raise unknown_model_error(m_cfg["name"])
    amp_dtypes = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if not (t_cfg["epochs"] >= 1 or (t_cfg["steps"] or 0) >= 1):
        raise ValueError("train.epochs (or train.steps) must be at least 1")
    if t_cfg["amp"] not in amp_dtypes:
        raise ValueError(f"train.amp must be null, bf16 or fp16, got {t_cfg['amp']!r}")
    output_dir = Path(output_dir)
    rank, world, device, started_group = setup_distributed(t_cfg["device"])
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg["seed"])  # the same initial weights on every process

    # Data -------------------------------------------------------------------------------------------------
    train_set, val_set, class_names = build_datasets(d_cfg, ZOO[m_cfg["name"]][1])
    micro = t_cfg["micro_batch_size"] or t_cfg["batch_size"] // world
    if micro < 1 or t_cfg["batch_size"] % (micro * world):
        raise ValueError(f"train.batch_size {t_cfg['batch_size']} is not a multiple of micro_batch_size {micro} x "
                         f"{world} processes: make it one, so that gradient accumulation reaches it exactly")
    accum = t_cfg["batch_size"] // (micro * world)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader_rng = torch.Generator()  # reseeded every epoch: the workers' augmentation seeds survive a resume
    # Workers restart every epoch (not persistent) so that they take that epoch's seeds, which a resume repeats.
    train_loader = DataLoader(train_set, micro, sampler=sampler, num_workers=d_cfg["workers"],
                              collate_fn=collate_skipping, drop_last=True, pin_memory=device.type == "cuda",
                              generator=loader_rng)
    val_loader = eval_loader(val_set, micro, d_cfg["workers"], rank, world, device.type == "cuda")
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch of "
                         f"{t_cfg['batch_size']}: lower train.batch_size")
    if t_cfg["steps"]:
        total_steps = t_cfg["steps"]
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = t_cfg["epochs"]
        total_steps = epochs * steps_per_epoch

    # Model ------------------------------------------------------------------------------------------------
    model, provenance = build_model(m_cfg, len(class_names))
    if provenance.get("head_replaced"):
        log(f"fine-tuning from {provenance['pretrained']}: new {len(class_names)}-class head "
            f"(the checkpoint's had {provenance['pretrained_classes']})")
    move_to(model, device)
    if m_cfg["sync_bn"] and world > 1:
        if device.type != "cuda":
            raise ValueError("model.sync_bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): "
                             "unset it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEmaV3(model, decay=t_cfg["ema_decay"]) if t_cfg["ema_decay"] else None
    run_model = compile_model(model) if m_cfg["compile"] else model
    train_model = run_model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(run_model,
                                                          device_ids=[device] if device.type == "cuda" else None)

    # Optimisation -----------------------------------------------------------------------------------------
    lr = t_cfg["lr"] * (t_cfg["batch_size"] / t_cfg["lr_base_batch"] if t_cfg["lr_base_batch"] else 1)
    # torch's Adam/AdamW: one fused kernel per step over all parameters, on the CPU and CUDA alike.
    fused = {"fused": True} if t_cfg["optimizer"] in ("adam", "adamw") else {}
    optimizer = create_optimizer_v2(model, opt=t_cfg["optimizer"], lr=lr, weight_decay=t_cfg["weight_decay"],
                                    momentum=t_cfg["momentum"], **fused)
    # Per-step cosine: warm-up from warmup_lr, decay to min_lr, then the cool-down epochs at min_lr.
    cosine_steps = max(1, total_steps - t_cfg["cooldown_epochs"] * steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=cosine_steps, lr_min=t_cfg["min_lr"],
                                  warmup_t=round(t_cfg["warmup_epochs"] * steps_per_epoch),
                                  warmup_lr_init=t_cfg["warmup_lr"], t_in_epochs=False)
    amp_dtype = amp_dtypes[t_cfg["amp"]]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup = None
    if t_cfg["mixup"] > 0 or t_cfg["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=t_cfg["mixup"], cutmix_alpha=t_cfg["cutmix"], prob=t_cfg["mixup_prob"],
                      switch_prob=t_cfg["mixup_switch_prob"], label_smoothing=t_cfg["label_smoothing"],
                      num_classes=len(class_names))
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=t_cfg["label_smoothing"])

    # Resume -----------------------------------------------------------------------------------------------
    start_epoch, step, seconds_before, history = 0, 0, 0.0, []
    best = {"top1": -1.0, "epoch": 0}
    last_path = output_dir / "last.pth"
    seed_everything(cfg["seed"] + rank)  # each process its own augmentation and dropout
    if t_cfg["resume"]:
        resume_path = last_path if t_cfg["resume"] is True else Path(t_cfg["resume"])
        if not resume_path.is_file():
            raise FileNotFoundError(f"nothing to resume from: no checkpoint {resume_path}")
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != TRAINING_FORMAT:
            raise ValueError(f"{resume_path} is not a training checkpoint written by `cvt train`; to start from its "
                             "weights, set model.pretrained instead")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        if len(state["rng"]) == world:  # with another number of processes each keeps its fresh seeding
            set_rng_state(state["rng"][rank])
        start_epoch, step, seconds_before = state["epoch"], state["step"], state["seconds"]
        history, best = state["history"], state["best"]
        log(f"resumed from {resume_path}: epoch {start_epoch}, step {step}")

    # The loop ---------------------------------------------------------------------------------------------
    params = count_params(model)
    log(f"{cfg['name']}: {m_cfg['name']} ({params:,} parameters) on {d_cfg['dataset']} "
        f"({len(train_set)} training / {len(val_set)} held-out images, {len(class_names)} classes), "
        f"{epochs} epochs of {steps_per_epoch} steps, batch {t_cfg['batch_size']} = {micro} x {world} processes x "
        f"{accum} accumulated, lr {lr:.3g}, {device}")
    t_start = time.time()
    epochs_this_run = 0
    for epoch in range(start_epoch, epochs):
        if step >= total_steps or (t_cfg["epochs_per_run"] and epochs_this_run >= t_cfg["epochs_per_run"]):
            break
        sampler.set_epoch(epoch)
        loader_rng.manual_seed(cfg["seed"] * 100_003 + epoch)
        train_model.train()
        micro_steps = min(steps_per_epoch, total_steps - step) * accum
        loss_sum = torch.zeros((), device=device)
        # The step and value of this process's first non-finite loss (step 0: none yet). They stay on the device
        # and are read every CHECK_EVERY steps.
        bad_step, bad_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        skipped, images_seen, t_epoch = 0, 0, time.time()
        progress = tqdm(itertools.islice(train_loader, micro_steps), total=micro_steps,
                        desc=f"epoch {epoch + 1}/{epochs}", disable=not (is_main and t_cfg["progress"]),
                        leave=False, dynamic_ncols=True)
        for i, (images, targets, n_skipped) in enumerate(progress):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            skipped += n_skipped
            if mixup is not None:
                if len(images) % 2:  # a skipped image left an odd batch: Mixup pairs images
                    images, targets = images[:-1], targets[:-1]
                images, targets = mixup(images, targets)
            update = (i + 1) % accum == 0
            # Accumulated micro-batches skip DDP's gradient all-reduce; the last one of each step does it.
            with nullcontext() if update or world == 1 else train_model.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = criterion(train_model(images), targets)
                scaler.scale(loss / accum).backward()
            first_bad = ~torch.isfinite(loss.detach()) & (bad_step == 0)
            bad_step = torch.where(first_bad, step + 1, bad_step)
            bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
            loss_sum += loss.detach()
            images_seen += len(images)
            if not update:
                continue
            if t_cfg["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t_cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            if step % CHECK_EVERY == 0 or i + 1 == micro_steps:
                # Every process raises together: the count of processes that saw a non-finite loss is summed.
                diverged = all_reduce_sum((bad_step > 0).float())
                loss_now, diverged, first_step, first_loss = torch.stack(
                    [loss.detach().float(), diverged, bad_step, bad_loss]).tolist()
                if diverged:
                    where = (f"is {first_loss} at epoch {epoch + 1}, step {int(first_step)}" if first_step
                             else f"stopped being finite in another process by epoch {epoch + 1}, step {step}")
                    raise FloatingPointError(
                        f"the loss {where}: training diverged and stopped; {checkpoint_note(last_path)}. Lower "
                        "train.lr, set train.clip_grad, or use train.amp=bf16 rather than fp16")
                progress.set_postfix(loss=f"{loss_now:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                     img_s=f"{images_seen * world / (time.time() - t_epoch):.0f}")
        progress.close()

        # End of the epoch: evaluate, checkpoint, log ----------------------------------------------------------
        epoch_seconds = time.time() - t_epoch
        train_loss, skipped = all_reduce_sum(torch.stack([loss_sum / micro_steps,
                                                          torch.tensor(float(skipped), device=device)])).tolist()
        if world > 1:  # every process evaluates rank 0's BatchNorm statistics, the ones its checkpoint holds
            for bn_model in (model, ema.module) if ema is not None else (model,):
                distribute_bn(bn_model, world, reduce=False)
        val = evaluate(run_model, val_loader, device, amp_dtype)
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": train_loss / world, "val_loss": val["loss"], "top1": val["top1"], "top5": val["top5"],
               "images_per_second": images_seen * world / epoch_seconds, "epoch_seconds": epoch_seconds,
               "skipped_images": int(skipped + val["skipped"])}
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device, amp_dtype)
            row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"], ema_loss=ema_val["loss"])
        history.append(row)
        if val["top1"] > best["top1"]:
            best = {"top1": val["top1"], "epoch": epoch + 1}
        epochs_this_run += 1
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if is_main:
            crop_pct, crop_mode = eval_crop(d_cfg, ZOO[m_cfg["name"]][1])
            state = {
                "format": TRAINING_FORMAT,
                "model": model.state_dict(),
                "model_name": m_cfg["name"],
                "model_args": {k: v for k, v in model.config.items() if k != "num_classes"},
                "pretrained_cfg": {"label_names": class_names, "crop_pct": crop_pct, "crop_mode": crop_mode},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "rng": rng,
                "epoch": epoch + 1,
                "step": step,
                "seconds": seconds_before + time.time() - t_start,
                "history": history,
                "best": best,
                "config": cfg,
            }
            save_atomic(state, last_path)
            if t_cfg["keep_epoch_checkpoints"]:
                copy_atomic(last_path, output_dir / f"epoch_{epoch + 1:04d}.pth")
                for old in sorted(output_dir.glob("epoch_*.pth"))[:-t_cfg["keep_epoch_checkpoints"]]:
                    old.unlink()
            if best["epoch"] == epoch + 1:
                copy_atomic(last_path, output_dir / "best.pth")
            write_metrics(history, output_dir)
            plot_curves(history, output_dir / "curves.png")
        ema_note = f", EMA top-1 {row['ema_top1']:.2f}%" if ema is not None else ""
        skip_note = f", skipped {row['skipped_images']} unreadable images" if row["skipped_images"] else ""
        log(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, held-out loss {val['loss']:.4f}, "
            f"top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%{ema_note}, lr {row['lr']:.2e}, "
            f"{epoch_seconds:.1f} s ({row['images_per_second']:.0f} img/s){skip_note}")

    # Summary ----------------------------------------------------------------------------------------------
    final = history[-1]
    summary = {
        "name": cfg["name"], "model": m_cfg["name"], "dataset": d_cfg["dataset"], "num_classes": len(class_names),
        "img_size": d_cfg["img_size"], "top1": final["top1"], "top5": final["top5"], "loss": final["val_loss"],
        "best_top1": best["top1"], "best_epoch": best["epoch"], "epochs": final["epoch"], "total_epochs": epochs,
        "steps": final["step"], "finished": final["epoch"] == epochs,
        "seconds": seconds_before + time.time() - t_start, "params": params, "device": str(device),
        "world_size": world, "checkpoint": str(last_path), **provenance,
    }
    if ema is not None:
        summary.update(ema_top1=final["ema_top1"], ema_top5=final["ema_top5"], ema_loss=final["ema_loss"])
    if is_main:
        write_atomic(output_dir / "summary.json", json.dumps(summary, indent=2))
    if started_group:
        dist.destroy_process_group()
    return summary
