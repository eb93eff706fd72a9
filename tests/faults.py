"""Helpers shared by the fault tests (tests/test_faults_*.py) and their subprocess scripts:
table comparison bit for bit, an isolated subprocess that starts its own Ray, and small
synthetic extract outputs and checkpoints written without Ray.

The Ray cluster tests run in a subprocess (`python tests/test_faults_X.py CMD DIR`) with
their own RAY_TMPDIR: the pytest session already holds an embedded Ray (`ray_local`) and
other Ray instances may run on the same machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa

from aacray import storage, synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


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


def isolated_env(ray_tmp: str) -> dict:
    """Environment of a subprocess that starts its own Ray: a private RAY_TMPDIR (session
    files, the `ray_current_cluster` address file), no RAY_ADDRESS, no S3 endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_TRAIN_ENABLE_PRINT_PATCH="1")
    return env


def run_script(script: str, cmd: str, work: str, timeout: float) -> tuple[dict, str]:
    """Run `python SCRIPT CMD WORK` (a test file's __main__) isolated; returns (report, output)."""
    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")  # short: Ray's socket paths
    try:
        p = subprocess.run(
            [sys.executable, os.path.abspath(script), cmd, work],
            env=isolated_env(ray_tmp),
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



def write_extract_output(uri: str, ids, subsets, frames, caps, width: int = 768) -> str:
    """A committed extract_embeddings-like output: embeddings (frames x `width`) + captions."""
    emb = None
    if width != 768:  # another encoder's width: build the column by hand (embedding_table asserts 768)
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
    return synthetic.write_extract_output(uri, ids, subsets, frames, caps, emb)


def write_random_checkpoint(
    folder: str, texts: list[str], seed: int = 0, model: dict | None = None
) -> None:
    from aacray.decoder import DecoderConfig

    synthetic.write_random_checkpoint(folder, texts, seed, DecoderConfig(**(model or TINY)))


CAPTIONS = [
    "a dog barks",
    "rain falls then a bell rings",
    "an engine hums",
    "birds chirp while a siren wails",
]
