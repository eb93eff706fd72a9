"""A pool that Ray's nodes cannot host is refused before the output is touched
(`stage.check_nodes_host`), rather than waiting forever.

Ray queues an actor or a Ray Train worker group that no node can host, and an embedded Ray
has no autoscaler to add one: before this check, `actors.num_gpus: 1` on a machine without
a GPU, or a worker group with no CPU left over for its data reads, hung with the old output
already invalidated.

- worked examples of how many actors a node hosts (`hosts_on`), fractions of a GPU and
  reserved memory included;
- on an embedded Ray each kind of shortfall is a BadInputError that names the node, the
  settings and the way out; on a cluster (an autoscaler may add nodes) the same pool only
  warns; a pool of which only some actors fit runs with a warning; dead nodes count for nothing;
- end to end on the session's embedded Ray (2 CPUs, no GPU): score_matrix with
  `actors.num_gpus: 1` and train_decoder with 2 workers x 1 CPU (no CPU for the reads) are
  refused, and an earlier complete output stays as it was.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from faults import CAPTIONS, write_extract_output, write_random_checkpoint
from test_train import write_train_extract

from aacray import runtime
from aacray.config import ActorConfig, ScoreConfig, TrainConfig, from_dict
from aacray.errors import BadInputError
from aacray.stage import ACTOR_SETTINGS, actor_demand, check_nodes_host, hosts_on
from aacray.train import TRAIN_SETTINGS

GiB = 2**30


def node(cpu: float, gpu: float = 0, mem_gib: float = 16, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu, "memory": mem_gib * GiB}}


def test_hosts_on_worked_examples():
    eight_gpus = node(32, 8, 256)["Resources"]
    assert hosts_on({"CPU": 1, "GPU": 1}, eight_gpus) == 8
    assert hosts_on({"CPU": 1, "GPU": 0.5}, eight_gpus) == 16
    assert hosts_on({"CPU": 3, "GPU": 0.5}, eight_gpus) == 10  # 32 // 3 CPUs
    assert hosts_on({"CPU": 1, "GPU": 0, "memory": 40 * GiB}, eight_gpus) == 6  # 256 // 40 GiB
    assert hosts_on({"CPU": 1, "GPU": 1}, node(2)["Resources"]) == 0
    assert hosts_on({"CPU": 0.1}, {"CPU": 0.3}) == 3  # Ray's fractions, not float round-off


@pytest.fixture
def nodes(monkeypatch):
    """Ray's view, faked: set `ray.nodes()` and whether the Ray is an embedded one."""
    import ray

    state = {"nodes": [node(2)], "embedded": True}
    monkeypatch.setattr(ray, "nodes", lambda: state["nodes"])
    monkeypatch.setattr(runtime, "ray_is_embedded", lambda: state["embedded"])
    return state


def _refusal(actors: ActorConfig) -> str:
    with pytest.raises(BadInputError) as e:
        check_nodes_host("score_matrix", actor_demand(actors), ACTOR_SETTINGS, actors.num_actors)
    return str(e.value)


def test_an_embedded_ray_refuses_each_shortfall_with_its_way_out(nodes):
    msg = _refusal(ActorConfig(num_gpus=1))
    assert "score_matrix: this embedded Ray cannot host 1 CPU, 1 GPU (actors.num_cpus, actors.num_gpus)" in msg
    assert "it has 2 CPU, 0 GPU, 16.0 GiB memory" in msg and "wait forever" in msg
    assert "run on CPUs (actors.num_gpus: 0)" in msg and "actors.num_cpus to" not in msg
    msg = _refusal(ActorConfig(num_cpus=4))
    assert "lower actors.num_cpus to 2 or less" in msg and "ray.num_cpus" in msg and "num_gpus: 0" not in msg
    msg = _refusal(ActorConfig(memory_gb=20))
    assert "20.0 GiB memory (actors.num_cpus, actors.memory_gb)" in msg
    assert "lower actors.memory_gb under 16.0 or leave it unset" in msg
    nodes["nodes"] = [node(2, 1, alive=False), node(2)]  # the dead node's GPU is gone
    assert "run on CPUs" in _refusal(ActorConfig(num_gpus=1))
    nodes["nodes"] = [node(2, 1)]
    check_nodes_host("score_matrix", actor_demand(ActorConfig(num_gpus=1)), ACTOR_SETTINGS)  # fits: no error


