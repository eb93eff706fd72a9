"""The training recipe piece by piece, the input checks, and resume after an interruption."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from aacray.config import TrainConfig, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.embeddings import CAPTION_SCHEMA, EmbeddingSet
from aacray.errors import BadInputError
from aacray.train import (
    build_optimizer,
    build_scheduler,
    cosine_factor,
    draw_captions,
    optimizer_step,
    prepare,
)

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}


def _cfg(**kw) -> TrainConfig:
    return from_dict(TrainConfig, {"model": TINY, **kw})


def test_recipe_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.lr, c.betas, c.eps, c.weight_decay, c.grad_clip) == (5e-4, [0.9, 0.999], 1e-8, 2.0, 1.0)
    assert (c.label_smoothing, c.mixup_alpha, c.spec_aug_stripes, c.spec_aug_width) == (0.2, 0.4, 6, 2)
    assert (c.epochs, c.batch_size) == (400, 512)
    m = c.model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.dropout, m.proj_dropout) == (256, 6, 4, 2048, 0.2, 0.5)


def test_adamw_no_decay_on_biases():
    model = CaptionDecoder(DecoderConfig(**TINY), 20)
    opt = build_optimizer(model, _cfg())
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 2.0 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == 5e-4 and decay["betas"] == (0.9, 0.999) and decay["eps"] == 1e-8
    # decoupled decay: with zero gradient a weight shrinks by lr * wd, a bias not at all
    w = next(p for p in decay["params"])
    b = next(p for p in no_decay["params"])
    w0, b0 = w.detach().clone(), b.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 * (1 - 5e-4 * 2.0))
    torch.testing.assert_close(b.detach(), b0)


def test_cosine_decay_per_epoch():
    model = CaptionDecoder(DecoderConfig(**TINY), 20)
    cfg = _cfg(epochs=8)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # once per epoch
    expected = [0.5 * (1 + math.cos(k * math.pi / 8)) * 5e-4 for k in range(8)]
    assert np.allclose(seen, expected)
    assert cosine_factor(8, 8) == pytest.approx(0.0)


def test_gradient_norm_clipped_to_one():
    model = CaptionDecoder(DecoderConfig(**TINY), 20)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(3, 5, 768) * 100
    loss = model(x, None, torch.randint(4, 20, (3, 6))).pow(2).mean() * 1e3
    before = optimizer_step(model, opt, loss, 1.0)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert before > 1.0 and float(after) == pytest.approx(1.0, rel=1e-4)


def test_one_caption_drawn_per_clip_uniformly():
    tokens = {"a": [[1, i, 2] for i in range(5)], "b": [[1, 9, 2]]}
    rng = np.random.default_rng(0)
    draws = [draw_captions(["a", "b"], tokens, rng) for _ in range(5000)]
    assert all(len(d) == 2 and d[1] == [1, 9, 2] for d in draws)
    counts = np.bincount([d[0][1] for d in draws], minlength=5)
    assert counts.min() > 850 and counts.max() < 1150  # ~1000 each


def _es(ids, frames):
    return EmbeddingSet(list(ids), ["development"] * len(ids), frames)


def _caps(rows):
    return pa.table([pa.array([r[i] for r in rows], pa.string()) for i in range(4)], schema=CAPTION_SCHEMA)


def test_prepare_names_bad_inputs():
    ok = np.ones((3, 768), np.float32)
    train = _es(["a1", "a2", "nan", "narrow"], [ok, ok, np.full((3, 768), np.nan, np.float32), np.ones((3, 10), np.float32)])
    val = EmbeddingSet(["v1"], ["validation"], [ok])
    caps = _caps(
        [
            ("a1#0", "development", "a dog barks", "a1"),
            ("a1#1", "development", "a dog barks loudly", "a1"),
            ("a2#0", "development", "?!...", "a2"),
            ("a2#1", "development", "rain falls", "a2"),
            ("ghost#0", "development", "a bell rings", "ghost"),
            ("nan#0", "development", "a bell rings", "nan"),
            ("v1#0", "validation", "zyzzyva quux", "v1"),
            ("v1#1", "validation", "a dog barks", "v1"),
        ]
    )
    with pytest.raises(BadInputError) as e:
        prepare(_cfg(), train, val, caps)
    msg = str(e.value)
    for needle in ("audio nan: embedding holds NaN", "audio narrow: embedding width 10", "caption a2#0: empty after normalisation",
                   "caption ghost#0: its audio 'ghost' has no embedding", "caption v1#0: no in-vocabulary word", "on_bad_input=quarantine"):
        assert needle in msg, needle
    p = prepare(_cfg(on_bad_input="quarantine"), train, val, caps)
    assert set(p.train_tokens) == {"a1", "a2"} and len(p.train_tokens["a1"]) == 2 and len(p.train_tokens["a2"]) == 1
    assert list(p.val_tokens) == ["v1"] and len(p.val_tokens["v1"]) == 1
    assert len(p.quarantine) == 6


def test_nan_loss_stops_training():
    from aacray.decoder import train_loss
    from aacray.train import check_finite

    model = CaptionDecoder(DecoderConfig(**TINY), 20)
    x = torch.randn(2, 4, 768)
    x[0, 1, 5] = float("nan")
    loss = train_loss(model, x, None, torch.randint(4, 20, (2, 5)), generator=torch.Generator().manual_seed(0))
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="epoch 3 on rank 1"):
        check_finite(loss, 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    check_finite(torch.tensor(1.0), 1, 0)  # a finite loss passes


@pytest.mark.slow
def test_resume_after_interruption(tmp_path):
    """Start training, interrupt it after a checkpoint, start it again: it resumes."""
    from aacray.corpora import write_demo_corpus

    root = tmp_path / "c"
    write_demo_corpus(str(root), seed=5, n_dev=16, n_val=4, n_eval=2, min_seconds=1.5, max_seconds=2.5)
    py = sys.executable
    ext = tmp_path / "ext"
    subprocess.run([py, "jobs/extract_embeddings.py", "configs/extract_demo.yaml", f"input.root={root}", f"output={ext}",
                    "actors.num_actors=1", "ray.num_cpus=2"], check=True, capture_output=True)
    out = tmp_path / "train"
    args = [py, "jobs/train_decoder.py", "configs/train_demo.yaml", f"embeddings={ext}", f"output={out}", "epochs=6",
            "batch_size=8", "num_workers=1", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
            "ray.num_cpus=2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpts = [d for d in os.listdir(out / "ray_train")] if (out / "ray_train").exists() else []
        if sum(d.startswith("checkpoint_") for d in ckpts) >= 2:
            break
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(120)
    assert not (out / "_MANIFEST.json").exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from the checkpoint of epoch" in again.stdout + again.stderr
    import json

    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]
