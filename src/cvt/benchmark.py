"""Side-by-side speed of CvT implementations, in one process, on the same weights and inputs.

Four implementations of the same function:

- `ours-eager`: the `CvT` model as it comes (eager PyTorch, `scaled_dot_product_attention`);
- `ours-fast`: our fastest mode: for inference `optimize_for_inference(logits_only=True)` (BatchNorm folded,
  the last block computes the class token alone), oneDNN linears and attention on the CPU and `compile_model`
  (`torch.compile(fullgraph=True)`, with CUDA graphs on CUDA), called inside `reuse_cpu_buffers()` on the CPU
  (its large buffers kept between calls, not taken fresh from glibc); for training the unfused model with oneDNN
  linears and attention on the CPU, `compile_model` and fused AdamW;
- `hf`: transformers' `CvtForImageClassification` holding the same weights (`cvt.weights.to_hf`);
- `official-style`: `OfficialStyleCvT`, the official code's computation (einsum attention over a
  materialised score matrix, separate q/k/v convolutions and norms, einops-style reshapes) on the same weights.

Each is timed for inference throughput at a batch size, latency at batch 1 and a training step (forward,
cross-entropy, backward, AdamW step). Calls are interleaved across implementations, repeated, and the median
kept, so a machine shared with other work slows all of them alike. On the CPU, glibc's allocator hands large
buffers back to the system on free, so a call may pay page faults for fresh memory, more or less depending on
what ran before it (`ours-fast` inference keeps its own buffers); `keep_freed_memory=True` keeps every freed block
in the process, as jemalloc or tcmalloc would, so that the timings measure the arithmetic alone. Peak memory is
measured after the timing:

- CUDA: `torch.cuda.max_memory_allocated` during one call, minus what was allocated before it;
- CPU: the process's resident-memory high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs`)
  during one call, minus the resident memory before it; glibc is told to return freed blocks to the system
  (`mallopt`, `malloc_trim`), and `release_cpu_buffers()` empties the cache of `ours-fast`, so that memory freed
  earlier does not hide what a call allocates.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import compile_model, move_to, optimize_for_inference, release_cpu_buffers, reuse_cpu_buffers
from .files import write_atomic
from .flops import count_macs
from .model import CvT, Stage, create_model

__all__ = ["OfficialStyleCvT", "run_benchmark", "results_markdown", "write_report", "MODES"]

MODES = ("ours-eager", "ours-fast", "hf", "official-style")
FAST, EAGER, HF, OFFICIAL = MODES[1], MODES[0], MODES[2], MODES[3]

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


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

        def project(proj: nn.Module | None) -> torch.Tensor:
            out = x_map if proj is None else proj(x_map)
            return out.flatten(2).transpose(1, 2).reshape(b, -1, c)

        q, k, v = project(attn.conv_proj_q), project(attn.conv_proj_k), project(attn.conv_proj_v)
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
# Building the implementations


def _inference_callables(model: CvT, modes: tuple[str, ...], dtype: torch.dtype, compile_fast: bool
                         ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for mode in modes:
        if mode == EAGER:
            fns[mode] = copy.deepcopy(model).eval().to(dtype)
        elif mode == FAST:
            device = next(model.parameters()).device
            fast = move_to(optimize_for_inference(model, logits_only=model.global_pool == "token"), device)
            fast = fast.to(dtype)
            fast = compile_model(fast, cuda_graphs=device.type == "cuda") if compile_fast else fast
            fns[mode] = _reusing_cpu_buffers(fast) if device.type == "cpu" else fast
        elif mode == HF:
            from .weights import to_hf

            hf = to_hf(model).to(device=next(model.parameters()).device, dtype=dtype)
            fns[mode] = lambda x, hf=hf: hf(pixel_values=x).logits
        elif mode == OFFICIAL:
            fns[mode] = OfficialStyleCvT(copy.deepcopy(model)).eval().to(dtype)
    return fns


def _reusing_cpu_buffers(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        with reuse_cpu_buffers():
            return fn(x)

    return call


def _training_step(module: nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor], fused_optimizer: bool,
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


def _training_callables(model: CvT, modes: tuple[str, ...], dtype: torch.dtype, compile_fast: bool,
                        device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    autocast_dtype = None if dtype == torch.float32 else dtype
    steps = {}
    for mode in modes:
        if mode == EAGER:
            ours = copy.deepcopy(model)
            steps[mode] = _training_step(ours, ours, False, False, autocast_dtype, device)
        elif mode == FAST:
            ours = move_to(copy.deepcopy(model), device)
            steps[mode] = _training_step(ours, ours, True, compile_fast, autocast_dtype, device)
        elif mode == HF:
            from .weights import to_hf

            hf = to_hf(model).to(device)
            steps[mode] = _training_step(hf, lambda x, hf=hf: hf(pixel_values=x).logits, False, False,
                                         autocast_dtype, device)
        elif mode == OFFICIAL:
            official = OfficialStyleCvT(copy.deepcopy(model))
            steps[mode] = _training_step(official, official, False, False, autocast_dtype, device)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
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


def _interleaved_medians(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
                         ) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_freed_memory() -> None:
    gc.collect()
    release_cpu_buffers()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)


def _cpu_peak_tracking_available() -> bool:
    try:
        _proc_status_kib("VmHWM")
        ctypes.CDLL("libc.so.6").mallopt
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError, AttributeError):
        return False


def _peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
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
    _release_freed_memory()
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
GLIBC_DEFAULT_MMAP_MAX = 65536


def retain_freed_memory() -> None:
    """Make glibc serve every block from the heap and return none to the system (process-wide): after a
    warm-up no call pays page faults for fresh memory, as with a caching allocator (jemalloc, tcmalloc)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def _track_cpu_allocations_exactly() -> None:
    # glibc keeps freed blocks below a threshold that grows up to 32 MiB; fixing it low makes every tensor its
    # own mapping, returned on free, so resident memory follows live tensors.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def _environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import timm

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"device": device.type, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": versions}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_peak_tflops(device_name: str) -> float | None:
    matches = [(len(k), v) for k, v in BF16_PEAK_TFLOPS.items() if k in device_name]
    return max(matches)[1] if matches else None


