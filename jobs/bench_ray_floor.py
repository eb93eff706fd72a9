"""What Ray itself takes of this machine while a score_matrix-shaped pool runs: the ceiling of
`bench_scoring.py --only ray`'s Ray / in-process ratio (docs/benchmarks.md, issue 20 point 5).

    python jobs/bench_ray_floor.py [--actors 2] [--cpus-per-actor 1] [--units 8] [--unit-seconds 15]

The same embedded Ray and actor pool as the jobs (`runtime.init_ray`, `stage.map_actors`, one
unit in flight per actor), but each unit sleeps instead of scoring: every CPU tick in the
window is Ray's own (its daemons, Ray Data's executor in the driver and its three internal
actors, the idle pool actors) or another process's. Prints the time to the first unit (worker
boot and `ray.data` import, no torch), then CPU seconds by process role over the window from
the first unit's end to the last's (`machine.read_processes`, `machine.cpu_between`), and
Ray's share of the machine: scoring actors can get at most the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aacray import machine  # noqa: E402
from aacray.config import ActorConfig  # noqa: E402


class Sleeper:
    """A pool actor whose unit sleeps: (unit, when it started) per row."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, batch: dict) -> dict:
        started = time.time()
        time.sleep(self.seconds)
        return {"unit": batch["unit"], "started": [started] * len(batch["unit"])}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--units", type=int, default=8, help="units in all (score_matrix's 420 x 400 demo: 8 blocks)")
    p.add_argument("--unit-seconds", type=float, default=15.0)
    args = p.parse_args(argv)
    import ray.data

    from aacray.runtime import init_ray, setup_logging
    from aacray.stage import map_actors

    setup_logging()
    cores = os.cpu_count() or 1
    init_ray(None, cores)
    print(machine.describe(), flush=True)
    actors = ActorConfig(num_actors=args.actors, num_cpus=args.cpus_per_actor)
    ds = ray.data.from_items([{"unit": i} for i in range(args.units)], override_num_blocks=args.units)
    ds = map_actors(ds, Sleeper, {"seconds": args.unit_seconds}, actors, batch_size=1, one_task_per_actor=True)
    t0 = time.time()
    rows = iter(ds.iter_rows())
    first = next(rows)
    sample_a = (time.time(), *machine.read_processes())
    starts = [first["started"]] + [r["started"] for r in rows]
    sample_b = (time.time(), *machine.read_processes())
    by_role = machine.cpu_between(sample_a, sample_b, os.getpid(), os.sysconf("SC_CLK_TCK"))
    window, idle = by_role.pop("seconds"), by_role.pop("idle")
    print(f"{args.actors} actors x {args.cpus_per_actor:g} CPU, {args.units} units of {args.unit_seconds:g} s asleep; "
          f"first unit started {min(starts) - t0:.1f} s after the dataset ran; window {window:.1f} s")
    print(f"| role | CPU-s | share of {cores} CPUs |\n| --- | --- | --- |")
    for role, used in sorted(by_role.items(), key=lambda kv: -kv[1]):
        print(f"| {role} | {used:.2f} | {used / (cores * window):.1%} |")
    print(f"| idle | {idle:.2f} | {idle / (cores * window):.1%} |")
    ray_share = sum(v for r, v in by_role.items() if r != "other processes") / (cores * window)
    print(f"Ray's own processes: {ray_share:.1%} of the machine; scoring actors get at most {1 - ray_share:.1%} of it "
          f"while they run, before start-up and the idle tail")


if __name__ == "__main__":
    main(sys.argv[1:])
