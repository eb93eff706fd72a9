"""What one score_matrix actor holds (`scorer.scorer_memory`) and the guard that refuses a
job no actor can hold, before any actor starts.

- the estimate's index and key/value parts are exactly the tensors a `PairScorer` /
  `BlockScorer` allocates (an invariant over precisions, frame counts and model sizes);
- the docs' worked example: the key/value cache of 100k audios of 31 frames is ~38 GB fp32;
- `actors.memory_gb=0.001` refuses the job with a BadInputError naming the need and the
  ways out, before Ray starts, and leaves an existing output as it was.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray.config import ScoreConfig, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.errors import BadInputError
from aacray.scorer import BlockScorer, scorer_memory

PAD, BOS, EOS = 0, 1, 2


def _held(block: BlockScorer) -> tuple[int, int]:
    """(index bytes, key/value bytes) of the tensors a BlockScorer's scorers hold."""
    scorers = [block.scorer] + ([block.exact] if block.exact is not None else [])
    index = sum(s.memory.nbytes + s.mask.nbytes for s in scorers)
    kv = sum(k.nbytes + v.nbytes for s in scorers for k, v in s.kv)
    return index, kv


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-refined"])
@pytest.mark.parametrize("cfg_kw", [dict(d_model=32, n_layers=2, n_heads=4, d_ff=64), dict(d_model=48, n_layers=3, n_heads=4, d_ff=32)])
def test_scorer_memory_is_what_the_scorer_allocates(precision, cfg_kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(**cfg_kw)
    model = CaptionDecoder(cfg, 30, PAD).eval()
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(2, 14, 9)]
    tokens = [[BOS, *rng.integers(4, 30, int(n)).tolist(), EOS] for n in rng.integers(1, 8, 5)]
    N, S = len(frames), max(f.shape[0] for f in frames)
    block = BlockScorer(model, PAD, frames, "cpu", precision, pairs_per_batch=4)
    L, _ = block.losses(tokens, 3)
    n_params = sum(p.numel() for p in model.parameters())
    need = scorer_memory(N, S, cfg, n_params, precision, len(tokens))
    index, kv = _held(block)
    assert need["index"] == index and need["kv_cache"] == kv, (need, index, kv)
    assert need["embeddings"] == N * S * 768 * 4 >= sum(f.nbytes for f in frames)
    assert need["model"] >= sum(p.nbytes for p in model.parameters())
    assert need["block"] >= L.nbytes
    assert need["total"] == sum(v for k, v in need.items() if k != "total")


def test_kv_cache_of_100k_audios_is_38_gb_fp32():
    """README / DESIGN.md: 2 x n_layers x N x S x D floats, ~38 GB fp32 at the paper's size;
    bf16 halves it, bf16-refined holds both (1.5x fp32) and the index twice."""
    cfg = DecoderConfig()  # 6 layers, D 256
    fp32 = scorer_memory(100_000, 31, cfg, 12_000_000, "fp32", 256)
    assert round(fp32["kv_cache"] / 1e9) == 38
    assert round(fp32["index"] / 1e9, 1) == 3.2
    bf16 = scorer_memory(100_000, 31, cfg, 12_000_000, "bf16", 256)
    both = scorer_memory(100_000, 31, cfg, 12_000_000, "bf16-refined", 256)
    assert 2 * bf16["kv_cache"] == fp32["kv_cache"] and both["kv_cache"] == fp32["kv_cache"] + bf16["kv_cache"]
    assert both["index"] == 2 * fp32["index"]


def test_score_matrix_refuses_an_index_no_actor_can_hold(tmp_path, monkeypatch, caplog):
    import aacray.scoring as scoring

    rng = np.random.default_rng(2)
    ids = [f"clip{i}" for i in range(6)]
    frames = [rng.standard_normal((60, 768)).astype(np.float32) for _ in ids]  # 1.1 MB of frames
    caps = [(f"{a}#0", "evaluation", CAPTIONS[i % 4], a) for i, a in enumerate(ids)]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 6, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    out = str(tmp_path / "score")
    os.makedirs(out)
    old = '{"job": "score_matrix", "tables": {}}'  # an earlier, complete output's manifest
    with open(os.path.join(out, "_MANIFEST.json"), "w") as f:
        f.write(old)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a job the memory guard should refuse")

    monkeypatch.setattr(scoring, "init_ray", no_ray)
    monkeypatch.setattr(scoring, "map_actors", no_ray)
    cfg = from_dict(ScoreConfig, {"checkpoint": ckpt, "audio": ext, "captions": ext, "output": out,
                                  "actors": {"memory_gb": 0.001}})
    with caplog.at_level(logging.INFO, logger="aacray.stage"), pytest.raises(BadInputError) as e:
        scoring.run_score_matrix(cfg)
    msg = str(e.value)
    assert "score_matrix: one actor needs" in msg and "kv_cache" in msg and "embeddings" in msg
    assert "actors.memory_gb" in msg and "audio_subsets" in msg and "scorer.precision bf16" in msg
    assert "caption_block_size" in msg
    assert any("each actor holds" in r.getMessage() for r in caplog.records)  # logged before refusing
    with open(os.path.join(out, "_MANIFEST.json")) as f:
        assert f.read() == old  # the old output is untouched
    assert not os.path.exists(os.path.join(out, "_blocks")) and not os.path.exists(os.path.join(out, "config.yaml"))
