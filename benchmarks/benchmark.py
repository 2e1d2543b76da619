"""Speed and memory of CvT implementations side by side, in one process, on the same weights and inputs.

    python benchmarks/benchmark.py --model cvt_13_224 --batch-size 16 --threads 2 --out benchmarks/results
    python benchmarks/benchmark.py --device cuda --dtype bfloat16 --batch-size 256 --train-batch-size 128

Four implementations of the same function (`--modes`):

- `ours-eager`: the `CvT` model as it comes (eager PyTorch, `scaled_dot_product_attention`);
- `ours-fast`: for inference `cvt.optimize_for_inference(model)` with its defaults (every speed-up that helps on
  the device; `--no-compile` leaves out `torch.compile`); for training a copy of the model with
  `cvt.accel.accelerate_training(copy, device, compiled=True)`, `compile_model` and fused AdamW;
- `hf`: transformers' `CvtForImageClassification` holding the same weights (`cvt.hf.to_hf`);
- `official-style`: `OfficialStyleCvT`, the official code's computation (einsum attention over a materialised
  score matrix, separate q/k/v convolutions and norms, einops-style reshapes) on the same weights.

Each is timed for inference throughput at a batch size, latency at batch 1 and a training step (forward,
cross-entropy, backward, AdamW step). Calls are interleaved across implementations, repeated, and the median
kept, so a machine shared with other work slows all of them alike. Every mode runs under the same allocator
settings: glibc's defaults, or with `--keep-freed-memory` glibc keeping every freed block in the process for the
whole run (`cvt.process.keep_freed_memory`), so that no call pays page faults for fresh memory and the timings
measure the arithmetic alone. Peak memory is measured after the timings:

- CUDA: `torch.cuda.max_memory_allocated` during one call, minus what was allocated before it;
- CPU: the process's resident-memory high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs`)
  during one call, minus the resident memory before it, with glibc told to return freed blocks to the system
  (`mallopt`, `malloc_trim`), so that memory freed earlier does not hide what a call allocates.

The table is printed; with `--out DIR` it is also written there as JSON and markdown.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvt.accel import accelerate_training, compile_model, optimize_for_inference
from cvt.cli import parse_overrides
from cvt.files import write_atomic
from cvt.flops import count_macs
from cvt.model import CvT, Stage, create_model
from cvt.process import M_MMAP_MAX, M_TRIM_THRESHOLD, keep_freed_memory
from machine import describe_device

MODES = ("ours-eager", "ours-fast", "hf", "official-style")
EAGER, FAST, HF, OFFICIAL = MODES

# Dense bfloat16 tensor-core peaks (TFLOP/s) by device-name fragment, for the % of peak columns on a GPU;
# --peak-tflops overrides (and is needed for any other device or dtype).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The card's dense bfloat16 peak from BF16_PEAK_TFLOPS (the longest matching name), or None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    matches = [(len(k), v) for k, v in BF16_PEAK_TFLOPS.items() if k in name]
    return max(matches)[1] if matches else None


class OfficialStyleCvT(nn.Module):
    """A CvT's weights run the way the official implementation computes.

    Per attention layer: q, k and v each from its own conv + BatchNorm and its own linear, reshaped to heads with
    copies, the full score matrix by einsum, softmax, then einsum with v. The final norm sees the class token
    only. It holds `model` (same parameters, same names under `model.`), so it trains too.
    """

    def __init__(self, model: CvT):
        super().__init__()
        if model.global_pool != "token" or any(stage.pos_embed is not None for stage in model.stages):
            raise ValueError("the official-style path covers the released design: a class token in the last "
                             "stage (global_pool='token') and no position embedding")
        self.model = model

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if attn.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], 1)
        b, _, c = x.shape
        x_map = x.transpose(1, 2).reshape(b, c, h, w)
        # Each projection maps the (B, C, H, W) map to (B, H'W', C) tokens, as the official one with its Rearrange.
        q, k, v = attn.conv_proj_q(x_map), attn.conv_proj_k(x_map), attn.conv_proj_v(x_map)
        if attn.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        heads = attn.num_heads
        q, k, v = (lin(t).reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3).contiguous()
                   for lin, t in ((attn.proj_q, q), (attn.proj_k, k), (attn.proj_v, v)))
        scores = torch.einsum("bhlk,bhtk->bhlt", q, k) * attn.scale
        probs = attn.attn_drop(F.softmax(scores, dim=-1))
        x = torch.einsum("bhlt,bhtv->bhlv", probs, v)
        x = x.permute(0, 2, 1, 3).reshape(b, x.shape[2], -1)
        return attn.proj_drop(attn.proj(x))

    def _stage(self, stage: Stage, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = stage.patch_embed.proj(x)
        b, c, h, w = x.shape
        x = stage.patch_embed.norm(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if stage.cls_token is not None:
            x = torch.cat((stage.cls_token.expand(b, -1, -1), x), dim=1)
        x = stage.pos_drop(x)
        for block in stage.blocks:
            x = x + block.drop_path(self._attention(block.attn, block.norm1(x), h, w))
            x = x + block.drop_path(block.mlp(block.norm2(x)))
        cls_token = None
        if stage.cls_token is not None:
            cls_token, x = torch.split(x, [1, h * w], 1)
        return x.transpose(1, 2).reshape(b, c, h, w), cls_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_token = None
        for stage in self.model.stages:
            x, cls_token = self._stage(stage, x)
        return self.model.head(self.model.norm(cls_token)[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# The model and the implementations


def benchmark_model(name: str, overrides: dict[str, Any], device: torch.device) -> CvT:
    """The model every implementation runs, with random BatchNorm statistics, so that folding them is exercised
    like on trained weights."""
    model = create_model(name, **overrides)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.to(device)


def ours_fast_inference(model: CvT, dtype: torch.dtype, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`optimize_for_inference(model)` with its defaults, cast to `dtype` after the BatchNorm fold (folded in
    float32)."""
    fast = optimize_for_inference(model, compile=compile).to(dtype)
    if compile and next(model.parameters()).is_cuda:
        # CUDA graphs (on by default there) return outputs in memory the next call overwrites: a user copies them.
        return lambda x: fast(x).clone()
    return fast


