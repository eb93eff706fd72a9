"""perturb with its inputs and its output on s3:// (the moto server) equals the same run on
local disk: the same pair table to the bit, the same accuracies."""

from __future__ import annotations

import json

import numpy as np
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray import storage
from aacray.config import PerturbConfig, from_dict
from aacray.perturb import run_perturb


def write_inputs(root: str) -> tuple[str, str]:
    """A small extract output (4 audios, 8 captions with sequence and superposition words)
    and a tiny random checkpoint under `root`, local or s3://; the same bytes either way."""
    rng = np.random.default_rng(3)
    ids = ["a0", "a1", "a2", "a3"]
    frames = [rng.standard_normal((3 + i, 768)).astype(np.float32) for i in range(4)]
    caps = [(f"{a}#{j}", "evaluation", CAPTIONS[(i + j) % 4], a) for i, a in enumerate(ids) for j in range(2)]
    emb = write_extract_output(storage.join(root, "ext"), ids, ["evaluation"] * 4, frames, caps)
    ckpt = storage.join(root, "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    return emb, ckpt


def perturb(root: str) -> str:
    emb, ckpt = write_inputs(root)
    out = storage.join(root, "perturb")
    run_perturb(from_dict(PerturbConfig, {
        "checkpoint": ckpt, "audio": emb, "captions": emb, "output": out,
        "actors": {"num_actors": 1, "num_cpus": 1, "batch_size": 4},
    }))
    return out


def test_perturb_on_s3_equals_local(tmp_path, s3_bucket, ray_local):
    s3 = perturb(f"{s3_bucket}/run")
    local = perturb(str(tmp_path))

    a, b = storage.read_table(s3, "pairs"), storage.read_table(local, "pairs")
    assert a.num_rows > 0 and a.equals(b)  # row order, values, bits
    ma = json.loads(storage.read_bytes(storage.join(s3, "metrics.json")))
    mb = json.loads(storage.read_bytes(storage.join(local, "metrics.json")))
    assert ma["checkpoint"]["folder"].startswith("s3://")
    for m in (ma, mb):
        m.pop("checkpoint"), m.pop("score_seconds")
    assert ma == mb
    manifest = storage.read_manifest(s3)
    assert manifest["tables"]["pairs"]["rows"] == a.num_rows
    assert storage.exists(storage.join(s3, "config.yaml"))
