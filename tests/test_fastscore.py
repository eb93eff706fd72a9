"""The fast scoring path (aacray/fastdecode.py behind PairScorer) against the plain module.

- fp32 losses equal the reference loop over `pair_loss` within 1e-5 (tiny and paper-ish
  sizes, padded frames, captions of different lengths, the audio positional encoding);
- bf16 within a loose tolerance;
- a caption's losses do not depend, to the bit, on the other captions of the call (the
  property score_matrix's block-size / actor-count invariance rests on).
"""

import numpy as np
import pytest
import torch

from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss_memory
from aacray.fastdecode import FastDecoder, pair_flops
from aacray.scoring import PairScorer, reference_loss_matrix

PAD, BOS, EOS = 0, 1, 2
TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
PAPERISH = dict(d_model=256, n_layers=6, n_heads=4, d_ff=2048, max_len=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small ops: one thread is as fast, and does not stall when other jobs
    hold the machine's cores (an OpenMP region waits for its slowest thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(cfg_kw: dict, vocab: int, n_audios: int, n_captions: int, seed: int = 0):
    torch.manual_seed(seed)
    model = CaptionDecoder(DecoderConfig(**cfg_kw), vocab, PAD).eval()
    rng = np.random.default_rng(seed)
    # frame counts 1..12 (padding inside every chunk), caption lengths 0..20 words
    frames = [rng.standard_normal((int(n), 768), dtype=np.float32) for n in rng.integers(1, 13, n_audios)]
    tokens = [[BOS, *rng.integers(4, vocab, int(n)).tolist(), EOS] for n in rng.integers(0, 21, n_captions)]
    tokens[0] = [BOS, EOS]  # eos only
    return model, frames, tokens


@pytest.mark.parametrize(
    ("cfg_kw", "vocab", "ppb"),
    [(TINY, 30, 4), (dict(TINY, audio_pos_enc=True), 30, 4096), (PAPERISH, 300, 5)],
    ids=["tiny", "tiny-audio-pos", "paperish"],
)
def test_fp32_equals_reference_loop(cfg_kw, vocab, ppb):
    model, frames, tokens = make(cfg_kw, vocab, n_audios=11, n_captions=9)
    ref = reference_loss_matrix(model, PAD, frames, tokens)
    scorer = PairScorer(model, PAD, frames, "cpu", "fp32", pairs_per_batch=ppb)
    got = scorer.loss_matrix(tokens)
    assert got.dtype == np.float32 and got.shape == (11, 9)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # loss_pairs: mixed captions in one right-padded batch, any audio order
    rng = np.random.default_rng(1)
    a_idx = rng.integers(0, 11, 40)
    c_idx = rng.integers(0, 9, 40)
    pairs = scorer.loss_pairs(a_idx.tolist(), [tokens[c] for c in c_idx])
    np.testing.assert_allclose(pairs, ref[a_idx, c_idx], rtol=0, atol=1e-5)
    assert scorer.loss_pairs([], []).shape == (0,)


def test_fast_decoder_equals_module_and_packing_changes_nothing():
    """FastDecoder against pair_loss_memory (the nn.TransformerDecoder) on one padded
    chunk, with and without oneDNN pre-packed weights."""
    model, frames, tokens = make(PAPERISH, 300, n_audios=6, n_captions=3, seed=2)
    S = max(f.shape[0] for f in frames)
    x = torch.zeros(6, S, 768)
    mask = torch.ones(6, S, dtype=torch.bool)
    for i, f in enumerate(frames):
        x[i, : len(f)] = torch.from_numpy(f)
        mask[i, : len(f)] = False
    with torch.inference_mode():
        memory = model.encode(x, mask)
        for pack in (768, None):
            fast = FastDecoder(model, torch.float32, pack_rows=pack)
            kv = fast.audio_kv(memory)
            for t in tokens:
                tok = torch.tensor([t])
                got = fast.losses(fast.prefix(tok[:, :-1]), kv, mask, tok[:, 1:])
                ref = pair_loss_memory(model, memory, mask, tok.expand(6, -1), PAD)
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_bf16_close_to_fp32():
    model, frames, tokens = make(PAPERISH, 300, n_audios=8, n_captions=6, seed=3)
    fp32 = PairScorer(model, PAD, frames, "cpu", "fp32").loss_matrix(tokens)
    scorer = PairScorer(model, PAD, frames, "cpu", "bf16")
    bf16 = scorer.loss_matrix(tokens)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=3e-2)
    assert np.abs(bf16 - fp32).max() > 0  # it did run in bf16
    pairs = scorer.loss_pairs([0, 5, 7], [tokens[1], tokens[2], tokens[5]])
    np.testing.assert_allclose(pairs, fp32[[0, 5, 7], [1, 2, 5]], rtol=0, atol=3e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_composition_does_not_change_a_bit(precision):
    """loss_matrix on a caption list equals, column by column and exactly, loss_matrix on
    a permutation of it cut into uneven blocks, and on each caption alone."""
    model, frames, tokens = make(TINY, 30, n_audios=13, n_captions=12, seed=4)
    scorer = PairScorer(model, PAD, frames, "cpu", precision, pairs_per_batch=5)
    full = scorer.loss_matrix(tokens)
    perm = np.random.default_rng(0).permutation(len(tokens))
    parts = [perm[:5], perm[5:6], perm[6:]]
    for part in parts:
        got = scorer.loss_matrix([tokens[j] for j in part])
        assert np.array_equal(got, full[:, part])
    assert np.array_equal(scorer.loss_matrix([tokens[3]])[:, 0], full[:, 3])
    # a second scorer (another actor) gives the same bits
    other = PairScorer(model, PAD, frames, "cpu", precision, pairs_per_batch=5)
    assert np.array_equal(other.loss_matrix([tokens[j] for j in perm]), full[:, perm])


def test_chunks_depend_on_caption_length_and_index_only():
    model, frames, _ = make(TINY, 30, n_audios=50, n_captions=1)
    scorer = PairScorer(model, PAD, frames, "cpu", "fp32", pairs_per_batch=4096)
    for T in (1, 9, 21):
        chunks = scorer._chunks(T)
        assert chunks[0][0] == 0 and chunks[-1][1] == 50
        assert all(a1 - a0 <= max(1, PairScorer.CPU_ROWS // T) for a0, a1, _, _ in chunks)
        for a0, a1, S, padded in chunks:  # padded to the chunk's longest (sorted) audio
            assert S == scorer.lens[a0:a1].max() and padded == (scorer.lens[a0:a1].min() < S)
    small = PairScorer(model, PAD, frames, "cpu", "fp32", pairs_per_batch=7)
    assert [a1 - a0 for a0, a1, _, _ in small._chunks(3)] == [7] * 7 + [1]


def test_pair_flops_formula():
    cfg = DecoderConfig()
    f = pair_flops(cfg, 5000, n_tokens=12, n_frames=31)
    T, S, D, F, V = 12, 31, 256, 2048, 5000
    assert f["projection"] == 2 * S * 768 * D
    assert f["feed_forward"] == 6 * 4 * T * D * F
    assert f["classifier"] == 2 * T * D * V
    parts = ("projection", "self_attn", "cross_attn", "feed_forward", "classifier")
    assert f["total"] == pytest.approx(sum(f[k] for k in parts))
    assert f["per_pair"] + f["per_audio"] + f["per_caption"] == pytest.approx(f["total"])
    assert 0.3e9 < f["total"] < 0.45e9  # DESIGN.md: about 0.4 GFLOP per pair


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_equals_reference_loop(precision):
    model, frames, tokens = make(PAPERISH, 300, n_audios=11, n_captions=9, seed=5)
    ref = reference_loss_matrix(model, PAD, frames, tokens)
    got = PairScorer(model, PAD, frames, "cuda", precision, pairs_per_batch=4).loss_matrix(tokens)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 if precision == "fp32" else 3e-2)
