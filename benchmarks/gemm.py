"""Float32 GFLOP/s of CvT-13's products (batch 16 @ 224) on the CPU: why `OneDNNLinear`, and what attention costs.

    python benchmarks/gemm.py --threads 2 [--keep-freed-memory]

The linear layers by MKL (`F.linear`) and by oneDNN (`OneDNNLinear`, a 1x1 convolution), forward and forward +
backward; oneDNN's 1x1 convolution against its matmul on one to four images (`OneDNNLinear`'s choice without
gradient); then the attention of each stage (q @ k.T, softmax, @ v) by `scaled_dot_product_attention` (PyTorch's
flash kernel, whose block products are MKL's), materialised (the score matrix written out, as the official code
does) and by `torch.ops.cvt.onednn_attention` (`use_onednn_attention`: the flash scheme with oneDNN block
products), forward and forward + backward, with the time per batch summed over the stage's blocks.

Then the two bfloat16 paths of the CPU (outside the float32 targets): attention by PyTorch's kernel in bfloat16
against ours on float32 copies (what `use_onednn_attention` does for bfloat16 without AMX), and the backward pass
of the depth-wise k/v projections (3x3, stride 2) in bfloat16 against float32 (`cvt.model.depthwise_convs_in_float32`).

`--keep-freed-memory`: glibc keeps freed blocks (as in `cvt benchmark --keep-freed-memory`), so that an output
buffer larger than glibc's mmap threshold does not cost page faults at every call.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvt.benchmark import retain_freed_memory
from cvt.fast import onednn_conv1x1, onednn_matmul, use_onednn_attention, use_onednn_linears

# (tokens per image, in, out) of CvT-13's products: stage-2 MLP and q/proj, stage-1 MLP, stage-0 MLP.
SHAPES = [(197, 384, 1536), (197, 1536, 384), (197, 384, 384), (784, 192, 768), (784, 768, 192), (3136, 64, 256)]
# Products of a few images: stage 2's q/proj, MLP and k/v (stride 2) products, stage 1's q/proj.
FEW_ROWS = [(197, 384, 384), (197, 384, 1536), (197, 1536, 384), (50, 384, 384), (784, 192, 192)]
# (stage, blocks, heads, queries, keys) of CvT-13's attention at 224 (head dim 64, keys and values at stride 2).
# The last block of ours-fast has one query (`logits_only`), so stage 2 counts its 9 other blocks.
ATTENTION = [(0, 1, 1, 3136, 784), (1, 2, 3, 784, 196), (2, 9, 6, 197, 50)]
# (stage, channels, map size) of CvT-13's depth-wise k/v projections at 224.
DEPTHWISE = [(0, 64, 56), (1, 192, 28), (2, 384, 14)]


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

    print("\n| tokens x in -> out, images | rows | oneDNN 1x1 conv | oneDNN matmul |")
    print("|---|---:|---:|---:|")
    for images in (1, 2, 4):
        for tokens, fan_in, fan_out in FEW_ROWS:
            x, weight, bias = torch.randn(images, tokens, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
            flops = 2 * images * tokens * fan_in * fan_out
            with torch.no_grad():
                cells = [flops / median_seconds(lambda fn=fn: fn(x, weight, bias), args.repeats) / 1e9
                         for fn in (onednn_conv1x1, onednn_matmul)]
            print(f"| {tokens} x {fan_in} -> {fan_out}, {images} | {images * tokens} | "
                  + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print("(GFLOP/s without gradient, median of", args.repeats, "calls)")

    use_onednn_attention(nn.Module())  # builds the kernel
    print("\n| stage: blocks x heads x queries x keys | SDPA | materialised | oneDNN attention | SDPA ms per batch "
          "| oneDNN attention ms per batch | SDPA fwd+bwd ms | oneDNN attention fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = torch.zeros(4)
    for stage, blocks, heads, queries, keys in ATTENTION:
        q = torch.randn(args.batch_size, heads, queries, 64, requires_grad=True)
        k, v = (t.requires_grad_() for t in torch.randn(2, args.batch_size, heads, keys, 64).unbind(0))
        grad = torch.randn_like(q)
        flops = 4 * args.batch_size * heads * queries * keys * 64
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=64 ** -0.5)
        onednn = lambda: torch.ops.cvt.onednn_attention(q, k, v, 64 ** -0.5)[0]
        with torch.no_grad():
            times = [median_seconds(sdpa, args.repeats),
                     median_seconds(lambda: ((q * 64 ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v, args.repeats),
                     median_seconds(onednn, args.repeats)]
        times += [median_seconds(lambda f=f: f().backward(grad), args.repeats) for f in (sdpa, onednn)]
        per_batch = blocks * torch.tensor([times[0], times[2], times[3], times[4]])
        totals += per_batch
        print(f"| {stage}: {blocks} x {heads} x {queries} x {keys} | "
              + " | ".join(f"{flops / t / 1e9:.0f}" for t in times[:3]) + " | "
              + " | ".join(f"{1e3 * t:.1f}" for t in per_batch.tolist()) + " |")
    print(f"(GFLOP/s, then ms over all the stage's blocks per batch of {args.batch_size}; median of {args.repeats} "
          f"calls. All blocks: SDPA {1e3 * totals[0]:.0f} ms, oneDNN attention {1e3 * totals[1]:.0f} ms; with the "
          f"backward pass {1e3 * totals[2]:.0f} and {1e3 * totals[3]:.0f} ms)")

    print("\n| stage: blocks x heads x queries x keys | SDPA in bfloat16 ms per batch "
          "| oneDNN attention on float32 copies ms per batch |")
    print("|---|---:|---:|")
    for stage, blocks, heads, queries, keys in ATTENTION:
        q = torch.randn(args.batch_size, heads, queries, 64, dtype=torch.bfloat16)
        k, v = torch.randn(2, args.batch_size, heads, keys, 64, dtype=torch.bfloat16).unbind(0)
        with torch.no_grad():
            times = [median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, scale=64 ** -0.5), args.repeats),
                     median_seconds(lambda: torch.ops.cvt.onednn_attention(q.float(), k.float(), v.float(),
                                                                           64 ** -0.5)[0].bfloat16(), args.repeats)]
        print(f"| {stage}: {blocks} x {heads} x {queries} x {keys} | "
              + " | ".join(f"{1e3 * blocks * t:.1f}" for t in times) + " |")

    print("\n| stage: depth-wise k/v conv, channels x map, stride 2 | backward float32 ms | backward bfloat16 ms |")
    print("|---|---:|---:|")
    for stage, channels, size in DEPTHWISE:
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(args.batch_size, channels, size, size, dtype=dtype).to(memory_format=torch.channels_last)
            conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False).to(dtype)
            x.requires_grad_()
            y = conv(x)
            grad = torch.randn_like(y)
            cells.append(median_seconds(lambda y=y, grad=grad: torch.autograd.grad(y, (x, conv.weight), grad,
                                                                                 retain_graph=True), args.repeats))
        print(f"| {stage}: {channels} x {size}x{size} | " + " | ".join(f"{1e3 * t:.2f}" for t in cells) + " |")
    print("(ms per call, median of", args.repeats, "calls)")


if __name__ == "__main__":
    main()
