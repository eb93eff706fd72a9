"""Reliability (issue 8): node loss, a killed training worker, S3 faults, bad inputs.

Faults are injected for real: a worker node of a multi-node Ray cluster is removed in the
middle of extract_embeddings and of score_matrix, a Ray Train worker process is SIGKILLed
after its first checkpoint, the S3 endpoint goes away in the middle of a manifest PUT (a
TCP proxy in front of moto, so moto keeps its state and we can look at what is visible
afterwards), a bucket policy denies writes, a bucket does not exist. Every fault-tolerance
test compares the outputs with a fault-free run: same tables, no row lost, none doubled.

The Ray cluster tests run in a subprocess (`python tests/test_reliability.py node-loss DIR`)
with their own RAY_TMPDIR: the pytest session already holds an embedded Ray (`ray_local`)
and other Ray instances may run on the same machine.

docs/bad_inputs.md lists every bad input tried, what the user sees and the test behind it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from aacray import storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


# ======================================================================================
# Helpers shared by the tests and the subprocess scripts
# ======================================================================================


def _sorted_frame(df, name: str):
    key = [c for c in df.columns if c.endswith("_id")] + (["rank"] if "rank" in df.columns else [])
    return df.sort_values(key).reset_index(drop=True), key


def assert_same_table(a_uri: str, b_uri: str, name: str) -> int:
    """Two outputs hold the same table, row for row and bit for bit (any row order);
    returns its row count."""
    a = storage.read_table(a_uri, name).to_pandas()
    b = storage.read_table(b_uri, name).to_pandas()
    assert len(a) == len(b), f"{name}: {len(a)} rows vs {len(b)}"
    a, key = _sorted_frame(a, name)
    b, _ = _sorted_frame(b, name)
    assert not a.duplicated(key).any() and not b.duplicated(key).any(), (
        f"{name}: duplicate keys {key}"
    )
    assert list(a.columns) == list(b.columns), name
    for col in a.columns:
        if col == "embedding":
            for x, y in zip(a[col], b[col], strict=True):
                assert np.array_equal(np.stack(x), np.stack(y)), name
        else:
            assert a[col].tolist() == b[col].tolist(), f"{name}.{col}"
    return len(a)


def _isolated_env(ray_tmp: str) -> dict:
    """Environment of a subprocess that starts its own Ray: a private RAY_TMPDIR (session
    files, the `ray_current_cluster` address file), no RAY_ADDRESS, no S3 endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_TRAIN_ENABLE_PRINT_PATCH="1")
    return env


def _run_script(cmd: str, work: str, timeout: float) -> tuple[dict, str]:
    """Run `python tests/test_reliability.py CMD WORK` isolated; returns (report, output)."""
    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")  # short: Ray's socket paths
    try:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), cmd, work],
            env=_isolated_env(ray_tmp),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = p.stdout + p.stderr
    with open(os.path.join(work, "output.log"), "w") as f:
        f.write(out)
    assert p.returncode == 0, out[-6000:]
    with open(os.path.join(work, "report.json")) as f:
        return json.load(f), out


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


# ======================================================================================
# 1. Node loss on a multi-node cluster (subprocess)
# ======================================================================================


def node_loss_main(work: str) -> None:
    """Head (1 CPU) + 2 worker nodes (1 CPU each) on this machine. extract_embeddings and
    score_matrix each run twice: fault-free, then with a worker node removed mid-job."""
    import ray
    from ray.cluster_utils import Cluster

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
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("node_loss"))
    t0 = time.time()
    report, out = _run_script("node-loss", work, timeout=1500)
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
    assert info["results_done_at_kill"] < 13, info
    ref, got = os.path.join(work, "score_ref"), os.path.join(work, "score_kill")
    assert assert_same_table(ref, got, "scores") == 40 * 200  # unique (audio, caption) pairs
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"):
        assert_same_table(ref, got, name)
    ma = json.load(open(os.path.join(ref, "metrics.json")))
    mb = json.load(open(os.path.join(got, "metrics.json")))
    for k in ("t2a", "a2t_raw", "a2t_minmax", "n_pairs"):
        assert ma[k] == mb[k], k


# ======================================================================================
# 2. A Ray Train worker killed mid-training (subprocess)
# ======================================================================================


