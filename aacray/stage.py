"""The skeleton every Ray stage shares: actor set-up, the actor-pool mapping, the output's life.

A stage (extract, score_matrix, caption, perturb, reindex) reads as named phases:
plan (read and check inputs in the driver), set up (`Output.begin`, start Ray), run (a Ray
Data pipeline whose GPU/CPU step is `map_actors`), reduce, commit (`Output.commit`). What
each actor does once in its constructor is `actor_setup`: pick the device, size torch's
thread pool to the CPUs Ray reserved for it, load the checkpoint. Where the run's time went
is `PoolWork`: each unit of work timed inside the actor that scored it (metrics.json
`timing` of score_matrix, `reindex.timing` of reindex).

The output lifecycle is the storage contract (aacray/storage.py): the old manifest is
removed before anything else is touched, tables and side files are written, and the
manifest is written last, so a reader never takes a half-written output for a complete one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from aacray import storage
from aacray.config import ActorConfig, RayConfig, dump_yaml

log = logging.getLogger("aacray.stage")


# --------------------------------------------------------------------------------------
# Actors
# --------------------------------------------------------------------------------------


def actor_device(actors: ActorConfig) -> str:
    """The device of an actor of this pool: cuda when the pool asks for GPUs and one is
    visible, else cpu with torch's intra-op pool sized to the CPUs reserved per actor (Ray
    sets no thread limit, and two actors on a 2-core node would each start 2 threads)."""
    import torch

    if actors.num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(max(1, int(actors.num_cpus)))
    return "cpu"


def actor_setup(actors: ActorConfig, checkpoint: str, task: str = "clotho"):
    """(device, model, tokenizer, checkpoint info) for an actor's constructor; task: a CoNeTTE
    folder's task token (`checkpoint.load`)."""
    from aacray import checkpoint as ckpt_lib

    device = actor_device(actors)
    model, tok, info = ckpt_lib.load(checkpoint, device, task)
    return device, model, tok, info


def map_actors(ds, actor_cls: type, kwargs: dict, actors: ActorConfig, *, batch_size: int | None = None,
               one_task_per_actor: bool = False, pool_size: int | None = None):
    """`ds.map_batches` on a fixed-size actor pool with the pool's resources from config.

    batch_size: rows per call (default `actors.batch_size`). one_task_per_actor: a row is a
    long unit of work (a caption block, a reindex unit): one in flight per actor, so a unit
    never queues behind another on a busy actor while a free one idles. pool_size: fewer
    actors than configured when there are fewer units than actors.
    """
    import ray.data

    strategy = {"max_tasks_in_flight_per_actor": 1} if one_task_per_actor else {}
    memory = {"memory": int(actors.memory_gb * 2**30)} if actors.memory_gb else {}
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size or actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool_size or actors.num_actors, **strategy),
        num_gpus=actors.num_gpus,
        num_cpus=actors.num_cpus,
        **memory,
    )


# --------------------------------------------------------------------------------------
# Where a pool's time went (metrics.json `timing`)
# --------------------------------------------------------------------------------------


def actor_name() -> str:
    """This process as a worker of a pool: host:pid (an actor, or the driver scoring inline)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class PoolWork:
    """Who scored a run's units (score_matrix blocks, reindex units) and when, timed inside
    the actors: per actor its set-up (checkpoint, index, key/value cache), its unit seconds,
    when its first unit started and its last ended (wall clock: across nodes, as good as their
    clocks agree). Only this run's units are added (a resume does not time skipped ones)."""

    actors: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, actor: str, setup: float, started: float, seconds: float) -> None:
        w = self.actors.setdefault(actor, {"setup": setup, "units": 0.0, "first": math.inf, "last": 0.0})
        w["units"] += seconds
        w["first"] = min(w["first"], started)
        w["last"] = max(w["last"], started + seconds)

    def timing(self, job: str, num_actors: int, t_start: float, t_end: float, reduce_seconds: float) -> dict:
        """Where the scoring phase's time went. t_start, t_end: the pool's run (the Ray Data
        run, or the driver's loop when it scores inline); reduce_seconds: the merge after it.

        actor_busy_share: unit time over num_actors x the run (an actor with no unit counts
        as idle). The rest: until an actor's first unit (process start, imports, set-up, Ray's
        scheduling: `first_block_after_seconds`, the mean over actors), after its last
        (`idle_at_end_seconds`: the queue ran dry while others still scored), and between units.
        """
        work = self.actors.values()
        run = t_end - t_start
        busy = sum(w["units"] for w in work)
        mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else 0.0  # noqa: E731
        timing = {
            "ray_data_seconds": round(run, 2),
            "reduce_seconds": round(reduce_seconds, 2),
            "actors_used": len(work),
            "actor_setup_seconds_max": round(max((w["setup"] for w in work), default=0.0), 2),
            "first_block_after_seconds": mean([w["first"] - t_start for w in work]),
            "idle_at_end_seconds": mean([t_end - w["last"] for w in work]),
            "block_seconds_total": round(busy, 2),
            "actor_busy_share": round(busy / max(num_actors * run, 1e-9), 4),
        }
        if work:
            log.info(
                "%s: the actors scored for %.0f%% of the pool's %.1f s x %d actors; first unit after %.1f s "
                "(set-up %.1f s of it), idle at the end %.1f s (means over actors); reduction %.1f s",
                job, 100 * timing["actor_busy_share"], run, num_actors, timing["first_block_after_seconds"],
                timing["actor_setup_seconds_max"], timing["idle_at_end_seconds"], reduce_seconds,
            )
        return timing