def run_benchmark(
    model_name: str = "cvt_13_224",
    batch_size: int = 16,
    img_size: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    modes: tuple[str, ...] = MODES,
    compile_fast: bool = True,
    inference: bool = True,
    latency: bool = True,
    training: bool = True,
    train_batch_size: int | None = None,
    memory: bool = True,
    keep_freed_memory: bool = False,
    peak_tflops: float | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every mode in `modes` on the same weights and inputs; returns a JSON-able dict."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown benchmark modes {unknown}: choose from {list(MODES)}")
    train_batch = train_batch_size or batch_size
    if min(batch_size, train_batch, repeats) < 1 or warmup < 0:
        raise ValueError(f"batch sizes and repeats must be at least 1 and warm-up at least 0, got batch size "
                         f"{batch_size}, training batch size {train_batch}, repeats {repeats}, warm-up {warmup}")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}: choose float32 or bfloat16")
    if keep_freed_memory and torch_device.type != "cpu":
        raise ValueError("--keep-freed-memory sets the CPU allocator (glibc); it has no effect on "
                         f"{torch_device.type}: leave it out")
    if keep_freed_memory:
        retain_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create_model(model_name, **(overrides or {}))
    # Random BatchNorm statistics, so that folding them is exercised like on trained weights.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    model.to(torch_device)
    size = img_size or model.img_size[0]
    macs = count_macs(model, size)
    x = torch.randn(batch_size, model.in_chans, size, size, device=torch_device)
    x_one = x[:1].clone()
    x_train = torch.randn(train_batch, model.in_chans, size, size, device=torch_device)
    y_train = torch.randint(0, max(model.num_classes, 1), (train_batch,), device=torch_device)

    env = _environment(torch_device, torch_dtype)
    log(f"{model_name} @ {size}x{size}, {macs / 1e9:.2f} GMACs/image; {env['device_name']} ({env['device']}), "
        f"{env['dtype']}, {env['threads']} threads; torch {env['versions']['torch']}")
    rows: dict[str, dict[str, Any]] = {mode: {"mode": mode} for mode in modes}
    peak = peak_tflops or (_bf16_peak_tflops(env["device_name"]) if torch_device.type == "cuda" else None)
    track_memory = memory and (torch_device.type == "cuda" or _cpu_peak_tracking_available())

    infer_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    if inference or latency:
        infer_fns = _inference_callables(model, modes, torch_dtype, compile_fast)
        with torch.inference_mode():
            if inference:
                log(f"inference, batch {batch_size}: warm-up (compiles) and {repeats} interleaved repeats")
                xd = x.to(torch_dtype)
                medians = _interleaved_medians({m: (lambda f=f: f(xd)) for m, f in infer_fns.items()}, warmup,
                                               repeats, torch_device)
                for mode, seconds in medians.items():
                    rows[mode]["infer_img_s"] = batch_size / seconds
            if latency:
                log("latency, batch 1")
                x1 = x_one.to(torch_dtype)
                medians = _interleaved_medians({m: (lambda f=f: f(x1)) for m, f in infer_fns.items()}, warmup,
                                               repeats, torch_device)
                for mode, seconds in medians.items():
                    rows[mode]["latency_ms"] = seconds * 1e3
    if training:
        log(f"training step, batch {train_batch}: warm-up (compiles) and {repeats} interleaved repeats")
        steps = _training_callables(model, modes, torch_dtype, compile_fast, torch_device)
        medians = _interleaved_medians({m: (lambda s=s: s(x_train, y_train)) for m, s in steps.items()},
                                       max(warmup, 1), repeats, torch_device)
        for mode, seconds in medians.items():
            rows[mode]["train_img_s"] = train_batch / seconds
    if track_memory:
        log("peak memory")
        if torch_device.type == "cpu":
            _track_cpu_allocations_exactly()
        if inference:
            xd = x.to(torch_dtype)
            with torch.inference_mode():
                for mode, f in infer_fns.items():
                    rows[mode]["infer_peak_mib"] = _peak_memory_mib(lambda f=f: f(xd), torch_device)
        if training:
            for mode, s in steps.items():
                rows[mode]["train_peak_mib"] = _peak_memory_mib(lambda s=s: s(x_train, y_train), torch_device)

    if peak:
        for row in rows.values():
            if "infer_img_s" in row:
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
        "model": model_name, "img_size": size, "batch_size": batch_size, "train_batch_size": train_batch,
        "gmacs_per_image": macs / 1e9, "bf16_peak_tflops": peak, "warmup": warmup, "repeats": repeats,
        "compiled": compile_fast, "keep_freed_memory": keep_freed_memory, **env, "results": list(rows.values()),
        "ratios": ratios,
    }


