"""Why `OneDNNLinear`: float32 GFLOP/s of CvT-13's linear layers (batch 16 @ 224) by MKL (`F.linear`) and by
oneDNN (`OneDNNLinear`, a 1x1 convolution), forward and forward + backward.

    python benchmarks/gemm.py --threads 2 [--keep-freed-memory]

`--keep-freed-memory`: glibc keeps freed blocks (as in `cvt benchmark --keep-freed-memory`), so that an output
buffer larger than glibc's mmap threshold does not cost page faults at every call.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from cvt.benchmark import retain_freed_memory
from cvt.fast import use_onednn_linears

# (tokens per image, in, out) of CvT-13's products: stage-2 MLP and q/proj, stage-1 MLP, stage-0 MLP.
SHAPES = [(197, 384, 1536), (197, 1536, 384), (197, 384, 384), (784, 192, 768), (784, 768, 192), (3136, 64, 256)]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
          + (", glibc keeping freed memory" if args.keep_freed_memory else ""))
    print("| tokens x in -> out | MKL fwd | oneDNN fwd | MKL fwd+bwd | oneDNN fwd+bwd |")
    print("|---|---:|---:|---:|---:|")
    for tokens, fan_in, fan_out in SHAPES:
        mkl = nn.Linear(fan_in, fan_out)
        onednn = use_onednn_linears(nn.Sequential(nn.Linear(fan_in, fan_out)))
        x = torch.randn(args.batch_size, tokens, fan_in, requires_grad=True)
        flops = 2 * x.shape[0] * tokens * fan_in * fan_out
        cells = []
        for backward in (False, True):
            for layer in (mkl, onednn):
                if backward:
                    seconds = median_seconds(lambda layer=layer: layer(x).sum().backward(), args.repeats)
                    cells.append(3 * flops / seconds / 1e9)
                else:
                    with torch.no_grad():
                        cells.append(flops / median_seconds(lambda layer=layer: layer(x), args.repeats) / 1e9)
        print(f"| {tokens} x {fan_in} -> {fan_out} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print("(GFLOP/s, median of", args.repeats, "calls)")


if __name__ == "__main__":
    main()