def test_a_cluster_warns_and_waits_for_its_autoscaler(nodes, caplog):
    nodes["embedded"] = False
    nodes["nodes"] = [node(0, mem_gib=8)]  # a head node that takes no work; workers come on demand
    with caplog.at_level(logging.WARNING, logger="aacray.stage"):
        check_nodes_host("caption", actor_demand(ActorConfig(num_gpus=1)), ACTOR_SETTINGS)
    (rec,) = [r.getMessage() for r in caplog.records]
    assert rec.startswith("caption: the Ray cluster cannot host 1 CPU, 1 GPU") and "autoscaler adds nodes" in rec
    assert "ray job stop" in rec and "run on CPUs (actors.num_gpus: 0)" in rec


def test_a_pool_larger_than_its_nodes_runs_with_those_that_fit(nodes, caplog):
    nodes["nodes"] = [node(2), node(1)]
    with caplog.at_level(logging.WARNING, logger="aacray.stage"):
        check_nodes_host("extract_embeddings", actor_demand(ActorConfig(num_actors=5)), ACTOR_SETTINGS, 5)
    assert [r.getMessage() for r in caplog.records] == [
        "extract_embeddings: Ray's nodes host 3 of the 5 actors at once (actors.num_actors); the pool runs with those"
    ]


def test_a_train_worker_group_starts_together_with_a_cpu_for_its_reads(nodes):
    def check(workers: int, cpus: float, gpu: bool = False) -> None:
        demand = {"CPU": cpus, "GPU": 1.0 if gpu else 0.0}
        check_nodes_host("train_decoder", demand, TRAIN_SETTINGS, workers, together=True, spare_cpus=1)

    nodes["nodes"] = [node(3)]
    check(2, 1)  # 2 workers + 1 CPU for the reads
    nodes["nodes"] = [node(2)]
    with pytest.raises(BadInputError) as e:
        check(2, 1)
    msg = str(e.value)
    assert "cannot host 2 x 1 CPU (num_workers, cpus_per_worker) and 1 CPU beside them for the data reads" in msg
    assert "lower num_workers (now 2) or cpus_per_worker, or give an embedded Ray 3 CPUs or more" in msg
    nodes["nodes"] = [node(2), node(2)]  # a group may span nodes: 2 workers on one, the reads on the other
    check(2, 1)
    with pytest.raises(BadInputError, match=r"run on CPUs \(use_gpu: false\)"):
        check(1, 1, gpu=True)


@pytest.fixture
def old_output(tmp_path) -> tuple[str, str]:
    out = str(tmp_path / "out")
    os.makedirs(out)
    old = '{"job": "earlier", "tables": {}}'  # an earlier, complete output's manifest
    with open(os.path.join(out, "_MANIFEST.json"), "w") as f:
        f.write(old)
    return out, old


def _untouched(out_old: tuple[str, str]) -> None:
    out, old = out_old
    assert sorted(os.listdir(out)) == ["_MANIFEST.json"]
    with open(os.path.join(out, "_MANIFEST.json")) as f:
        assert f.read() == old


def test_score_matrix_on_gpus_this_embedded_ray_lacks_is_refused(ray_local, tmp_path, old_output, monkeypatch):
    import aacray.scoring as scoring

    assert runtime.ray_is_embedded()  # the session's Ray: 2 CPUs, no GPU
    monkeypatch.setattr(scoring, "map_actors", lambda *a, **k: pytest.fail("an actor pool was started"))
    rng = np.random.default_rng(0)
    ids = [f"clip{i}" for i in range(3)]
    caps = [(f"{a}#0", "evaluation", CAPTIONS[i], a) for i, a in enumerate(ids)]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 3,
                               [rng.standard_normal((8, 768)).astype(np.float32) for _ in ids], caps)
    write_random_checkpoint(str(tmp_path / "ckpt"), CAPTIONS)
    cfg = from_dict(ScoreConfig, {"checkpoint": str(tmp_path / "ckpt"), "audio": ext, "captions": ext,
                                  "output": old_output[0], "actors": {"num_gpus": 1}})
    with pytest.raises(BadInputError, match=r"cannot host 1 CPU, 1 GPU .* run on CPUs \(actors.num_gpus: 0\)"):
        scoring.run_score_matrix(cfg)
    _untouched(old_output)


def test_train_with_no_cpu_left_for_its_reads_is_refused(ray_local, tmp_path, old_output, monkeypatch):
    from aacray import train

    monkeypatch.setattr(train, "fit_on_ray", lambda job: pytest.fail("Ray Train was started"))
    ext = write_train_extract(str(tmp_path / "ext"))
    cfg = from_dict(TrainConfig, {"embeddings": ext, "output": old_output[0], "epochs": 1, "num_workers": 2,
                                  "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}})
    with pytest.raises(BadInputError, match=r"2 x 1 CPU .* 1 CPU beside them for the data reads"):
        train.run_train(cfg)
    _untouched(old_output)
