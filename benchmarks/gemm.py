"""Float32 speed of CvT-13's products and attention on the CPU: why `OneDNNLinear`, and what attention costs.

    python benchmarks/gemm.py --threads 2 [--keep-freed-memory]

Two tables for a batch (`--batch-size`, default 16) at 224, each a median of `--repeats` calls:

- the linear layers' products by MKL (`F.linear`, PyTorch's float32 CPU matmul) and by oneDNN
  (`cvt.accel.OneDNNLinear`, the same product as a 1x1 convolution), forward and forward + backward, in GFLOP/s;
- the attention of each stage (softmax(q @ k.T * scale) @ v) by `scaled_dot_product_attention` (PyTorch's flash
  kernel) and materialised (the score matrix written out, as the official code computes it), forward and
  forward + backward, in ms per batch summed over the stage's blocks.

`--keep-freed-memory`: glibc keeps freed blocks (`cvt.process.keep_freed_memory`, as in
benchmark.py --keep-freed-memory), so that an output buffer larger than glibc's mmap threshold does not cost
page faults at every call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvt.accel import OneDNNLinear
from cvt.process import keep_freed_memory
from machine import describe_device

# (tokens per image, in, out) of CvT-13's products: stage-2 MLP and q/proj, stage-1 MLP, stage-0 MLP.
SHAPES = [(197, 384, 1536), (197, 1536, 384), (197, 384, 384), (784, 192, 768), (784, 768, 192), (3136, 64, 256)]
# (stage, blocks, heads, queries, keys) of CvT-13's attention at 224 (head dim 64, keys and values at stride 2).
# The last block of ours-fast has one query (`logits_only`), so stage 2 counts its 9 other blocks.
ATTENTION = [(0, 1, 1, 3136, 784), (1, 2, 3, 784, 196), (2, 9, 6, 197, 50)]
HEAD_DIM = 64


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_table(batch_size: int, repeats: int) -> None:
    print("| tokens x in -> out | MKL fwd | oneDNN fwd | MKL fwd+bwd | oneDNN fwd+bwd |")
    print("|---|---:|---:|---:|---:|")
    for tokens, fan_in, fan_out in SHAPES:
        mkl = nn.Linear(fan_in, fan_out)
        onednn = OneDNNLinear(fan_in, fan_out)
        x = torch.randn(batch_size, tokens, fan_in, requires_grad=True)
        flops = 2 * batch_size * tokens * fan_in * fan_out
        cells = []
        with torch.no_grad():
            cells += [flops / median_seconds(lambda layer=layer: layer(x), repeats) / 1e9 for layer in (mkl, onednn)]
        # The backward pass is two products of the forward's size: the input's gradient and the weight's.
        cells += [3 * flops / median_seconds(lambda layer=layer: layer(x).sum().backward(), repeats) / 1e9
                  for layer in (mkl, onednn)]
        print(f"| {tokens} x {fan_in} -> {fan_out} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print(f"(GFLOP/s, median of {repeats} calls)")


def attention_table(batch_size: int, repeats: int) -> None:
    print("| stage: blocks x heads x queries x keys | SDPA fwd | materialised fwd | SDPA fwd+bwd "
          "| materialised fwd+bwd |")
    print("|---|---:|---:|---:|---:|")
    scale = HEAD_DIM ** -0.5
    totals = torch.zeros(4)
    for stage, blocks, heads, queries, keys in ATTENTION:
        q = torch.randn(batch_size, heads, queries, HEAD_DIM, requires_grad=True)
        k, v = (t.requires_grad_() for t in torch.randn(2, batch_size, heads, keys, HEAD_DIM).unbind(0))
        grad = torch.randn_like(q)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        materialised = lambda: ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v  # noqa: E731
        with torch.no_grad():
            times = [median_seconds(f, repeats) for f in (sdpa, materialised)]
        times += [median_seconds(lambda f=f: f().backward(grad), repeats) for f in (sdpa, materialised)]
        per_batch = blocks * torch.tensor(times)
        totals += per_batch
        print(f"| {stage}: {blocks} x {heads} x {queries} x {keys} | "
              + " | ".join(f"{1e3 * t:.1f}" for t in per_batch.tolist()) + " |")
    print(f"(ms over all the stage's blocks per batch of {batch_size}, median of {repeats} calls. All blocks: "
          + ", ".join(f"{name} {1e3 * t:.0f} ms" for name, t in
                      zip(("SDPA", "materialised", "SDPA fwd+bwd", "materialised fwd+bwd"), totals.tolist()))
          + ")")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc's allocator, which this process does not use")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{describe_device(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (", glibc keeping freed memory" if args.keep_freed_memory else ""))
    linear_table(args.batch_size, args.repeats)
    print()
    attention_table(args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