def train_kill_main(work: str) -> None:
    """Embedded Ray (2 CPUs); run_train with max_failures=1; SIGKILL the RayTrainWorker
    process once Ray Train has registered the first checkpoint."""
    from ray._private import state

    from aacray.config import TrainConfig, from_dict
    from aacray.runtime import setup_logging
    from aacray.train import run_train

    setup_logging()
    emb = os.path.join(work, "emb")
    rng = np.random.default_rng(0)
    words = ["dog", "bell", "rain", "engine", "birds", "siren", "barks", "rings", "falls", "hums"]
    ids, subsets, frames, caps = [], [], [], []
    for i in range(96):
        aid = f"a{i:03d}"
        ids.append(aid)
        subsets.append("development" if i < 80 else "validation")
        frames.append(rng.standard_normal((int(rng.integers(8, 32)), 768)).astype(np.float32))
        for j in range(3):
            caps.append((f"{aid}#{j}", subsets[-1], " ".join(rng.choice(words, 5)), aid))
    write_extract_output(emb, ids, subsets, frames, caps)
    out = os.path.join(work, "train")
    killed: dict = {}

    def kill_after_first_checkpoint() -> None:
        # a checkpoint counts once Ray Train has registered it (its snapshot lists it); a
        # checkpoint folder still being written is not one yet, and a worker killed then
        # restarts from scratch
        run_dir = os.path.join(out, "ray_train")
        snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        registered: list = []
        while not registered:
            time.sleep(0.05)
            try:
                with open(snapshot) as f:
                    registered = json.load(f)["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                pass
        workers = [
            a
            for a in state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
        ]
        pid = workers[0]["Pid"]
        os.kill(pid, signal.SIGKILL)  # a process of this script's own Ray
        killed.update(
            pid=pid,
            registered_at_kill=[r["metrics"]["epoch"] for r in registered],
            t_kill=time.time(),
        )

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    t0 = time.time()
    summary = run_train(
        from_dict(
            TrainConfig,
            {
                "embeddings": emb,
                "output": out,
                "epochs": 8,
                "batch_size": 16,
                "num_workers": 1,
                "max_failures": 1,
                "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 256},
                "ray": {"num_cpus": 2},
            },
        )
    )
    killed["seconds"] = round(time.time() - t0, 2)
    if "t_kill" in killed:
        killed["seconds_after_kill"] = round(time.time() - killed.pop("t_kill"), 2)
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump({"killed": killed, "summary": summary}, f, indent=2, default=str)


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(tmp_path):
    """SIGKILL of the training worker after its first checkpoint: Ray Train restarts the
    worker group (max_failures=1), the loop resumes from that checkpoint, and the final
    history covers every epoch exactly once."""
    t0 = time.time()
    report, out = _run_script("train-kill", str(tmp_path), timeout=900)
    print(json.dumps(report["killed"]), f"wall {time.time() - t0:.1f} s")
    assert report["killed"].get("pid"), report
    first = report["killed"]["registered_at_kill"][-1]
    assert (
        f"resumed from the checkpoint of epoch {first}" in out
        or f"resumed from the checkpoint of epoch {first + 1}" in out
    ), (
        "the restarted worker did not resume from the checkpoint registered before the kill (or the next one)"
    )
    assert "[FailurePolicy] RETRY" in out  # Ray Train saw the failure and used max_failures
    hist = json.loads((tmp_path / "train" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert all(np.isfinite(h["val_loss"]) for h in hist)
    assert storage.read_manifest(str(tmp_path / "train"))["extra"]["epochs"] == 8


# ======================================================================================
# Synthetic inputs written without Ray (fast)
# ======================================================================================


def write_extract_output(uri: str, ids, subsets, frames, caps, width: int = 768) -> str:
    """A committed extract_embeddings-like output: embeddings (frames x `width`) + captions."""
    from aacray.embeddings import CAPTION_SCHEMA, embedding_table

    storage.begin_output(uri, ["embeddings", "captions"])
    if width == 768:
        emb = embedding_table(
            list(ids),
            list(subsets),
            list(frames),
            [f"synthetic://{a}" for a in ids],
            [32000] * len(ids),
        )
    else:  # another encoder's width: build the column by hand (embedding_table asserts 768)
        flat = np.concatenate([f.reshape(-1) for f in frames]).astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum([f.shape[0] for f in frames])]).astype(np.int32)
        col = pa.ListArray.from_arrays(
            pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
        )
        emb = pa.table(
            {
                "audio_id": list(ids),
                "subset": list(subsets),
                "n_frames": pa.array([f.shape[0] for f in frames], pa.int32()),
                "embedding": col,
            }
        )
    storage.write_table(uri, "embeddings", emb)
    cap = pa.table(
        [pa.array([r[k] for r in caps], pa.string()) for k in range(4)], schema=CAPTION_SCHEMA
    )
    storage.write_table(uri, "captions", cap)
    storage.commit_output(uri, "extract_embeddings", {}, ["embeddings", "captions"])
    return uri


def write_random_checkpoint(
    folder: str, texts: list[str], seed: int = 0, model: dict | None = None
) -> None:
    from aacray import checkpoint as ckpt_lib
    from aacray.decoder import CaptionDecoder, DecoderConfig
    from aacray.text import WordTokenizer

    tok = WordTokenizer.build(texts)
    torch.manual_seed(seed)
    decoder = CaptionDecoder(DecoderConfig(**(model or TINY)), tok.vocab_size, tok.pad_id)
    ckpt_lib.save(folder, decoder, tok, "synthetic: true\n", epoch=1)


CAPTIONS = [
    "a dog barks",
    "rain falls then a bell rings",
    "an engine hums",
    "birds chirp while a siren wails",
]


@pytest.fixture
def small_index(tmp_path):
    """6 audios with 2 captions each, plus one caption made only of unknown words (an
    extract output), and a random tiny checkpoint."""
    rng = np.random.default_rng(1)
    ids = [f"clip{i}" for i in range(6)]
    frames = [rng.standard_normal((5 + i, 768)).astype(np.float32) for i in range(6)]
    caps = [
        (f"{a}#{j}", "evaluation", CAPTIONS[(i + j) % 4], a)
        for i, a in enumerate(ids)
        for j in range(2)
    ]
    caps.append(("clip5#2", "evaluation", "zyzzyva quux", "clip5"))  # out of vocabulary only
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 6, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    return ext, ckpt


# ======================================================================================
# 3. S3 faults
# ======================================================================================


class CutProxy:
    """A TCP proxy in front of the moto server whose endpoint can go away: at once (`cut`),
    or in the middle of the first PUT request whose request line holds `cut_during` (half
    of its first chunk is forwarded, then every connection is closed). While cut, the port
    refuses connections, as a dead server's would. moto itself keeps running, so what a
    fault left visible can be read back directly afterwards (`restore`)."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.cut_during: bytes | None = None
        self.cut_request = b""
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self._listen(0)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        self.lsock = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR on POSIX
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.lsock,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.lsock.close()
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.socks.clear()

    def restore(self) -> None:
        self.cut_during = None
        if self.lsock.fileno() == -1:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                if (
                    to_server
                    and self.cut_during
                    and line.startswith(b"PUT ")
                    and self.cut_during in line
                ):
                    self.cut_request = line
                    dst.sendall(data[: len(data) // 2])
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """This process talks to moto through a CutProxy; one attempt per request (botocore's
    default retries take 10-40 s to give up on a dead endpoint, same outcome)."""
    proxy = CutProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    yield proxy
    proxy.close()


def _keys(s3_server: str, bucket_uri: str) -> list[str]:
    import boto3

    b = bucket_uri.split("://", 1)[1]
    return sorted(
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server)
        .list_objects_v2(Bucket=b)
        .get("Contents", [])
    )


def test_s3_endpoint_lost_during_manifest_put(s3_bucket, s3_server, s3_proxy):
    """Tables written, then the endpoint dies in the middle of the manifest PUT: a
    StorageError naming the manifest; afterwards no manifest exists and readers refuse."""
    out = f"{s3_bucket}/out"
    t = pa.table({"a": list(range(10))})
    storage.write_table(out, "t", t)
    s3_proxy.cut_during = b"_MANIFEST.json"
    with pytest.raises(
        storage.StorageError,
        match=r"writing s3://.*/out/_MANIFEST\.json failed: (EndpointConnectionError|ConnectionClosedError)",
    ):
        storage.commit_output(out, "test", {}, ["t"])
    assert b"PUT /" in s3_proxy.cut_request and b"_MANIFEST.json" in s3_proxy.cut_request
    s3_proxy.restore()
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]  # no manifest
    with pytest.raises(storage.IncompleteOutputError, match="_MANIFEST.json is missing"):
        storage.read_table(out, "t")
    storage.commit_output(out, "test", {}, ["t"])  # the endpoint is back: the commit goes through
    assert storage.read_table(out, "t").equals(t)


def test_s3_endpoint_lost_during_a_table_put(s3_bucket, s3_server, s3_proxy):
    """Cut in the middle of a shard's PUT: no partial object exists (an S3 PUT is atomic),
    nothing else follows, the output stays incomplete."""
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    s3_proxy.cut_during = b"part-00001.parquet"
    with pytest.raises(
        storage.StorageError, match=r"writing s3://.*/out/t/part-00001\.parquet failed"
    ):
        storage.write_table(out, "t", pa.table({"a": list(range(10))}), rows_per_file=4)
    s3_proxy.restore()
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_manifest(out)


def test_s3_endpoint_lost_while_score_matrix_commits(
    small_index, s3_bucket, s3_server, s3_proxy, ray_local
):
    """The job: every block scored and every table written to S3, then the endpoint dies
    during the manifest PUT. The job fails with a StorageError naming the manifest, nothing
    is visible as complete; once the endpoint is back the same command finishes from the
    persisted blocks without scoring a pair again."""
    from aacray.config import ScoreConfig, from_dict
    from aacray.scoring import TABLES, run_score_matrix

    ext, ckpt = small_index
    out = f"{s3_bucket}/score"
    cfg = from_dict(
        ScoreConfig,
        {
            "checkpoint": ckpt,
            "audio": ext,
            "captions": ext,
            "output": out,
            "k": 3,
            "caption_block_size": 13,
            "write_scores": True,
            "plots": False,
        },
    )
    s3_proxy.cut_during = b"_MANIFEST.json"
    with pytest.raises(storage.StorageError, match=r"writing s3://.*/score/_MANIFEST\.json failed"):
        run_score_matrix(cfg)
    s3_proxy.restore()
    keys = _keys(s3_server, s3_bucket)
    assert "score/_MANIFEST.json" not in keys
    for name in TABLES:  # the tables were written before the fault, but nobody reads them
        assert any(k.startswith(f"score/{name}/") for k in keys), name
        with pytest.raises(storage.IncompleteOutputError):
            storage.read_table(out, name)
    s = run_score_matrix(cfg)
    m = storage.read_json(f"{out}/metrics.json")
    assert (
        s["n_pairs"] == 6 * 13
        and m["blocks_skipped_on_resume"] == 1
        and m["pairs_scored_this_run"] == 0
    )
    assert (
        m["captions_with_unknown_words"] == 1
    )  # the out-of-vocabulary caption is scored, and counted
    scores = storage.read_table(out, "scores").to_pandas()
    assert len(scores) == 78 and not scores.duplicated(["audio_id", "caption_id"]).any()


def _deny(bucket_uri: str, resource: str) -> None:
    import boto3

    b = bucket_uri.split("://", 1)[1]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{b}/{resource}",
            }
        ],
    }
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_bucket_policy(
        Bucket=b, Policy=json.dumps(policy)
    )


def test_s3_denied_write(s3_bucket, s3_server, monkeypatch):
    """A bucket policy denies s3:PutObject under out/ (moto enforces a bucket policy's
    explicit Deny on object requests): a StorageError naming the object, nothing written."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _deny(s3_bucket, "out/*")
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    with pytest.raises(
        storage.StorageError,
        match=r"writing s3://.*/out/t/part-00000\.parquet failed: PermissionError",
    ):
        storage.write_table(out, "t", pa.table({"a": [1, 2]}))
    assert _keys(s3_server, s3_bucket) == []
    storage.write_json(f"{s3_bucket}/elsewhere/x.json", {"ok": 1})  # the policy is what denies


