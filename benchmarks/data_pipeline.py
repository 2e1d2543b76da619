"""Images per second per DataLoader worker of the paper's ImageNet training transform, stage by stage and changed.

Where the time goes, and what three candidate changes to the input pipeline would buy.

    python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline.md
    python benchmarks/data_pipeline.py --long-side 1000       # larger JPEGs, where reduced-size decoding applies
    python benchmarks/data_pipeline.py --quick                # a few images, one round: a check that it runs

One process, one thread (`torch.set_num_threads(1)`, as every DataLoader worker runs), does what a training worker
of the engine does: per sample `read_image` (the library's one image reader, Pillow) and the training transform as
`cvt.data.train_transform` builds it from the recipe (`--config`, by default configs/cvt13_imagenet.yaml:
RandomResizedCrop 224 at scale 0.08-1, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; timm leaves
colour jitter out under RandAugment, as the official code's timm did), inside `call_seeded` under the sample's own
seed as the engine's EpochSamples does, then the batch's collate. Mixup/CutMix (timm's, mixup 0.8, cutmix 1.0 over
a batch of `--batch-size`) runs in the training process on the device (engine.mix_batch, after the transfer), not in
a worker; it is timed apart, on `--device`.

The input is JPEGs that the script writes to a temporary folder: crops of scikit-learn's two sample photographs at
ImageNet's typical sizes (long side `--long-side`, 500 by default, in the aspect ratios 4:3, 3:4, 3:2, 2:3, 1:1 and
5:4, so 500x375, 375x500, 500x333, ...), Pillow quality 90 with its default 4:2:0 chroma subsampling. They are read
from the page cache: the figures are the CPU's work, not the disk's.

Candidates, each a whole worker path timed against the current one on the same images under the same seeds:

- `torchvision decode`: `torchvision.io.decode_jpeg` (its libjpeg-turbo) on the file's bytes, then a PIL image for
  the rest of the transform (timm's RandAugment works on PIL images); torchvision 0.29 deprecates these decoders
  in favour of TorchCodec's;
- `reduced-size decode`: the RandomResizedCrop box drawn on the JPEG header's size (the same draws as the current
  path), then the JPEG decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`) where the crop still
  holds at least as many source pixels as the 224 x 224 output in each direction, and resized from there;
- `uint8 out`: the transform ends with timm's `MaybePILToTensor` (a uint8 tensor, as timm's prefetcher loader does)
  and ToTensor/Normalize and random erasing move to the device, on the batch (their cost there is timed apart);
- the two that combine, `reduced-size decode + uint8 out`.

Each round takes every image through every path, the paths in turn image by image, with the same seeds every round;
an image's time in a stage or path is the least over the rounds (what it costs a core undisturbed by other work on
the machine), and the figures are the means over the images. The batch work takes the least of its repeats. The
table is printed; with `--out FILE` it is also written there as markdown.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features

from cvt.data import call_seeded, collate_skipping, read_image, train_transform
from cvt.engine import load_config
from cvt.files import write_atomic
from cvt.model import ZOO
from machine import describe_device

ROOT = Path(__file__).resolve().parents[1]
# (width, height) ratios of the written JPEGs, cycled: ImageNet's usual landscape and portrait shapes.
ASPECTS = ((4, 3), (3, 4), (3, 2), (2, 3), (1, 1), (5, 4))
# The H100's measured training rate of ours-fast at batch 128 (BENCHMARKS.md, GPU section), the default --train-rate.
H100_TRAIN_IMG_S = 3033.9
CANDIDATES = ("current: read_image (Pillow) + transform", "torchvision decode", "reduced-size decode", "uint8 out",
              "reduced-size decode + uint8 out")
CURRENT = CANDIDATES[0]


# ---------------------------------------------------------------------------------------------------------------
# Input

def write_jpegs(folder: Path, count: int, long_side: int, quality: int = 90) -> list[Path]:
    """`count` distinct JPEGs: crops (position, extent and mirroring from a seeded generator) of scikit-learn's two
    sample photographs, resized to long side `long_side` in the ASPECTS shapes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640 x 427 each
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        photo = photos[n % len(photos)]
        aw, ah = ASPECTS[n % len(ASPECTS)]
        size = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
        # the largest box of that shape inside the photo, times 0.6-1, at a random place
        fit = min(photo.width / size[0], photo.height / size[1]) * rng.uniform(0.6, 1.0)
        w, h = size[0] * fit, size[1] * fit
        x, y = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
        image = photo.resize(size, Image.Resampling.LANCZOS, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        paths.append(folder / f"{n:03d}.jpg")
        image.save(paths[-1], quality=quality)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# The transform, split into its stages, and the candidate paths

def stage_name(transform: Any) -> str:
    name = type(transform).__name__
    if "RandomResizedCrop" in name:
        return "RandomResizedCrop"
    if name in ("RandomHorizontalFlip", "RandomVerticalFlip"):
        return "flip"
    if name == "ColorJitter":
        return "colour jitter"
    if name in ("ToTensor", "MaybeToTensor", "Normalize"):
        return "ToTensor, Normalize"
    return name  # RandAugment, RandomErasing, ...


def split_stages(transform: Any) -> list[tuple[str, list[Callable]]]:
    """The Compose's transforms in order, consecutive ones of one stage together."""
    stages: list[tuple[str, list[Callable]]] = []
    for t in transform.transforms:
        name = stage_name(t)
        if stages and stages[-1][0] == name:
            stages[-1][1].append(t)
        else:
            stages.append((name, [t]))
    return stages


def compose(fns: list[Callable]) -> Callable:
    def run(x: Any) -> Any:
        for fn in fns:
            x = fn(x)
        return x
    return run


def reduced_crop(path: Path, crop: Any) -> tuple[Image.Image, int]:
    """timm's RandomResizedCrop of the JPEG at `path`, decoded at the smallest DCT scale 1/k (k in 1, 2, 4, 8) at
    which the crop box still spans at least the output's pixels in each direction; and k. The box is drawn from the
    header's size with the same random draws as `crop(read_image(path))`; at k = 1 the result is that one exactly."""
    from torchvision.transforms import functional as TF

    if isinstance(crop.interpolation, (tuple, list)):
        raise ValueError("reduced-size decoding is timed with one interpolation, not timm's 'random'")
    out_h, out_w = crop.size
    with Image.open(path) as image:
        width, height = image.size
        i, j, h, w = crop.get_params(image, crop.scale, crop.ratio)
        k = next((k for k in (8, 4, 2) if w / k >= out_w and h / k >= out_h), 1)
        if k == 1:  # what timm's crop does, on the image read_image decodes
            image.load()
            return TF.resized_crop(image.convert("RGB"), i, j, h, w, list(crop.size), crop.interpolation), 1
        image.draft("RGB", (width // k, height // k))
        image.load()
        scale = round(width / image.width)  # libjpeg's: pixel p of the reduced image covers [p * k, (p + 1) * k)
        box = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
        return image.convert("RGB").resize((out_w, out_h), TF.pil_modes_mapping[crop.interpolation], box=box), scale


def torchvision_image(path: Path) -> Image.Image:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    pixels = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def candidate_paths(transform: Any) -> dict[str, Callable[[Path], torch.Tensor]]:
    """Each candidate's sample: the path of a JPEG to the tensor a worker hands to collate."""
    from timm.data.transforms import MaybePILToTensor

    stages = split_stages(transform)
    names = [name for name, _ in stages]
    if names[0] != "RandomResizedCrop" or "ToTensor, Normalize" not in names:
        raise ValueError(f"expected a training transform that starts with RandomResizedCrop and has ToTensor and "
                         f"Normalize, got stages {names}")
    crop = stages[0][1][0]
    fns = [fn for _, group in stages for fn in group]
    after_crop = compose(fns[1:])
    # up to ToTensor, then a uint8 tensor: what timm's transform gives its prefetcher (use_prefetcher=True)
    to_uint8 = compose([*fns[1:fns.index(stages[names.index("ToTensor, Normalize")][1][0])], MaybePILToTensor()])
    return {
        CURRENT: lambda path: transform(read_image(path)),
        "torchvision decode": lambda path: transform(torchvision_image(path)),
        "reduced-size decode": lambda path: after_crop(reduced_crop(path, crop)[0]),
        "uint8 out": lambda path: to_uint8(crop(read_image(path))),
        "reduced-size decode + uint8 out": lambda path: to_uint8(reduced_crop(path, crop)[0]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Timing

def decoders() -> dict[str, Callable[[Path], Any]]:
    """Each decoder timed alone."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    def half(path: Path) -> Image.Image:
        with Image.open(path) as image:
            image.draft("RGB", (image.width // 2, image.height // 2))
            image.load()
            return image.convert("RGB")

    return {"Pillow (read_image)": read_image,
            "torchvision decode_jpeg (a uint8 tensor)":
                lambda path: decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB),
            "torchvision decode_jpeg, then a PIL image": torchvision_image,
            "Pillow at 1/2 scale (Image.draft)": half}


def staged_sample(path: Path, seed: int, stages: list[tuple[str, list[Callable]]]) -> tuple[torch.Tensor, dict]:
    """The current path's sample, and the seconds of each stage (seeding: call_seeded's own time)."""
    times = dict.fromkeys(["decode", *(name for name, _ in stages)], 0.0)

    def sample() -> torch.Tensor:
        start = time.perf_counter()
        x = read_image(path)
        now = time.perf_counter()
        times["decode"] = now - start
        for name, group in stages:
            for fn in group:
                x = fn(x)
            later = time.perf_counter()
            times[name] += later - now
            now = later
        return x

    start = time.perf_counter()
    x = call_seeded(seed, sample)
    times["per-sample seeding"] = time.perf_counter() - start - sum(times.values())
    return x, times


def timed_collate(samples: list[tuple[torch.Tensor, int]], batch_size: int) -> float:
    """Seconds per image to collate `samples` into batches."""
    start = time.perf_counter()
    for b in range(0, len(samples), batch_size):
        collate_skipping(samples[b:b + batch_size])
    return (time.perf_counter() - start) / len(samples)


def timed_round(paths: list[Path], seeds: list[int], stages: list[tuple[str, list[Callable]]],
                samples: dict[str, Callable[[Path], torch.Tensor]], decode: dict[str, Callable[[Path], Any]],
                batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """One pass over `paths`: the seconds of each image in each stage of the current path ("stages"), in each
    candidate's path ("paths": the seeded sample, and its share of the collate of their batches) and in each decoder
    alone ("decoders"). Every image goes through all of them before the next, in an order rotated from image to
    image, so that other work on the machine slows them alike."""
    seconds: dict[str, dict[str, np.ndarray]] = {
        "stages": {name: np.zeros(len(paths)) for name in
                   ["decode", *(name for name, _ in stages), "per-sample seeding", "collate"]},
        "paths": {name: np.zeros(len(paths)) for name in samples},
        "decoders": {name: np.zeros(len(paths)) for name in decode}}
    outputs: dict[str, list[tuple[torch.Tensor, int]]] = {name: [] for name in ("staged", *samples)}

    def staged(n: int) -> None:
        x, times = staged_sample(paths[n], seeds[n], stages)
        outputs["staged"].append((x, 0))
        for name, s in times.items():
            seconds["stages"][name][n] = s

    def candidate(name: str) -> Callable[[int], None]:
        def run(n: int) -> None:
            start = time.perf_counter()
            outputs[name].append((call_seeded(seeds[n], lambda: samples[name](paths[n])), 0))
            seconds["paths"][name][n] = time.perf_counter() - start
        return run

    def decoder(name: str) -> Callable[[int], None]:
        def run(n: int) -> None:
            start = time.perf_counter()
            decode[name](paths[n])
            seconds["decoders"][name][n] = time.perf_counter() - start
        return run

    jobs = [staged, *map(candidate, samples), *map(decoder, decode)]
    for n in range(len(paths)):
        for job in jobs[n % len(jobs):] + jobs[:n % len(jobs)]:
            job(n)
    seconds["stages"]["collate"][:] = timed_collate(outputs.pop("staged"), batch_size)
    for name, done in outputs.items():
        seconds["paths"][name] += timed_collate(done, batch_size)
    return seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_on_device(batch_size: int, size: int, model_cfg: dict, data_cfg: dict, train_cfg: dict,
                    device: torch.device, repeats: int) -> dict[str, float]:
    """Least seconds per batch of the work of the training process: timm's Mixup/CutMix as the engine builds it,
    and what `uint8 out` moves there (a uint8 batch to float, normalised, random erasing on the batch)."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    aug = data_cfg["augment"]
    mixup = Mixup(mixup_alpha=train_cfg["mixup"], cutmix_alpha=train_cfg["cutmix"], prob=train_cfg["mixup_prob"],
                  switch_prob=train_cfg["mixup_switch_prob"], label_smoothing=train_cfg["label_smoothing"],
                  num_classes=model_cfg["num_classes"])
    erase = RandomErasing(aug["re_prob"], mode=aug["re_mode"], max_count=aug["re_count"], device=str(device))
    mean = torch.tensor([255 * m for m in model_cfg["mean"]], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in model_cfg["std"]], device=device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    uint8 = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    targets = torch.randint(0, model_cfg["num_classes"], (batch_size,), generator=g).to(device)
    work = {"Mixup/CutMix (timm Mixup)": lambda: mixup(images, targets),
            "uint8 batch to float, normalise, random erasing": lambda: erase(uint8.float().sub_(mean).div_(std))}
    seconds = {}
    for name, fn in work.items():
        fn()
        runs = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - start)
        seconds[name] = min(runs)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# Checks: what the candidates change in the output

def output_differences(paths: list[Path], crops: int, transform: Any) -> dict[str, Any]:
    """How far each candidate's pixels are from the current path's: the decoders' over `paths`, the crops' and the
    normalisation's over `crops` samples (the images in turn, each under a seed of its own)."""
    from timm.data.transforms import MaybePILToTensor

    stages = split_stages(transform)
    crop = stages[0][1][0]
    to_tensor_normalize = compose(dict(stages)["ToTensor, Normalize"])
    decoded = [np.asarray(read_image(p), dtype=np.int16) for p in paths]
    tv = [np.asarray(torchvision_image(p), dtype=np.int16) for p in paths]
    decode_diff = max(int(np.abs(a - b).max()) for a, b in zip(decoded, tv))
    reduced, errors, uint8_error = [], [], 0.0
    mean, std = transform_stats(stages)
    for seed in range(crops):
        path = paths[seed % len(paths)]
        full = call_seeded(seed, lambda p=path: crop(read_image(p)))
        small, k = call_seeded(seed, lambda p=path: reduced_crop(p, crop))
        reduced.append(k)
        a, b = np.asarray(full, dtype=np.float64), np.asarray(small, dtype=np.float64)
        if k > 1:
            errors.append((np.abs(a - b).mean(), np.abs(a - b).max(), ((a - b) ** 2).mean()))
        elif not np.array_equal(a, b):
            raise AssertionError(f"{path}: the reduced-size path at full scale differs from RandomResizedCrop")
        # uint8 out, normalised later on the device as timm's prefetcher does, against ToTensor + Normalize
        later = (MaybePILToTensor()(full).float() - 255 * mean) / (255 * std)
        uint8_error = max(uint8_error, float((later - to_tensor_normalize(full)).abs().max()))
    return {"decode_max_diff": decode_diff, "reduced": reduced, "errors": errors, "uint8_max_diff": uint8_error}


def transform_stats(stages: list[tuple[str, list[Callable]]]) -> tuple[torch.Tensor, torch.Tensor]:
    normalize = next(t for t in dict(stages)["ToTensor, Normalize"] if type(t).__name__ == "Normalize")
    return (torch.as_tensor(normalize.mean, dtype=torch.float32).view(3, 1, 1),
            torch.as_tensor(normalize.std, dtype=torch.float32).view(3, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Report

def recorded_command(args: argparse.Namespace) -> str:
    words = ["python", "benchmarks/data_pipeline.py"]
    for key, value in vars(args).items():
        if key in ("out", "quick") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return shlex.join(words)


def rate(ms: float) -> float:
    return 1000 / ms if ms > 0 else float("inf")


def report_markdown(args: argparse.Namespace, img_size: int, paths: list[Path], stage_ms: dict[str, float],
                    path_ms: dict[str, float], decode_ms: dict[str, float], device_s: dict[str, float],
                    checks: dict[str, Any], device: torch.device) -> str:
    all_sizes = []
    for path in paths:
        with Image.open(path) as image:
            all_sizes.append(image.size)
    sizes, pixels = sorted(set(all_sizes)), statistics.mean(w * h for w, h in all_sizes)
    current_ms = path_ms[CURRENT]
    cores = lambda ms: args.train_rate * ms / 1000  # noqa: E731
    lines = [
        f"Training input pipeline of `{args.config}`, one worker (one process, 1 torch thread): "
        f"{describe_device(torch.device('cpu'))}, {os.cpu_count()} cores visible; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {__import__('timm').__version__}, Pillow {PIL.__version__} (libjpeg-turbo "
        f"{features.version('libjpeg_turbo') or 'absent'}), numpy {np.__version__}",
        f"{len(paths)} JPEGs of quality 90, long side {args.long_side} ({', '.join(f'{w}x{h}' for w, h in sizes)}; "
        f"{pixels / 1000:.0f}k pixels on average), read from the page cache; each image's least time over "
        f"{args.rounds} rounds after {args.warmup} warm-up",
        f"command: `{recorded_command(args)}`",
        "",
        "| stage (cumulative) | ms/img | share | img/s per worker, up to here |",
        "|---|---:|---:|---:|",
    ]
    total = sum(stage_ms.values())
    so_far = 0.0
    for name, ms in stage_ms.items():
        so_far += ms
        lines.append(f"| {'' if not so_far - ms else '+ '}{name} | {ms:.3f} | {100 * ms / total:.1f}% "
                     f"| {rate(so_far):.0f} |")
    per_image = {name: 1000 * s / args.batch_size for name, s in device_s.items()}
    lines += [
        "",
        f"Work of the training process on the batch, after the transfer (not a worker's), here on "
        f"{describe_device(device)}{', 1 thread' if device.type == 'cpu' else ''}: batch {args.batch_size} x 3 x "
        f"{img_size} x {img_size}",
        "",
        "| on the batch | ms/batch | ms/img | img/s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {1000 * device_s[name]:.2f} | {ms:.3f} | {rate(ms):.0f} |" for name, ms in per_image.items()),
        "",
        f"| worker path (decode to collated batch) | ms/img | img/s per worker | vs current | loader cores at "
        f"{args.train_rate:g} img/s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {ms:.3f} | {rate(ms):.0f} | {current_ms / ms:.2f}x | {cores(ms):.1f} |"
          for name, ms in path_ms.items()),
        "",
        "| decode alone | ms/img | img/s | vs Pillow |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {ms:.3f} | {rate(ms):.0f} | {decode_ms['Pillow (read_image)'] / ms:.2f}x |"
          for name, ms in decode_ms.items()),
        "",
        f"at {args.train_rate:g} training img/s one GPU needs ~{math.ceil(cores(current_ms))} loader cores "
        f"({cores(current_ms):.1f} at {rate(current_ms):.0f} img/s per worker, the current path; Mixup/CutMix and, "
        "for uint8 out, normalisation and random erasing run on the GPU)",
        "",
    ]
    reduced = checks["reduced"]
    share = sum(k > 1 for k in reduced) / len(reduced)
    by_k = ", ".join(f"1/{k}: {reduced.count(k)}" for k in (2, 4, 8) if reduced.count(k))
    lines.append(f"- torchvision decode: pixels identical to Pillow's within {checks['decode_max_diff']} (max "
                 "|difference| over the images, 0-255)")
    if checks["errors"]:
        mean_abs = statistics.mean(e[0] for e in checks["errors"])
        worst = max(e[1] for e in checks["errors"])
        psnr = statistics.mean(10 * math.log10(255 ** 2 / max(e[2], 1e-12)) for e in checks["errors"])
        lines.append(f"- reduced-size decode: the crop allowed a reduced decode for {100 * share:.0f}% of "
                     f"{len(reduced)} crops ({by_k}); there its 224 x 224 crop differs from the full decode's by "
                     f"{mean_abs:.2f} on average (0-255, worst pixel {worst:.0f}, PSNR {psnr:.1f} dB); elsewhere it "
                     "is the same image")
    else:
        lines.append(f"- reduced-size decode: none of {len(reduced)} crops spans 2 x {img_size} source pixels "
                     "in both directions, so every one was decoded in full: the same images as the current path")
    lines.append(f"- uint8 out normalised later ((x - 255 mean) / (255 std)) against ToTensor + Normalize: max "
                 f"|difference| {checks['uint8_max_diff']:.1e}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cvt13_imagenet.yaml",
                        help="the recipe whose data section builds the transform (default: the ImageNet one)")
    parser.add_argument("--images", type=int, default=96,
                        help="distinct JPEGs written and read, each under its own seed (default 96)")
    parser.add_argument("--long-side", type=int, default=500, help="their long side in pixels (default 500)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed passes over them, each image's least time kept (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    parser.add_argument("--batch-size", type=int, default=128, help="the batch of the collate and of Mixup/CutMix")
    parser.add_argument("--device", default="cpu", help="where the training process's batch work is timed")
    parser.add_argument("--train-rate", type=float, default=H100_TRAIN_IMG_S,
                        help="training img/s of one GPU, for the loader cores it needs (default: the H100's "
                             f"{H100_TRAIN_IMG_S:g} in BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="4 images, 1 round, no warm-up, batch 4: seconds")
    parser.add_argument("--out", default=None, help="a markdown file for the report (default: none written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.warmup, args.batch_size = 4, 1, 0, 4
    if min(args.images, args.rounds, args.batch_size, args.long_side) < 1 or args.warmup < 0 or args.train_rate <= 0:
        parser.error("--images, --rounds, --batch-size, --long-side and --train-rate must be positive, --warmup at "
                     "least 0")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    # torchvision 0.29 deprecates its image decoders for TorchCodec's, and says so on every call
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                            DeprecationWarning)
    config = load_config(ROOT / args.config if not Path(args.config).is_absolute() else args.config)
    model_cfg = ZOO[config["model"]["name"]][1]
    img_size = config["data"]["img_size"]
    transform = train_transform(config["data"], model_cfg)
    stages = split_stages(transform)
    paths_of = candidate_paths(transform)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="cvt-data-pipeline-") as folder:
        paths = write_jpegs(Path(folder), args.images, args.long_side)
        decode = decoders()
        # every round repeats the same work (the same seeds); each image's time in each stage and path is the least
        # over the rounds, its cost undisturbed by other work on the machine
        runs = [timed_round(paths, list(range(len(paths))), stages, paths_of, decode, args.batch_size)
                for _ in range(args.warmup + args.rounds)][args.warmup:]
        least_ms = {table: {name: 1000 * float(np.min([run[table][name] for run in runs], axis=0).mean())
                            for name in runs[0][table]} for table in runs[0]}
        stage_ms, path_ms, decode_ms = least_ms["stages"], least_ms["paths"], least_ms["decoders"]
        checks = output_differences(paths, len(paths) * max(args.rounds, 3), transform)
        device_s = timed_on_device(args.batch_size, img_size, model_cfg, config["data"], config["train"], device,
                                   repeats=max(args.rounds, 3))
        markdown = report_markdown(args, img_size, paths, stage_ms, path_ms, decode_ms, device_s, checks, device)
    print(markdown, end="")
    if args.out:
        write_atomic(args.out, markdown)
        print(f"wrote {args.out}")
    return markdown


if __name__ == "__main__":
    main()
