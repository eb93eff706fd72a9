"""The benchmark's machine line and its score_matrix-at-scale part (jobs/bench_scoring.py
--only job), the command a GPU session runs: checked here on CPU, at a small size, against
the in-process scorer on the inputs it wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from faults import isolated_env

from aacray import checkpoint as ckpt_lib
from aacray import machine
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.embeddings import read_captions, read_embeddings
from aacray.index import load_score_matrix
from aacray.scorer import PairScorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matrix_units_and_cpu_info(tmp_path):
    assert machine.matrix_units({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX (amx_bf16)"
    assert machine.matrix_units({"avx512f", "avx512_bf16"}).startswith("AVX-512 bf16")
    assert "emulated" in machine.matrix_units({"avx2", "fma"})
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
    )
    name, flags = machine.cpu_info(str(info))
    assert name == "Intel(R) Xeon(R) Platinum 8480+" and {"amx_bf16", "avx2"} <= flags
    line = machine.describe("cpu")
    assert machine.cpu_info()[0] in line and f"{torch.get_num_threads()} threads" in line
    assert machine.matrix_units(machine.cpu_info()[1]) in line


def test_job_part_scores_the_index_it_wrote(tmp_path):
    """The job's every loss (write_scores) equals the in-process scorer's on the extract and
    checkpoint the bench wrote, bit for bit (same pairs_per_batch and fixed chunks, one thread
    as in each 1-CPU actor), and its printed line reports the whole matrix."""
    n, m, ppb = 12, 30, 2048
    cmd = [sys.executable, "jobs/bench_scoring.py", "--only", "job", "--audios", str(n), "--captions", str(m),
           "--frames", "7", "--vocab", "40", "--pairs-per-batch", str(ppb), "--job-precisions", "fp32",
           "--job-block", "8", "--job-dir", str(tmp_path), "--job-write-scores"]
    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=isolated_env(ray_tmp), capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert f"{n} audios x {m} captions = {n * m} pairs" in p.stdout and "fp32: " in p.stdout, p.stdout

    ext = str(tmp_path / "extract")
    model, tok, _ = ckpt_lib.load(str(tmp_path / "checkpoint"))
    assert model.cfg.d_model == 256 and model.cfg.n_layers == 6 and tok.vocab_size == 40
    es, caps = read_embeddings(ext), read_captions(ext)
    assert len(es.audio_ids) == n and caps.num_rows == m
    assert caps.column("audio_id").to_pylist() == [es.audio_ids[j * n // m] for j in range(m)]
    tokens = [tok.encode(t) for t in caps.column("text").to_pylist()]
    assert all(tok.unk_id not in t for t in tokens)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each of the job's 1-CPU actors: the kernels' sums split alike
    try:
        want = PairScorer(model, tok.pad_id, es.frames, "cpu", "fp32", ppb).loss_matrix(tokens)
    finally:
        torch.set_num_threads(threads)
    L, aids, cids = load_score_matrix(str(tmp_path / "score_fp32"))
    ai = [aids.index(a) for a in es.audio_ids]
    ci = [cids.index(c) for c in caps.column("caption_id").to_pylist()]
    np.testing.assert_array_equal(L[np.ix_(ai, ci)], want)


def test_thread_streams_give_the_one_thread_bits():
    """The ablation row `n one-thread streams` (captions split between Python threads of one
    intra-op thread each, a scorer each) returns the matrix of one single-thread scorer, bit
    for bit, every caption in its own column: a forward's bits depend on its caption and audio
    chunk only, never on the captions scored beside it or on the stream."""
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import bench_scoring as bench

    torch.manual_seed(0)
    model = CaptionDecoder(DecoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64), 40, bench.PAD).eval()
    frames, tokens = bench.synthetic(9, 7, 5, 40, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = PairScorer(model, bench.PAD, frames, "cpu", "fp32", 4).loss_matrix(tokens)
        got = bench.thread_streams(model, frames, tokens, "fp32", 4, torch.device("cpu"), 3)()
        assert torch.get_num_threads() == 1, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (9, 7) and np.array_equal(got, want), np.abs(got - want).max()


def test_ablations_text_keeps_only_the_rows_named():
    """--ablations TEXT times the variants whose row name holds TEXT and no other (the
    torch.compile rows are not even compiled), beside the rows (a)-(c)."""
    cmd = [sys.executable, "jobs/bench_scoring.py", "--only", "rows", "--audios", "4", "--captions", "6",
           "--frames", "5", "--vocab", "40", "--rounds", "1", "--naive-pairs", "24", "--threads", "2", "--precision", "fp32",
           "--ablations", "rows per forward"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    names = [line.split(" | ")[1] for line in p.stdout.splitlines() if line.startswith("| [")]
    assert names[:3] == ["(a) naive fp32", "(b) PairScorer fp32", "(c) PairScorer fp32"], names
    assert sorted(names[3:]) == ["fast fp32, 256 rows per forward", "fast fp32, 768 rows per forward"], names
    assert "torch.compile" not in p.stdout


def test_process_roles_of_ray_titles():
    """The titles a score_matrix run shows on Linux (seen in `ps` during a demo job)."""
    want = {
        "ray::MapWorker(MapBatches(ScoreActor)).submit": "pool actors: blocks",
        "ray::MapWorker(MapBatches(ScoreActor)).__init__": "pool actors: constructor",
        "ray::MapWorker(MapBatches(ScoreActor))": "pool actors: between blocks",
        "ray::IDLE": "workers starting",
        "/venv/bin/python /venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py --node-ip-address=1":
            "workers starting",
        "ray::_StatsActor.register_dataset": "Ray Data's own actors",
        "ray::_AutoscalingCoordinatorActor": "Ray Data's own actors",
        "ray::ActorLocationTracker.get_actor_locations": "Ray Data's own actors",
        "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x": "Ray daemons",
        "/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=x": "Ray daemons",
        "ray::DashboardAgent": "Ray daemons",
        "/venv/bin/python -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --x": "Ray daemons",
        "sshd: root": "other processes",
    }
    assert {t: machine.process_role(t) for t in want} == want
    assert machine.process_role("python jobs/score_matrix.py c.yaml", pid=7, driver=7) == "driver"


def test_cpu_by_role_worked_example():
    """100 ticks a second; the driver (pid 10), a raylet, a worker that boots then scores two
    intervals, Ray Data's stats actor: start-up is the interval before the first block tick,
    scoring runs to the last one, wind-down is the rest; each tick counts under the title of
    the later sample."""
    driver, raylet, block = "python jobs/score_matrix.py c.yaml", "/ray/core/src/ray/raylet/raylet --x", "ray::MapWorker(MapBatches(S)).submit"
    samples = [
        (0.0, {10: (0, driver), 11: (0, raylet)}, 0),
        (1.0, {10: (100, driver), 11: (10, raylet), 12: (50, "ray::IDLE")}, 40),
        (2.0, {10: (110, driver), 11: (20, raylet), 12: (140, block)}, 50),
        (3.0, {10: (120, driver), 11: (20, raylet), 12: (230, block), 13: (30, "ray::_StatsActor")}, 60),
        (4.5, {10: (270, driver), 11: (25, raylet), 12: (230, "ray::MapWorker(MapBatches(S))")}, 200),
    ]
    got = machine.cpu_by_role(samples, driver=10, hz=100)
    want = {
        "start-up": {"seconds": 1.0, "idle": 0.4, "driver": 1.0, "Ray daemons": 0.1, "workers starting": 0.5},
        "scoring": {"seconds": 2.0, "idle": 0.2, "driver": 0.2, "Ray daemons": 0.1, "pool actors: blocks": 1.8,
                    "Ray Data's own actors": 0.3},
        "wind-down": {"seconds": 1.5, "idle": 1.4, "driver": 1.5, "Ray daemons": 0.05},
    }
    assert got.keys() == want.keys()
    for phase in want:
        assert got[phase] == {k: pytest.approx(v) for k, v in want[phase].items()}, phase
    assert machine.cpu_by_role(samples[:2], driver=10, hz=100).keys() == {"start-up"}  # no block yet


def test_read_processes_parses_proc(tmp_path):
    """utime + stime of /proc/<pid>/stat (a comm with spaces and parentheses), the NUL-split
    command line, and idle + iowait of /proc/stat; a pid folder without files is skipped."""
    (tmp_path / "stat").write_text("cpu  10 0 5 100 7 0 0 0 0 0\ncpu0 5 0 2 50 3 0 0 0 0 0\n")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (ray::IDLE (x)) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0\n")
    (tmp_path / "42" / "cmdline").write_bytes(b"ray::IDLE\x00\x00")
    (tmp_path / "43").mkdir()  # a process gone between the listing and the read
    (tmp_path / "self").mkdir()
    procs, idle = machine.read_processes(str(tmp_path))
    assert procs == {42: (10, "ray::IDLE")} and idle == 107
    live, _ = machine.read_processes()
    assert os.getpid() in live and live[os.getpid()][0] >= 0


def test_ray_floor_accounts_for_every_cpu_tick_of_its_window():
    """jobs/bench_ray_floor.py: the jobs' pool shape with sleeping units. Its roles' CPU
    seconds plus the machine's idle time add up to the CPUs x the window (every tick counted
    once, less what processes that ended took and a VM's stolen time), Ray's share is the
    table's non-"other" rows, and Ray's driver and daemons used CPU in it."""
    import re

    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")
    try:
        p = subprocess.run([sys.executable, "jobs/bench_ray_floor.py", "--units", "4", "--unit-seconds", "4"], cwd=ROOT,
                           env=isolated_env(ray_tmp), capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    first, window = map(float, re.search(r"first unit started ([\d.]+) s .* window ([\d.]+) s", p.stdout).groups())
    assert first > 0 and window >= 3.0, p.stdout
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| [\d.]+% \|$", p.stdout, re.M)}
    cores = os.cpu_count() or 1
    assert 0.8 * cores * window <= sum(rows.values()) <= 1.1 * cores * window, (rows, window)
    ray_used = sum(v for k, v in rows.items() if k not in ("idle", "other processes"))
    share = float(re.search(r"Ray's own processes: ([\d.]+)% of the machine", p.stdout)[1])
    assert abs(share - 100 * ray_used / (cores * window)) < 0.3, (share, rows)
    assert rows["driver"] > 0 and rows["Ray daemons"] > 0, rows
