"""What each speed-up of `cvt.accel` buys over the plain eager model: interleaved medians, same weights and input.

    python benchmarks/fast_paths.py --threads 2 --batch-size 16 [--keep-freed-memory]
    python benchmarks/fast_paths.py --threads 2 --batch-size 16 --train
    python benchmarks/fast_paths.py --device cuda --dtype bfloat16 --batch-size 256 [--profile]

Inference rows: the plain model; each speed-up of `optimize_for_inference` alone, without compiling (`fold_bn`,
`logits_only`, and on the CPU `onednn_linears`: on other devices it computes plain linears); all of them without
compiling; `compile_model` on the plain model; on CUDA, compiled with tap sums alone and with CUDA graphs alone;
ours-fast (`optimize_for_inference` with its defaults, as benchmarks/benchmark.py runs it). Every variant is
first checked against the plain model in float32: to 1e-4 absolute in float32, to 2e-2 relative (norm of the
difference over the norm of the logits) in bfloat16.

`--train` times a training step instead (forward, cross-entropy, backward, fused AdamW, autocast in bfloat16, as
the engine runs it): the plain model and `cvt.accel.accelerate_training`'s, each eager and compiled, which is
what the engine's `train.accel` switches.

`--profile` (CUDA) then prints the kernels that take the most GPU time in three calls of ours-fast
(`torch.profiler`): where the time of the fastest mode goes. On the CPU the profiler's per-operator times inside
a compiled graph were seen to be far off (a product timed at twice what it and the LayerNorm before it took
without the profiler), so it is not offered there.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmark import benchmark_model, interleaved_medians, ours_fast_inference, training_step
from cvt.accel import accelerate_training, compile_model, optimize_for_inference
from cvt.cli import parse_overrides
from cvt.model import CvT
from cvt.process import keep_freed_memory
from machine import describe_device

OURS_FAST = "ours-fast (optimize_for_inference defaults: all compiled)"
# Every speed-up of optimize_for_inference off; a variant turns on the ones it names.
ALL_OFF = dict(fold_bn=False, logits_only=False, onednn_linears=False, tap_sums=False, cuda_graphs=False)


def inference_variants(model: CvT, dtype: torch.dtype, compile_them: bool
                       ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    device = next(model.parameters()).device
    # The speed-ups are made in float32 (BatchNorm folded in float32), then cast, as ours-fast is.
    variants = {"plain eager": copy.deepcopy(model),
                "fold_bn": optimize_for_inference(model, compile=False, **dict(ALL_OFF, fold_bn=True)),
                "logits_only": optimize_for_inference(model, compile=False, **dict(ALL_OFF, logits_only=True))}
    if device.type == "cpu":
        variants["onednn_linears"] = optimize_for_inference(model, compile=False,
                                                            **dict(ALL_OFF, onednn_linears=True))
    variants["all eager"] = optimize_for_inference(model, compile=False)
    if compile_them:
        variants["plain compiled"] = compile_model(copy.deepcopy(model))
        if device.type == "cuda":
            variants["tap_sums compiled"] = optimize_for_inference(model, **dict(ALL_OFF, tap_sums=True))
            variants["cuda_graphs compiled"] = optimize_for_inference(model, **dict(ALL_OFF, cuda_graphs=True))
    variants = {name: v.to(dtype) for name, v in variants.items()}
    if compile_them:
        variants[OURS_FAST] = ours_fast_inference(model, dtype, compile=True)
    return variants


def training_variants(model: CvT, dtype: torch.dtype, compile_them: bool
                      ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    device = next(model.parameters()).device
    autocast_dtype = None if dtype == torch.float32 else dtype
    steps = {}
    for compiled in (False, True) if compile_them else (False,):
        how = "compiled" if compiled else "eager"
        plain = copy.deepcopy(model)
        accelerated = accelerate_training(copy.deepcopy(model), device, compiled=compiled)
        steps[f"plain {how}"] = training_step(plain, plain, True, compiled, autocast_dtype, device)
        steps[f"accelerate_training {how}"] = training_step(accelerated, accelerated, True, compiled,
                                                             autocast_dtype, device)
    return steps


def check(name: str, got: torch.Tensor, reference: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
        return
    error = ((got.float() - reference).norm() / reference.norm()).item()
    if not error < 2e-2:
        raise AssertionError(f"{name}: relative error {error:.2e} over the float32 logits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--train", action="store_true", help="time a training step instead of inference")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU: glibc keeps freed memory, as in benchmark.py --keep-freed-memory")
    parser.add_argument("--profile", action="store_true", help="CUDA: the top kernels of ours-fast")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model overrides, e.g. depths=[1,1,2]")
    args = parser.parse_args(argv)
    if args.profile and (args.device == "cpu" or args.no_compile or args.train):
        parser.error("--profile is for compiled inference on CUDA (--device cuda, without --no-compile or --train)")
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc's allocator, which this process does not use")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    torch.manual_seed(0)
    model = benchmark_model(args.model, parse_overrides(args.set), device).eval()
    x = torch.randn(args.batch_size, model.in_chans, *model.img_size, device=device)
    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {describe_device(device)}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}"
          + (", glibc keeping freed memory" if args.keep_freed_memory else ""))
    if args.train:
        y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
        steps = training_variants(model, dtype, not args.no_compile)
        medians = interleaved_medians({n: (lambda s=s: s(x, y)) for n, s in steps.items()}, 2, args.repeats, device)
    else:
        variants = inference_variants(model, dtype, not args.no_compile)
        with torch.inference_mode():
            reference = model(x)
            x = x.to(dtype)
            for name, fn in variants.items():
                check(name, fn(x), reference)
            medians = interleaved_medians({n: (lambda f=f: f(x)) for n, f in variants.items()}, 2, args.repeats,
                                          device)
    base = medians["plain eager"]
    print(f"| {'training step' if args.train else 'inference'} | img/s | speed-up over plain eager |")
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