def test_s3_denied_manifest_leaves_output_incomplete(s3_bucket, s3_server, monkeypatch):
    """Tables may be written but the manifest is denied: the error names it and readers
    refuse the output (no half-written output is ever visible as complete)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _deny(s3_bucket, "*_MANIFEST.json")
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    storage.write_table(out, "t", pa.table({"a": [1, 2]}))
    with pytest.raises(
        storage.StorageError, match=r"writing s3://.*/out/_MANIFEST\.json failed: PermissionError"
    ):
        storage.commit_output(out, "test", {}, ["t"])
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_table(out, "t")


def test_s3_missing_bucket_is_named(s3_server, tmp_path, small_index):
    """Reading from or writing to a bucket that does not exist: the error names the bucket."""
    from aacray.config import ScoreConfig, from_dict
    from aacray.corpora import list_manifest
    from aacray.embeddings import read_embeddings
    from aacray.scoring import run_score_matrix

    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        read_embeddings("s3://no-such-bucket-aacray/ext")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        list_manifest("s3://no-such-bucket-aacray/audio/manifest.csv")
    ext, ckpt = small_index
    cfg = from_dict(
        ScoreConfig,
        {
            "checkpoint": ckpt,
            "audio": ext,
            "captions": ext,
            "output": "s3://no-such-bucket-aacray/score",
        },
    )
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        run_score_matrix(cfg)  # refused before any Ray work starts


# ======================================================================================
# 4. Bad inputs (docs/bad_inputs.md lists every one with the test that backs it)
# ======================================================================================


def _embed_files(paths: list[str], tmp: str) -> tuple[pa.Table, list[dict]]:
    """The extraction stages 2 and 3 in-process (the functions the Ray job maps):
    logmel_row per file, then one EncodeActor batch (weight-free logmel_pool encoder)."""
    from aacray.extract import EncodeActor, logmel_row

    rows = [
        logmel_row({"audio_id": os.path.basename(p), "subset": "s", "uri": p}, max_seconds=30.0)
        for p in paths
    ]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    actor = EncodeActor("logmel_pool", None, tmp, "float32", False)
    return actor(batch), rows


@pytest.mark.parametrize("sr, channels", [(8000, 2), (96000, 6), (44100, 1)])
def test_unusual_sample_rate_and_channels_are_mixed_down_and_resampled(tmp_path, sr, channels):
    """8 kHz stereo and 96 kHz 6-channel files are accepted: mixed down to mono (mean of
    the channels) and resampled to 32 kHz. Their embedding equals that of the same audio
    converted beforehand to a 32 kHz mono file, within 1e-4, and the original rate is
    recorded as provenance."""
    import torchaudio

    t = np.arange(int(2.0 * sr)) / sr
    freqs = [300.0 * (c + 1) for c in range(channels)]  # every channel different, below 4 kHz
    x = np.stack(
        [0.3 * np.sin(2 * np.pi * f * t) * (1 + c) / channels for c, f in enumerate(freqs)], axis=1
    )
    src = str(tmp_path / f"src_{sr}_{channels}.wav")
    sf.write(src, x.astype(np.float32), sr, subtype="PCM_16")
    # the user's own conversion: decode, mean of the channels, resample, 32 kHz mono float WAV
    data, _ = sf.read(src, dtype="float32", always_2d=True)
    mono = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), sr, 32000).numpy()
    conv = str(tmp_path / "converted.wav")
    sf.write(conv, mono, 32000, subtype="FLOAT")
    first = str(tmp_path / "first_channel_only.wav")  # what a buggy mix-down would see
    sf.write(
        first,
        torchaudio.functional.resample(torch.from_numpy(data[:, 0].copy()), sr, 32000).numpy(),
        32000,
        subtype="FLOAT",
    )

    table, rows = _embed_files([src, conv, first], str(tmp_path))
    assert all(r["error"] == "" for r in rows)
    from aacray.embeddings import _chunk_frames

    e_src, e_conv, e_first = _chunk_frames(table.column("embedding").chunk(0), 768)
    assert table.column("sample_rate").to_pylist() == [sr, 32000, 32000]
    assert e_src.shape == e_conv.shape and e_src.shape[0] == table.column("n_frames")[0].as_py()
    np.testing.assert_allclose(e_src, e_conv, rtol=0, atol=1e-4)
    if channels > 1:
        assert np.abs(e_src - e_first).max() > 1.0  # the test would see a first-channel-only bug


def test_audio_with_nan_samples_or_too_long_is_quarantined(tmp_path):
    """Two more audio files the extraction quarantines (the stage function's reason)."""
    from aacray.extract import logmel_row

    nan = str(tmp_path / "nan.wav")
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    long = str(tmp_path / "long.wav")
    sf.write(long, np.zeros(16000 * 4, np.float32), 16000)
    r = logmel_row({"audio_id": "nan.wav", "subset": "s", "uri": nan}, max_seconds=30.0)
    assert r["error"] == f"{nan}: samples contain NaN or inf"
    r = logmel_row({"audio_id": "long.wav", "subset": "s", "uri": long}, max_seconds=3.0)
    assert (
        r["error"]
        == f"{long}: 4.0 s is longer than max_seconds=3.0; cut it or raise max_seconds in the config"
    )


def _score_inputs(
    tmp_path, frames: list[np.ndarray], caps: list[tuple], ids: list[str] | None = None
):
    from aacray.scoring import load_inputs
    from aacray.text import WordTokenizer

    ids = ids or [f"clip{i}" for i in range(len(frames))]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * len(ids), frames, caps)
    tok = WordTokenizer.build(CAPTIONS)
    return load_inputs(ext, None, ext, None, tok, 65), tok


