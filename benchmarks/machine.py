"""The machine a benchmark ran on, named precisely enough to tell which kernels ran: used by every script here.

A CPU's marketing name says little ("AMD EPYC" covers several generations), so the CPU is named by its vendor,
family and model numbers and by the instruction sets that decide PyTorch's and oneDNN's kernels: AVX-512 (else
AVX2) for float32, AVX512-BF16 and AMX for bfloat16.
"""
from __future__ import annotations

import platform

import torch

# (flag in /proc/cpuinfo, name) of the bfloat16 instructions; each is named, or "no <name>" when absent.
BF16_ISA = (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))


def describe_device(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The device, e.g. `NVIDIA H100 80GB HBM3 (compute capability 9.0, 132 SMs, 79 GiB)` or
    `AMD EPYC (AuthenticAMD family 25 model 17; AVX-512, AVX512-BF16, no AMX; torch capability AVX512)`.

    `cpuinfo`: the file describing the CPU (Linux's /proc/cpuinfo); where it cannot be read, the CPU is named
    from `platform` alone.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB)")
    if device.type != "cpu":
        return str(device)
    fields = first_processor(cpuinfo)
    parts = []
    if "vendor_id" in fields:
        parts.append(f"{fields['vendor_id']} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}")
    flags = set(fields.get("flags", "").split())
    if flags:
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        parts.append(", ".join([vector] + [name if flag in flags else f"no {name}" for flag, name in BF16_ISA]))
    parts.append(f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({'; '.join(parts)})"


def first_processor(cpuinfo: str) -> dict[str, str]:
    """The `key: value` fields of the first processor in a /proc/cpuinfo file (all processors are alike)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip() and fields:
                    break
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields
