"""What each inference fast path buys, alone and together: interleaved medians on the same weights and input.

    python benchmarks/fast_paths.py --threads 2 --batch-size 16 [--keep-freed-memory]
    python benchmarks/fast_paths.py --device cuda --dtype bfloat16 --batch-size 256

Rows: the plain model; oneDNN linears (CPU only: on other devices they are plain linears, and on the CPU every
later row has them too); on the CPU, oneDNN attention (`use_onednn_attention`) too; `optimize_for_inference`
(BatchNorm folded) with and without `logits_only`; `compile_model` on the unfused and the fused model; ours-fast,
as `cvt benchmark` builds and calls it (the fused `logits_only` model compiled; on the CPU with oneDNN attention,
called inside `reuse_cpu_buffers()`, on CUDA with CUDA graphs); the fused model compiled with inductor's layout
optimisation left on; on the CPU, ours-fast called without `reuse_cpu_buffers()` (what the cache saves: run it
without `--keep-freed-memory`).
Every variant is first checked against the plain model in float32: to 1e-4 absolute in float32, to 2e-2
relative (norm of the difference over the norm of the logits) in bfloat16.

`--profile` (CUDA) then prints the kernels that take the most GPU time in three calls of ours-fast
(`torch.profiler`): where the time of the fastest mode goes. On the CPU the profiler's per-operator times inside
a compiled graph were seen to be far off (a product timed at twice what it and the LayerNorm before it took
without the profiler), so it is not offered there.
"""
import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

import cvt
from cvt.benchmark import _interleaved_medians, _reusing_cpu_buffers, retain_freed_memory
from cvt.fast import compile_model, move_to, optimize_for_inference, use_onednn_attention, use_onednn_linears


OURS_FAST = "ours-fast"


def variants_for(model: cvt.CvT, device: torch.device, compile_them: bool) -> dict[str, torch.nn.Module]:
    fused = optimize_for_inference(model)
    logits_only = optimize_for_inference(model, logits_only=True)
    variants = {"plain eager": model}
    if device.type == "cpu":
        variants["oneDNN linears"] = use_onednn_linears(copy.deepcopy(model))
        variants["oneDNN linears and attention"] = use_onednn_attention(copy.deepcopy(variants["oneDNN linears"]))
        fused, logits_only = use_onednn_linears(fused), use_onednn_linears(logits_only)
    variants["optimize_for_inference"] = fused
    variants["optimize_for_inference(logits_only)"] = logits_only
    if compile_them:
        variants["compiled: plain"] = compile_model(variants.get("oneDNN linears", model))
        variants["compiled: optimize_for_inference"] = compile_model(fused)
        variants["compiled: optimize_for_inference(logits_only)"] = compile_model(logits_only)
        variants[OURS_FAST] = compile_model(move_to(copy.deepcopy(logits_only), device),
                                            cuda_graphs=device.type == "cuda")
        variants["compiled with inductor layout optimisation: optimize_for_inference(logits_only)"] = (
            torch.compile(copy.deepcopy(logits_only), fullgraph=True, dynamic=False))
    return variants


def check(name: str, got: torch.Tensor, reference: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
        return
    error = ((got.float() - reference).norm() / reference.norm()).item()
    if not error < 2e-2:
        raise AssertionError(f"{name}: relative error {error:.2e} over the float32 logits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc keeps freed memory, as in `cvt benchmark --keep-freed-memory`")
    parser.add_argument("--profile", action="store_true", help="CUDA: the top kernels of ours-fast")
    args = parser.parse_args()
    if args.profile and (args.device == "cpu" or args.no_compile):
        parser.error("--profile is for a compiled run on CUDA (--device cuda, without --no-compile)")
    if args.keep_freed_memory:
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    torch.manual_seed(0)
    model = cvt.create_model(args.model).eval().to(device)
    x = torch.randn(args.batch_size, 3, *model.img_size, device=device)
    with torch.inference_mode():
        reference = model(x)
    variants = {name: v.to(dtype) for name, v in variants_for(model, device, not args.no_compile).items()}
    if device.type == "cpu" and OURS_FAST in variants:
        variants[f"{OURS_FAST} without reuse_cpu_buffers"] = variants[OURS_FAST]
        variants[OURS_FAST] = _reusing_cpu_buffers(variants[OURS_FAST])
    x = x.to(dtype)
    with torch.inference_mode():
        for name, fn in variants.items():
            check(name, fn(x), reference)
        medians = _interleaved_medians({n: (lambda f=f: f(x)) for n, f in variants.items()}, 2, args.repeats,
                                       device)
    base = medians["plain eager"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {where}, torch {torch.__version__}, "
          f"median of {args.repeats}" + (", glibc keeping freed memory" if args.keep_freed_memory else ""))
    print("| variant | img/s | speed-up over plain eager |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {args.batch_size / seconds:.1f} | {base / seconds:.2f}x |")
    if args.profile:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                variants[OURS_FAST](x)
            torch.cuda.synchronize(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))


if __name__ == "__main__":
    main()