def _ok_frames(n: int = 3) -> list[np.ndarray]:
    return [np.ones((4, 768), np.float32) * (i + 1) for i in range(n)]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("inf", "audio clip1: embedding holds NaN or inf"),
        ("nan", "audio clip1: embedding holds NaN or inf"),
        ("no_frames", "audio clip1: no frames"),
        ("duplicate_audio", "audio clip0: duplicate audio_id"),
        ("empty_caption", "captions empty after normalisation: ['clip1#0']"),
        ("null_caption", "captions empty after normalisation: ['clip1#0']"),
    ],
)
def test_score_matrix_refuses_bad_index_or_captions(tmp_path, damage, message):
    """score_matrix's input check (it runs before any actor starts) names the bad item."""
    from aacray.scoring import BadInputError

    frames = _ok_frames()
    ids = [f"clip{i}" for i in range(3)]
    caps = [(f"{a}#0", "evaluation", "a dog barks", a) for a in ids]
    if damage in ("inf", "nan"):
        frames[1][2, 5] = np.inf if damage == "inf" else np.nan
    elif damage == "no_frames":
        frames[1] = np.zeros((0, 768), np.float32)
    elif damage == "duplicate_audio":
        ids[2] = "clip0"
        caps = caps[:2]
    elif damage in ("empty_caption", "null_caption"):
        caps[1] = ("clip1#0", "evaluation", "" if damage == "empty_caption" else None, "clip1")
    with pytest.raises(
        BadInputError, match="score_matrix refused its inputs, nothing was scored"
    ) as e:
        _score_inputs(tmp_path, frames, caps, ids)
    assert message in str(e.value)