# --------------------------------------------------------------------------------------
# The output
# --------------------------------------------------------------------------------------


@dataclass
class Output:
    """One job's output folder (local or s3://) through its lifecycle.

    `begin` invalidates an old output (manifest first) and clears the tables this job
    writes, then saves the resolved config beside them; `table` and `json` write the parts;
    `commit` writes the manifest last, listing every Parquet file of each table.
    """

    uri: str
    job: str
    tables: list[str]

    def begin(self, cfg: Any, clear: list[str] | None = None) -> Output:
        storage.begin_output(self.uri, self.tables + list(clear or []))
        storage.write_text(self.path("config.yaml"), dump_yaml(cfg))
        return self

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def table(self, name: str, table, rows_per_file: int = 1 << 20) -> list[str]:
        assert name in self.tables, f"{name} is not a table of {self.job} ({self.tables})"
        return storage.write_table(self.uri, name, table, rows_per_file)

    def json(self, name: str, obj: Any) -> None:
        storage.write_json(self.path(name), obj)

    def commit(self, extra: dict | None = None) -> dict:
        return storage.commit_output(self.uri, self.job, extra, self.tables)


# --------------------------------------------------------------------------------------
# Can Ray's nodes host the pool
# --------------------------------------------------------------------------------------


ACTOR_SETTINGS = {"CPU": "actors.num_cpus", "GPU": "actors.num_gpus", "memory": "actors.memory_gb",
                  "count": "actors.num_actors", "no GPU": "actors.num_gpus: 0"}
"""The setting behind each resource an actor of a `map_actors` pool asks Ray for (and the
one that runs it without a GPU)."""


def start_ray(job: str, ray_cfg: RayConfig, actors: ActorConfig) -> None:
    """Start or join Ray (`runtime.init_ray`) for a stage's actor pool, and refuse a pool
    its nodes cannot host (`check_nodes_host`); before the stage touches its output."""
    from aacray.runtime import init_ray

    init_ray(ray_cfg.address, ray_cfg.num_cpus)
    check_nodes_host(job, actor_demand(actors), ACTOR_SETTINGS, actors.num_actors)


def actor_demand(actors: ActorConfig) -> dict[str, float]:
    """What Ray reserves for one actor of this pool (what `map_actors` asks for)."""
    return {"CPU": actors.num_cpus, "GPU": actors.num_gpus, "memory": (actors.memory_gb or 0) * 2**30}


