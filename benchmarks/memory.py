"""Training memory with and without activation checkpointing (`model.set_grad_checkpointing`, the engine's
`model.grad_checkpointing`): the peak resident memory one training step adds on the CPU.

    python benchmarks/memory.py --model cvt_w24_384 --batch-size 2

Each setting runs in a fresh process, which builds the model, runs one step (forward, cross-entropy, backward)
and reports its peak resident memory (Linux VmHWM) above what the built model held, i.e. the activations kept for
the backward pass and the gradients; an optimizer's state would add the same to both. glibc is told to return
freed memory to the system, so that the peak follows the live tensors.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from machine import describe_device

STEP = r'''
import ctypes, json, sys, time
import torch
import torch.nn.functional as F
import cvt

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: every large tensor its own mapping, returned on free
libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
name, batch, checkpointing = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

torch.manual_seed(0)
model = cvt.create_model(name).train()
model.set_grad_checkpointing(checkpointing)
size = model.img_size
x, y = torch.randn(batch, 3, *size), torch.randint(0, 1000, (batch,))
libc.malloc_trim(0)
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM from here
start = time.perf_counter()
F.cross_entropy(model(x), y).backward()
seconds = time.perf_counter() - start
print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024, "seconds": seconds}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_w24_384")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    import torch

    print(f"{args.model} @ its native size, batch {args.batch_size}, float32, one training step; "
          f"{describe_device(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| activation checkpointing | step peak above the model (MiB) | step seconds |")
    print("|---|---:|---:|")
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, "-c", STEP, args.model, str(args.batch_size), str(int(checkpointing))],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {'on' if checkpointing else 'off'} | {result['peak_mib']:.0f} | {result['seconds']:.1f} |")


if __name__ == "__main__":
    main()