def test_out_of_vocabulary_only_caption_is_scored_and_counted(tmp_path):
    """score_matrix keeps a caption made only of unknown words (a query is a query): it
    becomes [bos, unk, unk, eos] and the job counts it (captions_with_unknown_words in
    metrics.json, checked in test_s3_endpoint_lost_while_score_matrix_commits)."""
    caps = [
        ("c0", "evaluation", "a dog barks", "clip0"),
        ("c1", "evaluation", "zyzzyva quux!", "clip1"),
    ]
    (audio, cids, tokens, gts, texts), tok = _score_inputs(tmp_path, _ok_frames(2), caps)
    assert tokens[1] == [tok.bos_id, tok.unk_id, tok.unk_id, tok.eos_id]
    assert tok.unk_id not in tokens[0]


def test_training_refuses_empty_caption_and_inf_embedding():
    """The train_decoder input check for two rows not covered by test_train.py."""
    from aacray.config import TrainConfig, from_dict
    from aacray.embeddings import CAPTION_SCHEMA, EmbeddingSet
    from aacray.train import BadInputError, prepare

    ok = np.ones((3, 768), np.float32)
    bad = ok.copy()
    bad[0, 0] = -np.inf
    train = EmbeddingSet(["a1", "inf"], ["development"] * 2, [ok, bad])
    val = EmbeddingSet(["v1"], ["validation"], [ok])
    rows = [
        ("a1#0", "development", "a dog barks", "a1"),
        ("a1#1", "development", "", "a1"),
        ("inf#0", "development", "a bell rings", "inf"),
        ("v1#0", "validation", "a dog barks", "v1"),
    ]
    caps = pa.table(
        [pa.array([r[k] for r in rows], pa.string()) for k in range(4)], schema=CAPTION_SCHEMA
    )
    with pytest.raises(BadInputError) as e:
        prepare(from_dict(TrainConfig, {"model": TINY}), train, val, caps)
    assert "audio inf: embedding holds NaN or inf" in str(e.value)
    assert "caption a1#1: empty after normalisation: ''" in str(e.value)


