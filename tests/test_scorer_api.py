"""The scorer's public surface (aacray/scorer.py) and score_matrix's input refusals.

- `PairScorer`'s benchmark knobs (cpu_rows, pack_weights, fused_attention) change speed,
  not the maths: every combination equals the reference loop;
- `loss_pairs`, the one entry for listed pairs, in both layouts equals `loss_matrix`;
- over-long captions: `over_long` names them against the decoder's limit (worked example),
  and score_matrix refuses them before Ray starts instead of cutting them;
- `minmax_scale`, the one min-max rule: a matrix, its rows and flat rows give the same bits;
- `scores_table`, the one writer of the `scores` contract (score_matrix and reindex).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray.config import ScoreConfig, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.errors import BadInputError
from aacray.retrieval import minmax_scale
from aacray.scorer import PairScorer, over_long, reference_loss_matrix

PAD, BOS, EOS = 0, 1, 2
TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(seed: int = 0, n_audios: int = 9, n_captions: int = 6):
    torch.manual_seed(seed)
    model = CaptionDecoder(DecoderConfig(**TINY), 30, PAD).eval()
    rng = np.random.default_rng(seed)
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(1, 12, n_audios)]
    tokens = [[BOS, *rng.integers(4, 30, int(n)).tolist(), EOS] for n in rng.integers(0, 15, n_captions)]
    return model, frames, tokens


@pytest.mark.parametrize(
    "knobs",
    [dict(cpu_rows=None), dict(cpu_rows=16), dict(pack_weights=False), dict(fused_attention=True)],
    ids=["one-forward", "16-rows", "unpacked", "sdpa"],
)
def test_benchmark_knobs_keep_the_maths(knobs):
    model, frames, tokens = _make()
    ref = reference_loss_matrix(model, PAD, frames, tokens)
    scorer = PairScorer(model, PAD, frames, "cpu", "fp32", pairs_per_batch=4, **knobs)
    np.testing.assert_allclose(scorer.loss_matrix(tokens), ref, rtol=0, atol=1e-5)
    rng = np.random.default_rng(1)
    a, c = rng.integers(0, 9, 25), rng.integers(0, 6, 25)
    np.testing.assert_allclose(scorer.loss_pairs(a, [tokens[j] for j in c]), ref[a, c], rtol=0, atol=1e-5)
    np.testing.assert_allclose(scorer.loss_pairs(a, tokens, c), ref[a, c], rtol=0, atol=1e-5)


def test_loss_pairs_layouts_agree_and_check_their_arguments():
    model, frames, tokens = _make(seed=3)
    scorer = PairScorer(model, PAD, frames, "cpu", "fp32", pairs_per_batch=5)
    full = scorer.loss_matrix(tokens)
    a, c = np.divmod(np.arange(9 * 6), 6)
    by_index = scorer.loss_pairs(a, tokens, c)
    own = scorer.loss_pairs(a, [tokens[j] for j in c])
    np.testing.assert_allclose(by_index, full[a, c], rtol=1e-6, atol=0)
    np.testing.assert_allclose(own, full[a, c], rtol=0, atol=1e-5)
    assert scorer.loss_pairs([], []).shape == (0,) and scorer.loss_pairs([], tokens, []).shape == (0,)
    with pytest.raises(AssertionError, match="len"):
        scorer.loss_pairs([0, 1], [tokens[0]])  # one caption per pair, two pairs
    with pytest.raises(AssertionError, match="shape"):
        scorer.loss_pairs([0, 1], tokens, [0])


def test_over_long_names_captions_past_the_decoder_limit():
    """max_tokens 6 (max_len 5): bos + 4 words + eos fit, 5 words do not."""
    tokens = {"ok": [BOS, 4, 5, 6, 7, EOS], "long": [BOS, 4, 5, 6, 7, 8, EOS], "empty": [BOS, EOS]}
    assert over_long(["ok", "empty"], [tokens["ok"], tokens["empty"]], 6) is None
    msg = over_long(list(tokens), list(tokens.values()), 6)
    assert msg.startswith("1 caption(s) longer than the decoder's limit of 4 words (model.max_len = 5), e.g. long (5 words)")
    assert "model.max_len" in msg and "caption_subsets" in msg


def test_score_matrix_refuses_over_long_captions_before_ray(tmp_path, monkeypatch):
    import aacray.scoring as scoring

    rng = np.random.default_rng(0)
    ids = [f"clip{i}" for i in range(3)]
    frames = [rng.standard_normal((4, 768)).astype(np.float32) for _ in ids]
    caps = [(f"{a}#0", "evaluation", CAPTIONS[i], a) for i, a in enumerate(ids)]
    caps.append(("clip0#long", "evaluation", " ".join(["dog barks"] * 40), "clip0"))  # 80 words
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 3, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)  # max_len 64: at most 63 words

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for inputs score_matrix should refuse")

    monkeypatch.setattr(scoring, "start_ray", no_ray)
    cfg = from_dict(ScoreConfig, {"checkpoint": ckpt, "audio": ext, "captions": ext, "output": str(tmp_path / "s")})
    with pytest.raises(BadInputError, match=r"1 caption\(s\) longer than the decoder's limit of 63 words .* clip0#long \(80 words\)"):
        scoring.run_score_matrix(cfg)
    assert not (tmp_path / "s").exists()


def test_minmax_scale_one_rule_in_every_layout():
    rng = np.random.default_rng(4)
    L = rng.uniform(0.5, 5.0, (7, 5))
    L[:, 2] = 1.25  # a constant caption: s = 0
    mn, mx = L.min(0), L.max(0)
    S = minmax_scale(L, mn, mx)
    assert (S[:, 2] == 0).all() and S.min() == 0 and S.max() == 1
    rows = np.stack([minmax_scale(L[i], mn, mx) for i in range(7)])  # the plots' layout
    a, c = np.divmod(np.arange(35), 5)
    flat = minmax_scale(L[a, c], mn[c], mx[c])  # reindex's flat score rows
    assert np.array_equal(rows, S) and np.array_equal(flat, S[a, c])
    cols = [0, 1, 3, 4]
    np.testing.assert_array_equal(S[:, cols], (L[:, cols] - mn[cols]) / (mx[cols] - mn[cols]))


def test_scores_table_contract():
    from aacray.scoring import scores_table

    L = np.array([[1.5, 2.0, 3.25], [0.5, 4.0, 1.0]])  # float64, as bf16-refined blocks are
    t = scores_table(["a1", "a0"], np.array(["c2", "c0", "c1"]), L)
    assert t.schema == pa.schema([("audio_id", pa.string()), ("caption_id", pa.string()), ("loss", pa.float32())])
    assert t.column("audio_id").to_pylist() == ["a1"] * 3 + ["a0"] * 3  # audio-major
    assert t.column("caption_id").to_pylist() == ["c2", "c0", "c1"] * 2
    assert t.column("loss").to_pylist() == L.reshape(-1).tolist()
    with pytest.raises(AssertionError):
        scores_table(["a1"], ["c2", "c0", "c1"], L)


@pytest.mark.parametrize("flags, warned", [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False), ({"amx_bf16"}, False)])
def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch, caplog, flags, warned):
    """A CPU scorer at bf16 on an x86 CPU with neither AMX nor AVX-512 bf16 (torch emulates
    bf16 matmul there, ~100x slower) logs one warning per process naming the CPU and fp32;
    fp32 scorers and CPUs with bf16 units log none."""
    import logging

    from aacray import machine, scorer

    monkeypatch.setattr(machine, "cpu_info", lambda path="/proc/cpuinfo": ("Fake CPU 9000", flags))
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    model, frames, _ = _make()
    scorer._warn_if_bf16_emulated.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="aacray.scorer"):
            PairScorer(model, PAD, frames, "cpu", "fp32")
            assert not [r for r in caplog.records if "emulates" in r.getMessage()]
            for _ in range(2):
                PairScorer(model, PAD, frames, "cpu", "bf16")
    finally:
        scorer._warn_if_bf16_emulated.cache_clear()
    msgs = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert len(msgs) == (1 if warned else 0), msgs
    if warned:
        assert "Fake CPU 9000" in msgs[0] and "no bf16 matrix units" in msgs[0] and "scorer.precision: fp32" in msgs[0]