def results_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header line, the table and the ratios."""
    columns = [("infer_img_s", f"inference img/s (b{report['batch_size']})", "{:.1f}"),
               ("latency_ms", "latency b1 (ms)", "{:.1f}"),
               ("infer_peak_mib", "inference peak (MiB)", "{:.0f}"),
               ("train_img_s", f"train img/s (b{report['train_batch_size']})", "{:.1f}"),
               ("train_peak_mib", "train peak (MiB)", "{:.0f}"),
               ("infer_peak_fraction", "inference % of bf16 peak", "{:.1%}"),
               ("train_peak_fraction", "train % of bf16 peak", "{:.1%}")]
    present = [c for c in columns if any(r.get(c[0]) is not None for r in report["results"])]
    lines = [f"{report['model']} @ {report['img_size']}x{report['img_size']} ({report['gmacs_per_image']:.2f} "
             f"GMACs/image), {report['device_name']} ({report['device']}), {report['dtype']}, "
             f"{report['threads']} threads, torch {report['versions']['torch']}, median of {report['repeats']}",
             *([f"command: `{report['command']}`"] if report.get("command") else []),
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
    in `out_dir` (created if need be); returns both paths."""
    stem = os.path.join(out_dir, f"{report['model']}_{report['device']}_{report['dtype']}_b{report['batch_size']}"
                                 + (f"_t{report['threads']}" if report["device"] == "cpu" else "")
                                 + ("_keep-freed-memory" if report.get("keep_freed_memory") else ""))
    paths = []
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", results_markdown(report))):
        path = stem + suffix
        write_atomic(path, text)
        paths.append(path)
    return paths[0], paths[1]