def live_nodes() -> list[dict[str, float]]:
    """The resources (Ray's totals) of each live node of the Ray this process is connected to."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def hosts_on(demand: dict[str, float], resources: dict[str, float]) -> int:
    """How many units of `demand` fit at once on a node with `resources` (Ray's totals)."""
    fit = [math.floor(resources.get(k, 0) / v + 1e-6) for k, v in demand.items() if v > 0]
    return min(fit) if fit else 1 << 30


def check_nodes_host(job: str, demand: dict[str, float], settings: dict[str, str], count: int = 1, *,
                     together: bool = False, spare_cpus: float = 0) -> None:
    """Refuse, before any output is touched, a pool Ray would wait for forever.

    demand: what one actor (worker) asks for; count: how many the pool wants; together:
    all of them must start at once (Ray Train's worker group), else one is enough to run;
    spare_cpus: CPUs that must stay free beside the group (the Ray Data reads that feed it).
    On an embedded Ray (`runtime.ray_is_embedded`: one node, no autoscaler) a pool its node
    cannot host is a BadInputError naming the settings to change; on a cluster the job
    waits for an autoscaler to add nodes, so it only warns. Fewer actors than asked fitting
    at once is logged (the pool runs with those)."""
    from aacray.errors import BadInputError
    from aacray.runtime import ray_is_embedded

    nodes = live_nodes()
    fits = sum(min(count, hosts_on(demand, res)) for res in nodes)
    spare = sum(res.get("CPU", 0) for res in nodes) - min(fits, count) * demand.get("CPU", 0)
    if fits >= (count if together else 1) and spare >= spare_cpus:
        if fits < count:
            log.warning("%s: Ray's nodes host %d of the %d actors at once (%s); the pool runs with those",
                        job, fits, count, settings["count"])
        return
    have = "; ".join(_describe(res) for res in nodes) or "no live node"
    what = (f"{count} x " if together else "") + _describe(demand, every=False)
    what += f" ({settings['count'] + ', ' if together else ''}{_named(demand, settings)})"
    if spare_cpus:
        what += f" and {spare_cpus:g} CPU beside them for the data reads"
    ways = _ways_out(demand, nodes, settings, count if together else 0, spare_cpus)
    if ray_is_embedded():
        raise BadInputError(f"{job}: this embedded Ray cannot host {what}: it has {have}, and no autoscaler "
                            f"to add nodes, so the job would wait forever. Ways out: {ways}")
    log.warning("%s: the Ray cluster cannot host %s now (it has %s); the job waits until an autoscaler adds "
                "nodes. If this cluster cannot, stop the job (ray job stop) and %s", job, what, have, ways)


def _named(demand: dict[str, float], settings: dict[str, str]) -> str:
    return ", ".join(settings[k] for k, v in demand.items() if v > 0 and k in settings)


def _describe(res: dict[str, float], every: bool = True) -> str:
    """'2 CPU, 0 GPU, 16.0 GiB memory' (every=False: the nonzero ones only)."""
    got = {"CPU": f"{res.get('CPU', 0):g} CPU", "GPU": f"{res.get('GPU', 0):g} GPU",
           "memory": f"{res.get('memory', 0) / 2**30:.1f} GiB memory"}
    return ", ".join(v for k, v in got.items() if every or res.get(k, 0) > 0) or "nothing"


def _ways_out(demand: dict[str, float], nodes: list[dict], settings: dict[str, str], together: int,
              spare_cpus: float) -> str:
    """What to change: for each resource no node has enough of, else the group's size."""
    most = {k: max((res.get(k, 0) for res in nodes), default=0) for k in ("CPU", "GPU", "memory")}
    ways = []
    if demand.get("GPU", 0) > most["GPU"]:
        ways.append(f"run on CPUs ({settings['no GPU']}), or where this process sees a GPU")
    if demand.get("CPU", 0) > most["CPU"]:
        ways.append(f"lower {settings['CPU']} to {most['CPU']:g} or less, or give an embedded Ray more CPUs (ray.num_cpus)")
    if demand.get("memory", 0) > most["memory"]:
        ways.append(f"lower {settings['memory']} under {most['memory'] / 2**30:.1f} or leave it unset")
    if not ways and together:
        need = together * demand.get("CPU", 0) + spare_cpus
        ways.append(f"lower {settings['count']} (now {together}) or {settings['CPU']}, or give an embedded Ray "
                    f"{need:g} CPUs or more (ray.num_cpus)")
    return "; ".join(ways) or f"ask less of each actor ({_named(demand, settings)})"


# --------------------------------------------------------------------------------------
# Memory guard
# --------------------------------------------------------------------------------------


GPU_PROBE_SECONDS = 120
"""How long the guard waits for a GPU worker to say what its GPU holds (a cluster may first
have to start a GPU node); past that the GPU side goes unchecked, and the log says so."""


def actor_memory(actors: ActorConfig, place: str = "host") -> tuple[int | None, str]:
    """(bytes one actor of this pool may hold in `place`, where the figure comes from).
    place "host": `actors.memory_gb` when set (what Ray reserves), else the memory of the
    largest node that can host an actor, shared by the actors it can host (by its CPUs, and
    on a GPU pool by its GPUs). place "gpu": its GPU's memory (x num_gpus when a fraction),
    this machine's when it has one, else asked of a worker holding the pool's GPUs (a
    cluster's CPU head node); None when neither can tell."""
    import ray

    from aacray.runtime import ray_is_embedded

    if place == "gpu":
        have, source = gpu_memory_here(actors.num_gpus)
        if have is None and ray.is_initialized() and not ray_is_embedded():  # else its node is this machine
            have, source = _gpu_memory_of_a_worker(actors.num_gpus)
        return have, source
    if actors.memory_gb is not None:
        return int(actors.memory_gb * 2**30), "actors.memory_gb"
    hosted = [(res, _actors_per_node(actors, res.get("CPU", 0), res.get("GPU", 0))) for res in (live_nodes() if ray.is_initialized() else [])]
    best = max((int(res.get("memory", 0) // n) for res, n in hosted if n), default=0)
    if best:
        return best, "the largest Ray node's memory shared by the actors it can host"
    gpus = 0
    if actors.num_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
    per_node = max(1, _actors_per_node(actors, os.cpu_count() or 1, gpus))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // per_node, "this machine's memory shared by the actors it can host"


def _actors_per_node(actors: ActorConfig, cpus: float, gpus: float) -> int:
    """How many of the pool's actors a node of `cpus` CPUs and `gpus` GPUs hosts (0: none)."""
    return min(actors.num_actors, hosts_on({"CPU": actors.num_cpus, "GPU": actors.num_gpus}, {"CPU": cpus, "GPU": gpus}))


def check_actor_memory(job: str, need: dict[str, int], actors: ActorConfig, ways_out: str) -> None:
    """Log what one actor will hold and refuse, before any actor starts, when it cannot fit.
    On a GPU pool each part is checked against the memory that holds it (`scorer.memory_places`):
    the model, index, key/value cache and forward against the GPU's, the frames and a block's
    losses against host memory."""
    from aacray.errors import BadInputError
    from aacray.scorer import memory_places

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    places = memory_places(need, actors.num_gpus > 0)
    held, short = [], []
    for place, part in places.items():
        have, source = actor_memory(actors, place)
        where = {"gpu": " on its GPU", "host": " in host memory"}[place] if len(places) > 1 else ""
        parts = ", ".join(f"{k} {gib(v)}" for k, v in part.items() if k != "total")
        held.append(f"{gib(part['total'])}{where} ({parts}); available: {gib(have) if have else 'unknown'} ({source})")
        if have is not None and part["total"] > have:
            short.append(f"{gib(part['total'])}{where} ({parts}) but may hold {gib(have)} ({source})")
    log.info("%s: each actor holds %s", job, "; and ".join(held))
    if short:
        raise BadInputError(f"{job}: one actor needs {' and '.join(short)}. Ways out: {ways_out}")


def gpu_memory_here(num_gpus: float) -> tuple[int | None, str]:
    """(bytes of this process's first GPU x min(1, num_gpus), its name), or None when it has none."""
    import torch

    if not torch.cuda.is_available():
        return None, "the GPU of a worker (not visible from this driver)"
    share = min(1.0, num_gpus)
    total = torch.cuda.get_device_properties(0).total_memory
    return int(total * share), f"{torch.cuda.get_device_name(0)} memory x {share:g}"


def _gpu_memory_of_a_worker(num_gpus: float) -> tuple[int | None, str]:
    """`gpu_memory_here` run as a one-off task on a worker that has the pool's GPUs."""
    import ray

    ref = ray.remote(num_gpus=num_gpus, num_cpus=0)(gpu_memory_here).remote(num_gpus)
    ready, _ = ray.wait([ref], timeout=GPU_PROBE_SECONDS)
    if not ready:
        ray.cancel(ref, force=True)
        return None, f"the GPU of a worker (no worker with {num_gpus:g} GPU free to ask within {GPU_PROBE_SECONDS} s)"
    have, source = ray.get(ref)
    return have, (f"{source}, asked of a worker" if have is not None else "the GPU of a worker (its torch sees no GPU)")
