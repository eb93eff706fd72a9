"""What a benchmark ran on, in one line: the CPU (model, matrix units, threads) or the GPU.

Benchmarks print ratios against a baseline and the matmul rate of the same run; this line
says which machine class those figures belong to. The matrix units decide what bf16 can
gain on a CPU: AMX (`amx_bf16`) multiplies bf16 tiles at several times the fp32 rate,
AVX-512 bf16 (`avx512_bf16`) at about twice, and without either torch emulates bf16 matmul
(about 1% of fp32's rate on an AVX2-only EPYC), so bf16 figures there mean nothing.
"""

from __future__ import annotations

import os
import platform

import torch

_UNITS = (
    ("amx_bf16", "AMX (amx_bf16)"),
    ("avx512_bf16", "AVX-512 bf16 (avx512_bf16), no AMX"),
)


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, feature flags) of the first CPU listed in `path`; the platform's
    processor string and no flags where there is no such file (not Linux)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown CPU", set()
    first = text.split("\n\n", 1)[0]  # one block per logical CPU; the first one's
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.processor() or "unknown CPU"), set(fields.get("flags", "").split())


def matrix_units(flags: set[str]) -> str:
    """The CPU's bf16 matrix units, from its flags."""
    for flag, name in _UNITS:
        if flag in flags:
            return name
    return "no bf16 matrix units (bf16 matmul emulated)"


def describe(device: str | torch.device = "cpu") -> str:
    """One line naming the machine: the GPU for a CUDA device, else the CPU, with torch's
    thread count and the CPU's vector capability as torch sees it."""
    device = torch.device(device)
    cpu, flags = cpu_info()
    host = (
        f"CPU {cpu}, {os.cpu_count()} CPUs, {matrix_units(flags)}, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    )
    if device.type != "cuda":
        return host
    p = torch.cuda.get_device_properties(device)
    return f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, sm {p.major}{p.minor}, CUDA {torch.version.cuda}); host {host}"
