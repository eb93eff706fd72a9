"""The recipe as the training loop runs it: each config setting reaches the loss of the
loop's own step, the LR follows the per-epoch cosine, and the augmentations draw from the
distributions they claim (statistical tests at fixed seeds)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats

from aacray.config import TrainConfig, from_dict
from aacray.decoder import mixup_lambda, spec_augment_frames, train_loss
from aacray.text import WordTokenizer
from aacray.train import (
    cosine_factor,
    new_train_state,
    pad_frames,
    pad_tokens,
    train_epoch,
    train_step,
)

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}
WORDS = "a dog barks rain falls bell rings engine hums birds sing".split()


def _cfg(**kw) -> TrainConfig:
    return from_dict(TrainConfig, {"model": TINY, "epochs": 8, **kw})


def _batch(tok: WordTokenizer, B: int = 4):
    rng = np.random.default_rng(3)
    frames = [rng.standard_normal((int(rng.integers(5, 9)), 768)).astype(np.float32) for _ in range(B)]
    caps = [tok.encode(" ".join(rng.choice(WORDS, int(rng.integers(3, 7))))) for _ in range(B)]
    x, mask = pad_frames(frames)
    return x, mask, pad_tokens(caps, tok.pad_id)


def _loop_step(cfg: TrainConfig, tok: WordTokenizer, batch) -> tuple[float, torch.nn.Module, dict]:
    """The loop's step on a fresh state; returns (loss, the model before the step, the
    parameters after it)."""
    st = new_train_state(cfg, tok, {}, {})
    before = copy.deepcopy(st.model)
    torch.manual_seed(11)  # dropout
    loss = train_step(st, *batch, torch.Generator().manual_seed(5), epoch=0)
    return loss, before, {n: p.detach().clone() for n, p in st.model.named_parameters()}


def _reference_loss(model, cfg: TrainConfig, batch) -> torch.Tensor:
    torch.manual_seed(11)
    return train_loss(
        model,
        *batch,
        label_smoothing=cfg.label_smoothing,
        mixup_alpha=cfg.mixup_alpha,
        spec_augment=(cfg.spec_aug_stripes, cfg.spec_aug_width),
        generator=torch.Generator().manual_seed(5),
    )


VARIANTS = [
    {"label_smoothing": 0.0},
    {"label_smoothing": 0.5},
    {"mixup_alpha": 0.0},
    {"mixup_alpha": 2.0},
    {"spec_aug_stripes": 0},
    {"spec_aug_width": 8},
]


def test_train_step_uses_the_configs_recipe():
    """The loop's step loss equals decoder.train_loss with the config's label smoothing,
    mixup and SpecAugment; changing any one setting changes the loop's loss the same way.
    The step then clips at grad_clip and takes the AdamW step."""
    tok = WordTokenizer.build([" ".join(WORDS)])
    batch = _batch(tok)
    base = _cfg(grad_clip=0.05)
    loss, before, after = _loop_step(base, tok, batch)
    ref = _reference_loss(before, base, batch)
    torch.testing.assert_close(torch.tensor(loss), ref.detach(), rtol=1e-6, atol=0)
    # the same step by hand: backward, clip to grad_clip (active: the norm is larger), AdamW
    from aacray.train import build_optimizer

    opt = build_optimizer(before, base)
    ref.backward()
    assert float(torch.nn.utils.clip_grad_norm_(before.parameters(), base.grad_clip)) > base.grad_clip
    opt.step()
    for n, p in before.named_parameters():
        torch.testing.assert_close(after[n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)
    for change in VARIANTS:
        cfg = _cfg(grad_clip=0.05, **change)
        got, model, _ = _loop_step(cfg, tok, batch)
        torch.testing.assert_close(torch.tensor(got), _reference_loss(model, cfg, batch).detach(), rtol=1e-6, atol=0, msg=str(change))
        assert abs(got - loss) > 1e-4, f"{change} did not change the loop's loss"


def test_lr_follows_the_cosine_once_per_epoch():
    """Within an epoch of 4 batches the LR stays at the epoch's cosine value; it moves
    once per epoch (a scheduler stepped per batch would be 4 steps ahead after one)."""
    tok = WordTokenizer.build([" ".join(WORDS)])
    cfg = _cfg(batch_size=2, epochs=8)
    rng = np.random.default_rng(0)
    rows = [(f"a{i}", rng.standard_normal((6, 768)).astype(np.float32)) for i in range(8)]
    tokens = {a: [tok.encode("a dog barks"), tok.encode("rain falls")] for a, _ in rows}
    st = new_train_state(cfg, tok, tokens, {})
    seen: list[float] = []
    st.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    for epoch in range(3):
        s = train_epoch(st, rows, epoch)
        assert s.steps == 4 and s.samples == 8
        assert st.opt.param_groups[0]["lr"] == pytest.approx(cosine_factor(epoch + 1, 8) * cfg.lr, rel=1e-12)
    expected = [cosine_factor(k, 8) * cfg.lr for k in range(3) for _ in range(4)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert cosine_factor(1, 8) * cfg.lr != pytest.approx(cosine_factor(4, 8) * cfg.lr)


# --------------------------------------------------------------------------------------
# Distributions of the augmentations (aacray/decoder.py), fixed seeds
# --------------------------------------------------------------------------------------


def test_mixup_lambda_is_beta_0_4():
    gen = torch.Generator().manual_seed(0)
    lam = np.array([mixup_lambda(0.4, gen, asymmetric=False) for _ in range(4000)])
    assert stats.kstest(lam, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    # the test can tell a wrong alpha apart at this sample size
    assert stats.kstest(lam, stats.beta(0.8, 0.8).cdf).pvalue < 1e-6
    assert stats.kstest(lam, stats.beta(0.2, 0.2).cdf).pvalue < 1e-6
    # asymmetric (the default): max(lambda, 1 - lambda), whose CDF on [0.5, 1] is 2 F(x) - 1
    gen = torch.Generator().manual_seed(1)
    top = np.array([mixup_lambda(0.4, gen) for _ in range(4000)])
    assert top.min() >= 0.5 and top.max() <= 1.0
    assert stats.kstest(top, lambda x: 2 * stats.beta(0.4, 0.4).cdf(x) - 1).pvalue > 0.01


def _stripe_law(E: int, max_width: int) -> dict[int, int]:
    """The draw spec_augment_frames documents, as {width: number of start positions}:
    width uniform over [0, min(max_width, E)) (conette's DropStripes: {0, 1} for width 2),
    start uniform over [0, E - width). The tests below derive every expectation from it."""
    return {w: E - w for w in range(min(max_width, E))}


def test_spec_augment_stripe_width_and_start_follow_the_documented_draw():
    """One stripe per example on all-ones frames: the zeroed features are exactly the
    stripe, so its width and start are seen. Chi-square at a fixed seed: the width is
    uniform over the law's widths, the start uniform over its positions; examples differ."""
    B, E, max_width = 6000, 64, 3
    law = _stripe_law(E, max_width)
    out = spec_augment_frames(torch.ones(B, 3, E), n_stripes=1, max_width=max_width, generator=torch.Generator().manual_seed(0))
    zero = out[:, 0, :] == 0
    assert torch.equal(zero, (out == 0).all(dim=1))  # a zeroed feature is zero in every frame
    width = zero.sum(dim=1).numpy()
    counts = np.bincount(width, minlength=max_width + 2)
    assert counts[len(law):].sum() == 0, counts  # no width outside the law
    assert stats.chisquare(counts[: len(law)]).pvalue > 0.01
    skewed = np.linspace(1, 2, len(law)) / np.linspace(1, 2, len(law)).sum() * B
    assert stats.chisquare(counts[: len(law)], skewed).pvalue < 1e-6  # the test can fail
    for w, positions in law.items():
        if w == 0:
            continue
        rows = zero[torch.from_numpy(width == w)]
        starts = rows.float().argmax(dim=1)
        assert bool(rows[torch.arange(len(starts))[:, None], starts[:, None] + torch.arange(w)].all())  # contiguous
        hist = np.bincount(starts.numpy(), minlength=E)
        assert hist[positions:].sum() == 0, f"width {w}: a start past {positions - 1}"
        assert stats.chisquare(hist[:positions]).pvalue > 0.01, f"width {w}"
    # drawn per example: neighbours share a mask about as often as independent draws do
    same = (zero[1:] == zero[:-1]).all(dim=1).double().mean().item()
    p_same = sum((1 / len(law)) ** 2 / (p if w else 1) for w, p in law.items())
    assert abs(same - p_same) < 0.03, (same, p_same)


def test_spec_augment_six_stripes_cover_the_expected_share():
    """6 independent stripes drawn by the law: feature f escapes one with probability
    q_f = mean over widths w of (1 - P(f covered | w)), all six with q_f ** 6. The mean
    number of zeroed features is sum_f (1 - q_f ** 6), within 4 standard errors."""
    B, E, n, max_width = 4000, 48, 6, 2
    law = _stripe_law(E, max_width)
    out = spec_augment_frames(torch.ones(B, 2, E), n_stripes=n, max_width=max_width, generator=torch.Generator().manual_seed(2))
    zeroed = (out[:, 0, :] == 0).sum(dim=1).double().numpy()
    expected = 0.0
    for f in range(E):
        q = sum(1 - sum(1 for s in range(p) if s <= f < s + w) / p for w, p in law.items()) / len(law)
        expected += 1 - q**n
    se = zeroed.std() / math.sqrt(B)
    assert abs(zeroed.mean() - expected) < 4 * se, (zeroed.mean(), expected, se)
    assert zeroed.max() <= n * max(law)
