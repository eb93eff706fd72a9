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
