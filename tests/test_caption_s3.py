"""caption with its inputs and its output on s3:// (the moto server) equals the same run on
local disk: the same captions and scores to the bit, the same metrics."""

from __future__ import annotations

import json

import numpy as np
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray import storage
from aacray.captioning import run_caption
from aacray.config import CaptionConfig, from_dict


def write_inputs(root: str) -> tuple[str, str]:
    """A small extract output (4 audios, 2 references each) and a tiny random checkpoint
    under `root`, local or s3://; the same bytes either way."""
    rng = np.random.default_rng(2)
    ids = ["a0", "a1", "a2", "a3"]
    frames = [rng.standard_normal((2 + i, 768)).astype(np.float32) for i in range(4)]
    caps = [(f"{a}#{j}", "evaluation", CAPTIONS[(i + j) % 4], a) for i, a in enumerate(ids) for j in range(2)]
    emb = write_extract_output(storage.join(root, "ext"), ids, ["evaluation"] * 4, frames, caps)
    ckpt = storage.join(root, "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    return emb, ckpt


def caption(root: str) -> str:
    emb, ckpt = write_inputs(root)
    out = storage.join(root, "caption")
    run_caption(from_dict(CaptionConfig, {
        "checkpoint": ckpt, "audio": emb, "references": emb, "output": out,
        "beam_size": 2, "min_len": 1, "max_len": 6, "tokenizer": "normalize",
        "metrics": ["cider_d", "bleu_1", "rouge_l", "vocab"],
        "actors": {"num_actors": 1, "num_cpus": 1, "batch_size": 2},
    }))
    return out


def test_caption_on_s3_equals_local(tmp_path, s3_bucket, ray_local):
    s3 = caption(f"{s3_bucket}/run")
    local = caption(str(tmp_path))

    a, b = storage.read_table(s3, "captions"), storage.read_table(local, "captions")
    assert a.column("audio_id").to_pylist() == ["a0", "a1", "a2", "a3"]
    assert a.equals(b)  # captions and float32 scores, bit for bit
    ma = json.loads(storage.read_bytes(storage.join(s3, "metrics.json")))
    mb = json.loads(storage.read_bytes(storage.join(local, "metrics.json")))
    assert ma["checkpoint"]["folder"].startswith("s3://")
    for m in (ma, mb):
        m.pop("checkpoint"), m.pop("decode_seconds")
    assert ma == mb and ma["n_audios_evaluated"] == 4 and "cider_d" in ma["metrics"]
    assert storage.read_manifest(s3)["tables"]["captions"]["rows"] == 4
    assert storage.exists(storage.join(s3, "config.yaml"))
