"""The caption decoder, its augmentations and the per-pair retrieval loss."""

import pytest
import torch
import torch.nn.functional as F

from aacray.decoder import (
    CaptionDecoder,
    DecoderConfig,
    mixup,
    mixup_lambda,
    mixup_pad_mask,
    mixup_permutation,
    pair_loss,
    spec_augment_frames,
    train_loss,
)

V, PAD, BOS, EOS = 30, 0, 1, 2
TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)


def tiny_model(seed=0, **kw) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(DecoderConfig(**{**TINY, **kw}), V, pad_id=PAD)


def make_batch(lengths_s, lengths_t, seed=0, E=768):
    """Right-padded frames/tokens; lengths_t counts words (bos and eos come on top)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = len(lengths_s), max(lengths_s), max(lengths_t) + 2
    frames = torch.randn(B, S, E, generator=g)
    fmask = torch.arange(S)[None] >= torch.tensor(lengths_s)[:, None]
    frames = frames.masked_fill(fmask[..., None], 0.0)
    tokens = torch.full((B, T), PAD, dtype=torch.long)
    for b, n in enumerate(lengths_t):
        tokens[b, 0] = BOS
        tokens[b, 1 : n + 1] = torch.randint(4, V, (n,), generator=g)
        tokens[b, n + 1] = EOS
    return frames, fmask, tokens


def reference_pair_loss(model, frames, fmask, tokens):
    """One pair at a time, unpadded, through plain F.cross_entropy."""
    out = []
    for b in range(frames.shape[0]):
        s = int((~fmask[b]).sum())
        n = int((tokens[b] != PAD).sum())
        tok = tokens[b, :n]
        logits = model(frames[b : b + 1, :s], None, tok[None, :-1])
        out.append(F.cross_entropy(logits[0], tok[1:]))
    return torch.stack(out)


# --- config and size -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(n_heads=3), "n_heads"),
        (dict(d_model=33, n_heads=1), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(dropout=1.0), "dropout"),
        (dict(proj_dropout=-0.1), "proj_dropout"),
        (dict(max_len=1), "max_len"),
        (dict(audio_pos_enc=1), "audio_pos_enc"),
        (dict(d_ff=2.5), "d_ff"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**kw)


def test_paper_size_parameter_count():
    model = CaptionDecoder(DecoderConfig(), vocab_size=5000)
    n = model.num_trainable_parameters()
    assert 11_000_000 <= n <= 13_000_000, n
    assert n == 12_234_376  # 9.47M decoder + 2.57M embedding/classifier + 0.2M projection
    assert "token_pe" not in model.state_dict()


def test_shapes():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([5, 3], [4, 2])
    logits = model(frames, fmask, tokens[:, :-1])
    assert logits.shape == (2, tokens.shape[1] - 1, V)
    assert model.encode(frames, fmask).shape == (2, 5, 32)
    assert model.embed_tokens(tokens).shape == (2, tokens.shape[1], 32)
    with pytest.raises(ValueError, match="max_len"):
        model.embed_tokens(torch.ones(1, 33, dtype=torch.long))


# --- the retrieval score -------------------------------------------------------------------
def test_pair_loss_matches_reference_loop():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([6, 2, 4, 6], [3, 7, 1, 0])
    with torch.no_grad():
        got = pair_loss(model, frames, fmask, tokens, PAD)
        ref = reference_pair_loss(model, frames, fmask, tokens)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_pair_loss_padding_and_batch_invariance():
    model = tiny_model(seed=1).eval()
    frames, fmask, tokens = make_batch([4], [3], seed=3)
    with torch.no_grad():
        alone = pair_loss(model, frames, fmask, tokens, PAD)
        # Same pair padded to S=9, T=12, in the middle of a batch of others.
        others_f, others_m, others_t = make_batch([9, 2, 7], [10, 1, 5], seed=4)
        big_f = others_f.clone()
        big_m = others_m.clone()
        big_t = others_t.clone()
        big_f[1] = 0.0
        big_f[1, :4] = frames[0]
        big_m[1] = True
        big_m[1, :4] = False
        big_t[1] = PAD
        big_t[1, : tokens.shape[1]] = tokens[0]
        batched = pair_loss(model, big_f, big_m, big_t, PAD)
        # Garbage in the padded frames must not matter either.
        noisy_f = big_f.clone()
        noisy_f[1, 4:] = 123.0
        noisy = pair_loss(model, noisy_f, big_m, big_t, PAD)
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(noisy, batched, atol=1e-5, rtol=0)


def test_pair_loss_batch_permutation():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([3, 8, 5, 1, 6], [2, 4, 9, 1, 3], seed=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        base = pair_loss(model, frames, fmask, tokens, PAD)
        permuted = pair_loss(model, frames[perm], fmask[perm], tokens[perm], PAD)
    torch.testing.assert_close(permuted, base[perm], atol=1e-5, rtol=0)


def test_pair_loss_fp32_with_half_frames_and_eval_required():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([5, 3], [4, 2])
    with torch.no_grad():
        half = pair_loss(model, frames.half(), fmask, tokens, PAD)
        full = pair_loss(model, frames.half().float(), fmask, tokens, PAD)
        bf16 = pair_loss(model.to(torch.bfloat16), frames, fmask, tokens, PAD)
    assert half.dtype == torch.float32 and bf16.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(bf16, full, atol=0.1, rtol=0)
    with pytest.raises(AssertionError, match="eval"):
        pair_loss(tiny_model().train(), frames, fmask, tokens, PAD)


def test_causal():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([5], [8])
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1 - 4) % (V - 4) + 4
    with torch.no_grad():
        a = model(frames, fmask, tokens)
        b = model(frames, fmask, changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_audio_pos_enc_option():
    """Without positions the decoder cannot see frame order; with them it can."""
    frames, fmask, tokens = make_batch([6], [4])
    rev = frames.flip(1)
    with torch.no_grad():
        plain = tiny_model().eval()
        torch.testing.assert_close(
            plain(frames, fmask, tokens), plain(rev, fmask, tokens), atol=1e-5, rtol=0
        )
        pos = tiny_model(audio_pos_enc=True).eval()
        assert not torch.allclose(pos(frames, fmask, tokens), pos(rev, fmask, tokens), atol=1e-4)


# --- augmentations ------------------------------------------------------------------------
def test_spec_augment_feature_stripes():
    frames = torch.randn(8, 10, 768) + 5.0  # no natural zeros
    out = spec_augment_frames(frames, 6, 2, generator=torch.Generator().manual_seed(0))
    zero = out == 0
    feat_zero = zero.all(dim=1)  # (B, E): the feature is zero in every frame
    assert torch.equal(zero, feat_zero[:, None, :].expand_as(zero))  # only whole feature columns
    n_cols = feat_zero.sum(dim=1)
    assert (n_cols <= 12).all() and n_cols.sum() > 0
    assert not torch.equal(feat_zero[0], feat_zero[1])  # independent per example
    torch.testing.assert_close(out[~zero], frames[~zero])
    again = spec_augment_frames(frames, 6, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = spec_augment_frames(frames, 6, 2, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)
    assert torch.equal(spec_augment_frames(frames, 0, 2), frames)


def test_mixup_pieces():
    g = torch.Generator().manual_seed(0)
    lams = [mixup_lambda(0.4, g) for _ in range(200)]
    assert all(0.5 <= lam <= 1.0 for lam in lams)
    assert min(lams) < 0.7 and max(lams) > 0.95  # Beta(0.4, 0.4) piles up at the ends
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [mixup_lambda(0.4, g1) for _ in range(5)] == [mixup_lambda(0.4, g2) for _ in range(5)]
    assert mixup_lambda(0.0, g) == 1.0
    for b in (2, 3, 10):
        perm = mixup_permutation(b, g)
        assert sorted(perm.tolist()) == list(range(b))
        assert (perm != torch.arange(b)).all()
    x = torch.randn(4, 3, 5)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(mixup(x, perm, 1.0), x)
    torch.testing.assert_close(mixup(x, perm, 0.7), 0.7 * x + 0.3 * x[perm])
    m = torch.tensor([[False, True], [True, True], [False, False], [True, True]])
    assert mixup_pad_mask(m, perm).tolist() == [
        [False, False],
        [False, True],
        [False, False],
        [True, True],
    ]
    assert mixup_pad_mask(m, torch.tensor([1, 0, 3, 2])).tolist() == [
        [False, True],
        [False, True],
        [False, False],
        [False, False],
    ]


def test_train_loss_label_smoothing_matches_cross_entropy():
    model = tiny_model().eval()  # eval: no dropout, so the forward is deterministic
    frames, fmask, tokens = make_batch([5, 3, 4], [4, 2, 6])
    with torch.no_grad():
        logits = model(frames, fmask, tokens[:, :-1])
        flat, tgt = logits.reshape(-1, V), tokens[:, 1:].reshape(-1)
        for ls in (0.0, 0.2):
            got = train_loss(
                model, frames, fmask, tokens, label_smoothing=ls, mixup_alpha=0, spec_augment=None
            )
            ref = F.cross_entropy(flat, tgt, ignore_index=PAD, label_smoothing=ls)
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        a = train_loss(
            model, frames, fmask, tokens, label_smoothing=0.0, mixup_alpha=None, spec_augment=None
        )
        b = train_loss(
            model, frames, fmask, tokens, label_smoothing=0.2, mixup_alpha=None, spec_augment=None
        )
    assert not torch.isclose(a, b)


def test_train_loss_mixup_uses_unmixed_targets():
    model = tiny_model().eval()
    frames, fmask, tokens = make_batch([5, 3, 4, 6], [4, 2, 6, 1])
    with torch.no_grad():
        got = train_loss(
            model,
            frames,
            fmask,
            tokens,
            label_smoothing=0.0,
            mixup_alpha=0.4,
            spec_augment=None,
            generator=torch.Generator().manual_seed(3),
        )
        g = torch.Generator().manual_seed(3)
        lam = mixup_lambda(0.4, g)
        perm = mixup_permutation(4, g)
        assert lam < 1.0
        tin, tgt = tokens[:, :-1], tokens[:, 1:]
        emb = lam * model.embed_tokens(tin) + (1 - lam) * model.embed_tokens(tin)[perm]
        mixed_frames = lam * frames + (1 - lam) * frames[perm]
        mixed_fmask = fmask & fmask[perm]
        logits = model.decode(
            model.encode(mixed_frames, mixed_fmask),
            mixed_fmask,
            emb,
            (tin == PAD) & (tin == PAD)[perm],
        )
        ref = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=PAD)
        mixed_tgt = F.cross_entropy(logits.reshape(-1, V), tgt[perm].reshape(-1), ignore_index=PAD)
        plain = train_loss(
            model, frames, fmask, tokens, label_smoothing=0.0, mixup_alpha=0, spec_augment=None
        )
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert not torch.isclose(got, mixed_tgt) and not torch.isclose(got, plain)


def test_train_loss_full_recipe_backward_and_seeded():
    frames, fmask, tokens = make_batch([5, 3, 4], [4, 2, 6])
    losses = []
    for _ in range(2):
        model = tiny_model().train()
        torch.manual_seed(11)  # dropout
        loss = train_loss(model, frames, fmask, tokens, generator=torch.Generator().manual_seed(5))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
