"""What each inference fast path buys, alone and together: interleaved medians on the same weights and input.

    python benchmarks/fast_paths.py --threads 2 --batch-size 16

Rows: the plain model; oneDNN linears; `optimize_for_inference` (BatchNorm folded, fused k/v, channels-last)
with and without oneDNN linears; `compile_model` on the unfused and the fused model; the fused model compiled
with inductor's layout optimisation left on.
"""
import argparse
import copy

import torch

import cvt
from cvt.benchmark import _interleaved_medians
from cvt.fast import compile_model, optimize_for_inference, use_onednn_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13_224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cvt.create_model(args.model).eval()
    fused = optimize_for_inference(model)
    variants = {
        "plain eager": model,
        "oneDNN linears": use_onednn_linears(copy.deepcopy(model)),
        "optimize_for_inference": fused,
        "optimize_for_inference + oneDNN linears": use_onednn_linears(copy.deepcopy(fused)),
        "optimize_for_inference(logits_only) + oneDNN linears": use_onednn_linears(
            optimize_for_inference(model, logits_only=True)),
    }
    if not args.no_compile:
        variants["compiled: oneDNN linears"] = compile_model(variants["oneDNN linears"])
        variants["compiled: optimize_for_inference + oneDNN linears"] = compile_model(
            variants["optimize_for_inference + oneDNN linears"])
        variants["compiled: optimize_for_inference(logits_only) + oneDNN linears (ours-fast)"] = compile_model(
            variants["optimize_for_inference(logits_only) + oneDNN linears"])
        # The same module as "compiled: optimize_for_inference + oneDNN linears", the layout optimisation left on.
        fused_onednn = variants["optimize_for_inference + oneDNN linears"]
        variants["compiled with inductor layout optimisation: optimize_for_inference + oneDNN linears"] = (
            torch.compile(copy.deepcopy(fused_onednn), fullgraph=True, dynamic=False))
    x = torch.randn(args.batch_size, 3, *model.img_size)
    with torch.inference_mode():
        reference = model(x)
        for name, fn in variants.items():
            torch.testing.assert_close(fn(x), reference, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        medians = _interleaved_medians({n: (lambda f=f: f(x)) for n, f in variants.items()}, 1, args.repeats,
                                       torch.device("cpu"))
    base = medians["plain eager"]
    print(f"{args.model}, batch {args.batch_size}, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print("| variant | img/s | speed-up over plain eager |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {args.batch_size / seconds:.1f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