def test_wrong_embedding_width_refused(tmp_path):
    """Embeddings made by another encoder (width 512): every reader refuses them by name."""
    from aacray.embeddings import BadEmbeddingError, read_embeddings

    frames = [np.ones((4, 512), np.float32)] * 2
    ext = write_extract_output(
        str(tmp_path / "ext"),
        ["x0", "x1"],
        ["evaluation"] * 2,
        frames,
        [("x0#0", "evaluation", "a dog barks", "x0")],
        width=512,
    )
    with pytest.raises(
        BadEmbeddingError,
        match=r"embedding width is 512, expected 768 \(was it made by another encoder\?\)",
    ):
        read_embeddings(ext)


def test_non_utf8_caption_csv_named(tmp_path):
    from aacray.embeddings import read_captions

    p = tmp_path / "db.csv"
    p.write_bytes("caption_id,text\nx1,un caf\xe9 bruyant\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"db\.csv: not UTF-8 \(byte 25\); save the caption file as UTF-8"
    ):
        read_captions(str(p))


def test_duplicate_audio_ids_in_manifest_refused(tmp_path):
    from aacray.corpora import list_items

    p = tmp_path / "m.csv"
    p.write_text(
        "audio,audio_id,caption\na.wav,clip,a dog barks\nb.wav,clip,rain falls\nc.wav,other,a bell\n"
    )
    with pytest.raises(
        ValueError, match=r"duplicate audio ids in the input: \['clip'\]; audio ids must be unique"
    ):
        list_items("manifest", "", [], str(p))


