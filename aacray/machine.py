"""What a benchmark ran on, in one line: the CPU (model, matrix units, threads) or the GPU.

Benchmarks print ratios against a baseline and the matmul rate of the same run; this line
says which machine class those figures belong to. The matrix units decide what bf16 can
gain on a CPU: AMX (`amx_bf16`) multiplies bf16 tiles at several times the fp32 rate,
AVX-512 bf16 (`avx512_bf16`) at about twice, and without either torch emulates bf16 matmul
(about 1% of fp32's rate on an AVX2-only EPYC), so bf16 figures there mean nothing.

`cpu_by_role` says where a job's CPU went while it ran, by process role (the job's actors in
their blocks or starting, Ray's own actors and daemons, the driver), from samples of /proc:
on a small machine Ray's fixed start-up and housekeeping share the cores with the scorer.
"""

from __future__ import annotations

import os
import platform
import re
from itertools import pairwise

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


def bf16_emulated(flags: set[str] | None = None) -> bool:
    """True on an x86 CPU with neither bf16 matrix unit (flags: this machine's by default),
    where torch emulates bf16 matmul at about 1% of fp32's rate. False where that cannot be
    told: no flags (not Linux), or not x86 (Arm CPUs name their bf16 support otherwise)."""
    flags = cpu_info()[1] if flags is None else flags
    return bool(flags) and platform.machine() in ("x86_64", "AMD64") and not any(f in flags for f, _ in _UNITS)


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


# --------------------------------------------------------------------------------------
# Where a job's CPU went, by process role (Linux /proc): a benchmark's breakdown
# --------------------------------------------------------------------------------------

# (role, pattern on a process's title or command line): the first match names its role.
# Ray names a worker process ray::<actor class>.<method> while it runs a method, ray::<class>
# between calls and ray::IDLE before its first task; its daemons keep their command lines.
PROCESS_ROLES = (
    ("pool actors: blocks", re.compile(r"^ray::MapWorker\(.*\)\.submit")),
    ("pool actors: constructor", re.compile(r"^ray::MapWorker\(.*\)\.__init__")),
    ("pool actors: between blocks", re.compile(r"^ray::MapWorker\(")),
    ("workers starting", re.compile(r"^ray::IDLE|default_worker\.py")),
    ("Ray Data's own actors", re.compile(r"^ray::_?(StatsActor|AutoscalingCoordinatorActor|ActorLocationTracker|AutoscalingRequester)")),
    ("Ray daemons", re.compile(r"gcs_server|/raylet |log_monitor|ray::DashboardAgent|ray::RuntimeEnvAgent|dashboard/|monitor\.py")),
)
SCORING = "pool actors: blocks"  # the role whose first CPU tick ends the start-up phase


def process_role(title: str, pid: int = -1, driver: int | None = None) -> str:
    if pid == driver:
        return "driver"
    for role, pattern in PROCESS_ROLES:
        if pattern.search(title):
            return role
    return "other processes"


def read_processes(proc: str = "/proc") -> tuple[dict[int, tuple[int, str]], int]:
    """({pid: (CPU ticks used so far, title)}, the machine's idle ticks so far) from `proc`."""
    procs = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat") as f:
                stat = f.read()
            with open(f"{proc}/{name}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone since listed
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        procs[int(name)] = (int(fields[11]) + int(fields[12]), title)  # utime + stime
    with open(f"{proc}/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    return procs, cpu[3] + cpu[4]  # idle + iowait


def cpu_between(a: tuple[float, dict[int, tuple[int, str]], int], b: tuple[float, dict[int, tuple[int, str]], int],
                driver: int, hz: int) -> dict[str, float]:
    """Two samples (time, processes, idle ticks) of `read_processes` -> {"seconds": wall,
    "idle": machine idle CPU-s, role: CPU-s} between them. A tick counts under the role of
    its process's title in the later sample."""
    (t0, before, idle0), (t1, after, idle1) = a, b
    used = {"seconds": t1 - t0, "idle": (idle1 - idle0) / hz}
    for pid, (ticks, title) in after.items():
        d = ticks - before.get(pid, (0, ""))[0]
        if d > 0:
            role = process_role(title, pid, driver)
            used[role] = used.get(role, 0.0) + d / hz
    return used


def cpu_by_role(samples: list[tuple[float, dict[int, tuple[int, str]], int]], driver: int, hz: int) -> dict:
    """Samples (time, processes, idle ticks) of `read_processes` taken while a job ran ->
    {phase: {"seconds": wall, "idle": machine idle CPU-s, role: CPU-s}} for the phases
    "start-up" (until the first interval in which SCORING used CPU), "scoring" (to the last
    such interval) and "wind-down" (after it: reduction, commit, shutdown). A tick between two
    samples counts under the role of the process's title in the later one."""
    intervals = [cpu_between(a, b, driver, hz) for a, b in pairwise(samples)]
    scoring = [i for i, used in enumerate(intervals) if SCORING in used]
    first, last = (scoring[0], scoring[-1]) if scoring else (len(intervals), len(intervals))
    phases: dict[str, dict[str, float]] = {}
    for i, used in enumerate(intervals):
        acc = phases.setdefault("start-up" if i < first else "scoring" if i <= last else "wind-down", {})
        for key, v in used.items():
            acc[key] = acc.get(key, 0.0) + v
    return phases
