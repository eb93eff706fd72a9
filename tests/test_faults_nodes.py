"""Node loss on a multi-node cluster: a worker node of a real multi-node Ray cluster (in a
subprocess) is removed in the middle of extract_embeddings and of score_matrix; the outputs
equal a fault-free run's: same tables, no row lost, none doubled (docs/bad_inputs.md)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from faults import (
    assert_same_table,
    run_script,
    write_random_checkpoint,
)

from aacray import storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _map_worker_nodes() -> dict[str, list[dict]]:
    """node id -> alive Ray Data map actors on it (class MapWorker(...))."""
    from ray._private import state

    nodes: dict[str, list[dict]] = {}
    for a in state.actors().values():
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith("MapWorker"):
            nodes.setdefault(a["Address"]["NodeID"], []).append(a)
    return nodes


class NodeKiller(threading.Thread):
    """Waits until `after` files named `prefix*` are in `folder` (a job is under way and has
    finished part of its work), then removes a worker node that hosts one of the job's map
    actors, hard (SIGKILL of the raylet, its workers and object store)."""

    def __init__(self, cluster, folder: str, prefix: str, after: int = 1):
        super().__init__(daemon=True)
        self.cluster, self.folder, self.prefix, self.after = cluster, folder, prefix, after
        self.info: dict = {}
        self.stop = threading.Event()

    def _done_files(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return [f for f in os.listdir(self.folder) if f.startswith(self.prefix)]

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set() and len(self._done_files()) < self.after:
            time.sleep(0.02)
        if self.stop.is_set():
            self.info = {"killed": False, "why": "the job ended before any result appeared"}
            return
        victims = []
        while not victims and time.time() - t0 < 300:
            actors = _map_worker_nodes()
            victims = [n for n in self.cluster.worker_nodes if n.node_id in actors]
            if not victims:
                time.sleep(0.05)
        if not victims:
            self.info = {"killed": False, "why": "no worker node hosts a map actor"}
            return
        victim = victims[0]
        done = len(self._done_files())
        self.cluster.remove_node(victim, allow_graceful=False)
        self.info = {
            "killed": True,
            "node": victim.node_id,
            "actors_on_node": [a["ActorClassName"] for a in actors[victim.node_id]],
            "results_done_at_kill": done,
            "t_kill": time.time(),
        }




def node_loss_main(work: str) -> None:
    """Head (1 CPU) + 2 worker nodes (1 CPU each) on this machine. extract_embeddings and
    score_matrix each run twice: fault-free, then with a worker node removed mid-job."""
    import ray
    from ray.cluster_utils import Cluster

    from aacray import runtime
    from aacray.config import ExtractConfig, ScoreConfig, from_dict
    from aacray.corpora import write_demo_corpus
    from aacray.embeddings import read_captions
    from aacray.extract import run_extract
    from aacray.runtime import setup_logging
    from aacray.scoring import run_score_matrix

    setup_logging()
    report: dict = {}
    corpus = os.path.join(work, "corpus")
    write_demo_corpus(
        corpus, seed=3, n_dev=24, n_val=6, n_eval=40, min_seconds=1.5, max_seconds=3.0
    )
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # the jobs join it like under `ray job submit`

    def extract(out: str) -> dict:
        return run_extract(
            from_dict(
                ExtractConfig,
                {
                    "input": {"kind": "clotho", "root": corpus, "subsets": ["dev", "val", "eval"]},
                    "output": out,
                    "encoder": {"name": "logmel_pool"},
                    "actors": {"num_actors": 2, "batch_size": 4, "num_cpus": 1},
                    "rows_per_file": 4,
                },
            )
        )

    def score(out: str) -> dict:
        return run_score_matrix(
            from_dict(
                ScoreConfig,
                {
                    "checkpoint": os.path.join(work, "ckpt"),
                    "audio": os.path.join(work, "ext_ref"),
                    "audio_subsets": ["evaluation"],
                    "captions": os.path.join(work, "ext_ref"),
                    "caption_subsets": ["evaluation"],
                    "output": out,
                    "write_scores": True,
                    "plots": False,
                    "caption_block_size": 16,
                    "actors": {"num_actors": 2, "num_cpus": 1},
                },
            )
        )

    def faulty(job, out: str, folder: str, prefix: str, after: int) -> dict:
        killer = NodeKiller(cluster, os.path.join(out, folder), prefix, after)
        killer.start()
        t0 = time.time()
        summary = job(out)
        t_end = time.time()
        killer.stop.set()
        killer.join()
        info = dict(killer.info)
        if "t_kill" in info:
            info["seconds_after_kill"] = round(t_end - info.pop("t_kill"), 2)
        info["seconds"] = round(t_end - t0, 2)
        info["summary"] = summary
        return info

    t0 = time.time()
    report["extract_ref"] = extract(os.path.join(work, "ext_ref"))
    report["extract_ref_seconds"] = round(time.time() - t0, 2)
    report["extract_kill"] = faulty(extract, os.path.join(work, "ext_kill"), "embeddings", "", 3)
    # the cluster gets its second worker node back (as an autoscaler or KubeRay would)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    # the model: a random decoder on the corpus vocabulary (training is not under test here,
    # and a trained or random model scores the same number of pairs the same way)
    texts = read_captions(os.path.join(work, "ext_ref")).column("text").to_pylist()
    write_random_checkpoint(
        os.path.join(work, "ckpt"),
        texts,
        model={"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 256},
    )
    t0 = time.time()
    report["score_ref"] = score(os.path.join(work, "score_ref"))
    report["score_ref_seconds"] = round(time.time() - t0, 2)
    report["score_kill"] = faulty(score, os.path.join(work, "score_kill"), "_blocks", "block-", 1)
    report["nodes_alive_at_end"] = sum(n["Alive"] for n in ray.nodes())
    report["embedded"] = runtime.ray_is_embedded()  # a joined cluster: a pool it cannot host only warns
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("node_loss"))
    t0 = time.time()
    report, out = run_script(__file__, "node-loss", work, timeout=1500)
    report["wall_seconds"] = round(time.time() - t0, 1)
    print(
        json.dumps(
            {k: v for k, v in report.items() if k.endswith(("kill", "seconds"))},
            indent=1,
            default=str,
        )
    )
    return work, report


@pytest.mark.slow
def test_node_loss_during_extract(node_loss):
    """A worker node hosting an encode actor is removed once the first shard is written:
    the job completes and its tables equal the fault-free run's, each audio exactly once."""
    work, report = node_loss
    info = report["extract_kill"]
    assert info["killed"], info
    ref, got = os.path.join(work, "ext_ref"), os.path.join(work, "ext_kill")
    n_files = len(storage.read_manifest(ref)["tables"]["embeddings"]["files"])
    assert info["results_done_at_kill"] < n_files, info  # killed mid-job, not after it
    # shard names are deterministic per Ray Data write task: a retried task rewrites its own
    # file, so the fault adds no file (a duplicate would also fail the item accounting)
    assert len(storage.read_manifest(got)["tables"]["embeddings"]["files"]) == n_files
    assert assert_same_table(ref, got, "embeddings") == 70
    assert assert_same_table(ref, got, "captions") == 350
    ids = storage.read_table(got, "embeddings", columns=["audio_id"]).column("audio_id").to_pylist()
    assert len(ids) == len(set(ids)) == 70
    m = storage.read_manifest(got)["extra"]
    assert m["items_in"] == m["written"] == 70 and m["quarantined"] == 0


@pytest.mark.slow
def test_node_loss_during_score_matrix(node_loss):
    """A worker node hosting a score actor is removed once the first block is done: the
    job completes, every table equals the fault-free run's, N x M unique pairs."""
    work, report = node_loss
    info = report["score_kill"]
    assert info["killed"], info
    assert report["embedded"] is False  # the jobs joined the cluster (RAY_ADDRESS), not an embedded Ray
    assert info["results_done_at_kill"] < 13, info
    ref, got = os.path.join(work, "score_ref"), os.path.join(work, "score_kill")
    assert assert_same_table(ref, got, "scores") == 40 * 200  # unique (audio, caption) pairs
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"):
        assert_same_table(ref, got, name)
    ma = json.load(open(os.path.join(ref, "metrics.json")))
    mb = json.load(open(os.path.join(got, "metrics.json")))
    for k in ("t2a", "a2t_raw", "a2t_minmax", "n_pairs"):
        assert ma[k] == mb[k], k




if __name__ == "__main__":
    {"node-loss": node_loss_main}[sys.argv[1]](sys.argv[2])