class Smuggled:
    """Unpickling this runs code (here: it would create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_decoder_checkpoint_with_pickled_code_refused(tmp_path):
    """model.pt holding an object whose unpickling runs code: refused (weights_only=True),
    and the code never runs."""
    from aacray import checkpoint as ckpt_lib

    folder = str(tmp_path / "ckpt")
    write_random_checkpoint(folder, CAPTIONS)
    state = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    marker = str(tmp_path / "pwned")
    state["extra"] = Smuggled(marker)
    torch.save(state, os.path.join(folder, "model.pt"))
    with pytest.raises(
        ckpt_lib.CheckpointError,
        match=r"model\.pt: refused: only plain tensors and numbers are loaded \(weights_only=True\)",
    ):
        ckpt_lib.load(folder)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("same_size", [False, True])
def test_tokenizer_of_another_vocabulary_refused(tmp_path, same_size):
    """tokenizer.json from another vocabulary next to model.pt: CheckpointError, whether or
    not the two vocabularies happen to have the same size (before this test, a same-size
    foreign vocabulary was accepted and silently mapped words to the wrong embeddings)."""
    from aacray import checkpoint as ckpt_lib
    from aacray.text import WordTokenizer

    folder = str(tmp_path / "ckpt")
    write_random_checkpoint(folder, CAPTIONS)
    n_words = ckpt_lib.load(folder)[1].vocab_size - 4  # pad/bos/eos/unk
    other = [f"w{i}" for i in range(n_words if same_size else n_words + 3)]
    WordTokenizer.build([" ".join(other)]).save(os.path.join(folder, "tokenizer.json"))
    assert (
        WordTokenizer.load(os.path.join(folder, "tokenizer.json")).vocab_size == n_words + 4
    ) == same_size
    with pytest.raises(
        ckpt_lib.CheckpointError, match="the tokenizer does not belong to this checkpoint"
    ):
        ckpt_lib.load(folder)


if __name__ == "__main__":
    {"node-loss": node_loss_main, "train-kill": train_kill_main}[sys.argv[1]](sys.argv[2])