def inference_callables(model: CvT, modes: list[str], dtype: torch.dtype, compile_fast: bool
                        ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    device = next(model.parameters()).device
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for mode in modes:
        if mode == EAGER:
            fns[mode] = copy.deepcopy(model).eval().to(dtype)
        elif mode == FAST:
            fns[mode] = ours_fast_inference(model, dtype, compile_fast)
        elif mode == HF:
            from cvt.hf import to_hf

            hf = to_hf(model).to(device=device, dtype=dtype)
            fns[mode] = lambda x, hf=hf: hf(pixel_values=x).logits
        elif mode == OFFICIAL:
            fns[mode] = OfficialStyleCvT(copy.deepcopy(model)).eval().to(dtype)
    return fns


def training_step(module: nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor], fused_optimizer: bool,
                  compile_step: bool, autocast_dtype: torch.dtype | None, device: torch.device
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimisation step; it returns the loss as a tensor, so nothing waits on the device."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05,
                                  **({"fused": True} if fused_optimizer else {}))
    forward = compile_model(logits_of) if compile_step else logits_of

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def training_callables(model: CvT, modes: list[str], dtype: torch.dtype, compile_fast: bool
                       ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    device = next(model.parameters()).device
    autocast_dtype = None if dtype == torch.float32 else dtype
    steps = {}
    for mode in modes:
        if mode == EAGER:
            ours = copy.deepcopy(model)
            steps[mode] = training_step(ours, ours, False, False, autocast_dtype, device)
        elif mode == FAST:
            ours = accelerate_training(copy.deepcopy(model), device, compiled=compile_fast)
            steps[mode] = training_step(ours, ours, True, compile_fast, autocast_dtype, device)
        elif mode == HF:
            from cvt.hf import to_hf

            hf = to_hf(model).to(device)
            steps[mode] = training_step(hf, lambda x, hf=hf: hf(pixel_values=x).logits, False, False,
                                        autocast_dtype, device)
        elif mode == OFFICIAL:
            official = OfficialStyleCvT(copy.deepcopy(model))
            steps[mode] = training_step(official, official, False, False, autocast_dtype, device)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call; on CUDA timed with events around the call, then synchronised."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


def interleaved_medians(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
                        ) -> dict[str, float]:
    """Median seconds per call of each function: after `warmup` calls each, `repeats` rounds calling each in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h), beside cvt.process's M_MMAP_MAX and M_TRIM_THRESHOLD
GLIBC_DEFAULT_MMAP_MAX = 65536


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_tracking_available() -> bool:
    try:
        proc_status_kib("VmHWM")
        ctypes.CDLL("libc.so.6").mallopt
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError, AttributeError):
        return False


def track_cpu_allocations_exactly() -> None:
    # glibc keeps freed blocks below a threshold that grows up to 32 MiB; fixing it low makes every tensor its
    # own mapping, returned on free, so resident memory follows live tensors. This ends --keep-freed-memory, which
    # is why peak memory is measured after the timings.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory one call adds at its peak, above what is held before it (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    fn()
    return (proc_status_kib("VmHWM") - before) / 1024


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import timm

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return {"device": device.type, "device_name": describe_device(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "versions": versions}


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every mode in `args.modes` on the same weights and inputs; returns a JSON-able report."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = benchmark_model(args.model, parse_overrides(args.set), device)
    size = args.img_size or model.img_size[0]
    batch, train_batch = args.batch_size, args.train_batch_size or args.batch_size
    macs = count_macs(model, size)
    x = torch.randn(batch, model.in_chans, size, size, device=device).to(dtype)
    x1 = x[:1].clone()
    x_train = torch.randn(train_batch, model.in_chans, size, size, device=device)
    y_train = torch.randint(0, max(model.num_classes, 1), (train_batch,), device=device)

    env = environment(device, dtype)
    log(f"{args.model} @ {size}x{size}, {macs / 1e9:.2f} GMACs/image; {env['device_name']}, {env['dtype']}, "
        f"{env['threads']} threads; torch {env['versions']['torch']}")
    rows: dict[str, dict[str, Any]] = {mode: {"mode": mode} for mode in args.modes}
    compile_fast = not args.no_compile
    infer_fns = inference_callables(model, args.modes, dtype, compile_fast)
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    with torch.inference_mode():
        log(f"inference, batch {batch}: warm-up (compiles) and {args.repeats} interleaved repeats")
        medians = interleaved_medians({m: (lambda f=f: f(x)) for m, f in infer_fns.items()}, args.warmup,
                                      args.repeats, device)
        for mode, seconds in medians.items():
            rows[mode]["infer_img_s"] = batch / seconds
        if not args.no_latency:
            log("latency, batch 1")
            medians = interleaved_medians({m: (lambda f=f: f(x1)) for m, f in infer_fns.items()}, args.warmup,
                                          args.repeats, device)
            for mode, seconds in medians.items():
                rows[mode]["latency_ms"] = seconds * 1e3
    if not args.no_train:
        log(f"training step, batch {train_batch}: warm-up (compiles) and {args.repeats} interleaved repeats")
        steps = training_callables(model, args.modes, dtype, compile_fast)
        # At least one warm-up step: the first builds the optimizer's state.
        medians = interleaved_medians({m: (lambda s=s: s(x_train, y_train)) for m, s in steps.items()},
                                      max(args.warmup, 1), args.repeats, device)
        for mode, seconds in medians.items():
            rows[mode]["train_img_s"] = train_batch / seconds
    if not args.no_memory and (device.type == "cuda" or cpu_peak_tracking_available()):
        log("peak memory")
        if device.type == "cpu":
            track_cpu_allocations_exactly()
        with torch.inference_mode():
            for mode, f in infer_fns.items():
                rows[mode]["infer_peak_mib"] = peak_memory_mib(lambda f=f: f(x), device)
        for mode, s in steps.items():
            rows[mode]["train_peak_mib"] = peak_memory_mib(lambda s=s: s(x_train, y_train), device)

    peak = args.peak_tflops or peak_tflops(device, dtype)
    if peak:
        for row in rows.values():
            row["infer_peak_fraction"] = 2 * macs * row["infer_img_s"] / (peak * 1e12)
            if "train_img_s" in row:
                row["train_peak_fraction"] = 6 * macs * row["train_img_s"] / (peak * 1e12)
    ratios = {}
    if FAST in rows:
        for other in (HF, OFFICIAL):
            if other not in rows:
                continue
            for key in ("infer_img_s", "train_img_s"):
                if key in rows[FAST] and key in rows[other]:
                    ratios[f"{key.split('_')[0]}_throughput_fast_over_{other}"] = rows[FAST][key] / rows[other][key]
            for key in ("infer_peak_mib", "train_peak_mib"):
                if rows[FAST].get(key) and rows[other].get(key):
                    ratios[f"{key.split('_')[0]}_memory_fast_over_{other}"] = rows[FAST][key] / rows[other][key]
    return {
        "model": args.model, "img_size": size, "batch_size": batch, "train_batch_size": train_batch,
        "gmacs_per_image": macs / 1e9, "peak_tflops": peak, "warmup": args.warmup,
        "repeats": args.repeats, "compiled": compile_fast, "keep_freed_memory": args.keep_freed_memory, **env,
        "results": list(rows.values()), "ratios": ratios,
    }


def results_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header line, the command, the table and the ratios."""
    columns = [("infer_img_s", f"inference img/s (b{report['batch_size']})", "{:.1f}"),
               ("latency_ms", "latency b1 (ms)", "{:.1f}"),
               ("infer_peak_mib", "inference peak (MiB)", "{:.0f}"),
               ("train_img_s", f"train img/s (b{report['train_batch_size']})", "{:.1f}"),
               ("train_peak_mib", "train peak (MiB)", "{:.0f}"),
               ("infer_peak_fraction", "inference % of peak", "{:.1%}"),
               ("train_peak_fraction", "train % of peak", "{:.1%}")]
    present = [c for c in columns if any(r.get(c[0]) is not None for r in report["results"])]
    lines = [f"{report['model']} @ {report['img_size']}x{report['img_size']} ({report['gmacs_per_image']:.2f} "
             f"GMACs/image), {report['device_name']}, {report['dtype']}, {report['threads']} threads, "
             f"torch {report['versions']['torch']}, median of {report['repeats']}"
             + (", glibc keeping freed memory" if report["keep_freed_memory"] else ""),
             f"command: `{report['command']}`",
             "",
             "| mode | " + " | ".join(c[1] for c in present) + " |",
             "|---|" + "---:|" * len(present)]
    for row in report["results"]:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in present]
        lines.append(f"| {row['mode']} | " + " | ".join(cells) + " |")
    if report["ratios"]:
        lines.append("")
        lines += [f"- {name}: {value:.2f}x" for name, value in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write the report as `<model>_<device>_<dtype>_b<batch>[_t<CPU threads>][_keep-freed-memory].json` and `.md`
    in `out_dir` (created if need be), each atomically; returns both paths."""
    stem = os.path.join(out_dir, f"{report['model']}_{report['device']}_{report['dtype']}_b{report['batch_size']}"
                                 + (f"_t{report['threads']}" if report["device"] == "cpu" else "")
                                 + ("_keep-freed-memory" if report["keep_freed_memory"] else ""))
    paths = []
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", results_markdown(report))):
        path = stem + suffix
        write_atomic(path, text)
        paths.append(path)
    return paths[0], paths[1]


def recorded_command(args: argparse.Namespace) -> str:
    """The command line of this run with every option's value, defaults included (so it reproduces the run after a
    default changes), and without --out."""
    words = ["python", "benchmarks/benchmark.py"]
    for key, value in vars(args).items():
        # `is`, not `in (None, False)`: 0 == False, and `--warmup 0` must stay in the recorded command.
        if key == "out" or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return shlex.join(words)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13_224")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch (and training batch by default)")
    parser.add_argument("--train-batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's native)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed calls per mode; the median is kept")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                        help=f"any of {' '.join(MODES)} (default all)")
    parser.add_argument("--no-compile", action="store_true", help="run ours-fast without torch.compile")
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc keeps freed memory for the whole run (as jemalloc/tcmalloc would), so no "
                             "mode pays page faults for fresh buffers during the timings")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s in --dtype, for the %% of peak columns (default: "
                             "BF16_PEAK_TFLOPS for a known GPU in bfloat16)")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. depths=[1,1,2]")
    parser.add_argument("--out", default=None, help="directory for the JSON and markdown results (default: none "
                                                    "written)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.train_batch_size or 1, args.repeats) < 1 or args.warmup < 0:
        parser.error("batch sizes and --repeats must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA device is available; use --device cpu")
    if args.keep_freed_memory and device.type != "cpu":
        parser.error(f"--keep-freed-memory sets the CPU allocator (glibc); it has no effect on {device.type}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Process-wide, before anything is allocated, so that every mode runs under the same allocator settings.
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("error: --keep-freed-memory needs glibc's allocator, which this process does not use")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_benchmark(args)
    report["command"] = recorded_command(args)
    print(results_markdown(report))
    if args.out:
        json_path, md_path = write_report(report, args.out)
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
