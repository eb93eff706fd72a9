"""The training recipe piece by piece, the input checks, where a run resumes (pure), and a
job interrupted by SIGINT resuming (slow, subprocess)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from aacray import checkpoint as ckpt_lib
from aacray.config import TrainConfig, dump_yaml, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.embeddings import CAPTION_SCHEMA, EmbeddingSet
from aacray.errors import BadInputError
from aacray.text import WordTokenizer
from aacray.train import (
    FaultHook,
    ResumePoint,
    build_optimizer,
    build_scheduler,
    cosine_factor,
    draw_captions,
    fault_hook_from_env,
    fire_hook,
    optimizer_step,
    plan_resume,
    prepare,
    prune_checkpoints,
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


def test_adamw_no_decay_on_1d_parameters():
    model = CaptionDecoder(DecoderConfig(**TINY), 20)
    opt = build_optimizer(model, _cfg())
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 2.0 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])  # biases and LayerNorm weights
    assert any("norm" in names[id(p)] and names[id(p)].endswith("weight") for p in no_decay["params"])
    assert not any(p.ndim == 1 or names[id(p)].endswith("bias") for p in decay["params"])
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
            ("a1#2", "development", "a dog barks " * 21, "a1"),  # 63 words: the longest max_len 64 takes
            ("a2#2", "development", "a dog barks " * 21 + "loudly", "a2"),  # 64 words: max_len 64 takes 63
        ]
    )
    with pytest.raises(BadInputError) as e:
        prepare(_cfg(), train, val, caps)
    msg = str(e.value)
    for needle in ("audio nan: embedding holds NaN", "audio narrow: embedding width 10", "caption a2#0: empty after normalisation",
                   "caption ghost#0: its audio 'ghost' has no embedding", "caption v1#0: no in-vocabulary word", "on_bad_input=quarantine",
                   "caption a2#2: 64 words, over the decoder's limit of 63 (model.max_len = 64)"):
        assert needle in msg, needle
    p = prepare(_cfg(on_bad_input="quarantine"), train, val, caps)
    assert set(p.train_tokens) == {"a1", "a2"} and len(p.train_tokens["a2"]) == 1
    assert [len(t) for t in p.train_tokens["a1"]] == [5, 6, 65]  # bos, words, eos: whole, never cut
    assert list(p.val_tokens) == ["v1"] and len(p.val_tokens["v1"]) == 1
    assert len(p.quarantine) == 7


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


# --------------------------------------------------------------------------------------
# Where a run resumes (driver side, no Ray)
# --------------------------------------------------------------------------------------

WORDS = ["dog", "bell", "rain", "engine", "birds", "siren", "barks", "rings", "falls", "hums"]


def _tok() -> WordTokenizer:
    return WordTokenizer.build([" ".join(WORDS)])


def _run_folder(tmp_path, cfg: TrainConfig, tok: WordTokenizer, epochs=(1, 2, 3), optimizer=None) -> str:
    """A run folder holding complete checkpoints of `epochs`, trained (here: saved) with cfg."""
    run = str(tmp_path / "ray_train")
    torch.manual_seed(0)
    model = CaptionDecoder(cfg.model, tok.vocab_size, tok.pad_id)
    extra = {"history": [], "optimizer": (optimizer or build_optimizer(model, cfg)).state_dict()}
    for e in epochs:
        ckpt_lib.save(os.path.join(run, ckpt_lib.run_checkpoint_name(e)), model, tok, dump_yaml(cfg), e, extra)
    return run


def _names(run: str) -> list[str]:
    return sorted(os.listdir(run))


def test_no_checkpoint_trains_from_epoch_one(tmp_path):
    assert plan_resume(_cfg(), _tok(), str(tmp_path / "ray_train")) == ResumePoint(0, None)


def test_resume_from_newest_complete_checkpoint_skips_half_written(tmp_path, caplog):
    cfg, tok = _cfg(), _tok()
    run = _run_folder(tmp_path, cfg, tok)
    os.remove(os.path.join(run, "checkpoint_epoch_0003", ckpt_lib.MARKER))  # interrupted while written
    with caplog.at_level(logging.WARNING, logger="aacray.train"):
        point = plan_resume(cfg, tok, run)
    assert point == ResumePoint(2, os.path.join(run, "checkpoint_epoch_0002"))
    assert "skipping checkpoint " + os.path.join(run, "checkpoint_epoch_0003") + ": no _COMPLETE.json" in caplog.text
    assert _names(run) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]  # the half-written one is gone


def test_checkpoints_none_of_them_complete_are_refused_not_retrained(tmp_path):
    cfg, tok = _cfg(), _tok()
    run = _run_folder(tmp_path, cfg, tok, epochs=(1, 2))
    os.remove(os.path.join(run, "checkpoint_epoch_0002", ckpt_lib.MARKER))
    os.remove(os.path.join(run, "checkpoint_epoch_0001", "model.pt"))
    with pytest.raises(BadInputError) as e:
        plan_resume(cfg, tok, run)
    msg = str(e.value)
    assert "holds 2 checkpoint(s) and none is complete" in msg and "set restart=true" in msg
    assert "checkpoint_epoch_0002: no _COMPLETE.json" in msg and "checkpoint_epoch_0001: model.pt is missing" in msg
    assert _names(run) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]  # refused: nothing removed


def test_restart_removes_the_checkpoints_and_trains_from_epoch_one(tmp_path):
    cfg, tok = _cfg(), _tok()
    run = _run_folder(tmp_path, cfg, tok)
    os.remove(os.path.join(run, "checkpoint_epoch_0003", ckpt_lib.MARKER))
    assert plan_resume(_cfg(restart=True), tok, run) == ResumePoint(0, None)
    assert _names(run) == []


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": {**TINY, "d_model": 64}}, "model:"),
        ({"label_smoothing": 0.0}, "label_smoothing: 0.2 in the checkpoint, 0.0 now"),
        ({"mixup_alpha": 0.0}, "mixup_alpha:"),
        ({"spec_aug_stripes": 2}, "spec_aug_stripes:"),
        ({"epochs": 9}, "epochs:"),
        ({"min_freq": 2, "_vocabulary": True}, "vocabulary: the training captions give another vocabulary"),
    ],
)
def test_resume_with_another_config_is_refused(tmp_path, change, named):
    tok = _tok()
    run = _run_folder(tmp_path, _cfg(epochs=4), tok, epochs=(1, 2))
    other_tok = WordTokenizer.build([" ".join(WORDS[:-1])]) if change.pop("_vocabulary", False) else tok
    with pytest.raises(BadInputError) as e:
        plan_resume(_cfg(**{"epochs": 4, **change}), other_tok, run)
    msg = str(e.value)
    assert "checkpoint_epoch_0002 (epoch 2) was trained with another config" in msg
    assert named in msg and "restart=true" in msg


def test_resume_with_an_optimizer_grouped_otherwise_is_refused(tmp_path):
    """Same model and recipe, but the checkpoint's AdamW grouped the parameters otherwise
    (an older aacray decayed LayerNorm weights): its state would not load, so it is refused."""
    cfg, tok = _cfg(), _tok()
    model = CaptionDecoder(cfg.model, tok.vocab_size, tok.pad_id)
    one_group = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    run = _run_folder(tmp_path, cfg, tok, epochs=(1,), optimizer=one_group)
    with pytest.raises(BadInputError, match=r"optimizer parameter groups: \[\d+\] tensors in the checkpoint, \[\d+, \d+\] now"):
        plan_resume(cfg, tok, run)


def test_resume_with_other_paths_and_resources_is_allowed(tmp_path):
    tok = _tok()
    run = _run_folder(tmp_path, _cfg(), tok, epochs=(1, 2))
    cfg = _cfg(output="elsewhere", num_workers=4, max_failures=3, checkpoint_every=2, cache_shard=False)
    assert plan_resume(cfg, tok, run) == ResumePoint(2, os.path.join(run, "checkpoint_epoch_0002"))


def test_prune_keeps_the_two_newest_complete_checkpoints(tmp_path):
    cfg, tok = _cfg(), _tok()
    run = _run_folder(tmp_path, cfg, tok, epochs=(1, 2, 3, 4, 6))
    os.remove(os.path.join(run, "checkpoint_epoch_0003", ckpt_lib.MARKER))
    prune_checkpoints(run, newest=4)
    # 6 is past the epoch just written (a crashed attempt's): left to be overwritten
    assert _names(run) == ["checkpoint_epoch_0002", "checkpoint_epoch_0004", "checkpoint_epoch_0006"]


class _Killed(Exception):
    pass


def test_fault_hook_fires_once_at_its_point(tmp_path, monkeypatch):
    flag = str(tmp_path / "flag")
    hook = fault_hook_from_env({"AACRAY_TEST_HOOK": "checkpoint_write:3", "AACRAY_TEST_HOOK_FLAG": flag})
    assert hook == FaultHook("checkpoint_write", 3, "kill", flag)
    assert fault_hook_from_env({}) is None
    for bad in ("checkpoint_write", "nowhere:3", "mid_epoch:x", "mid_epoch:3:explode"):
        with pytest.raises(ValueError, match="AACRAY_TEST_HOOK"):
            fault_hook_from_env({"AACRAY_TEST_HOOK": bad, "AACRAY_TEST_HOOK_FLAG": flag})
    with pytest.raises(ValueError, match="AACRAY_TEST_HOOK_FLAG"):
        fault_hook_from_env({"AACRAY_TEST_HOOK": "mid_epoch:3"})

    def fake_kill(pid, sig):
        raise _Killed(pid, sig)

    monkeypatch.setattr(os, "kill", fake_kill)
    fire_hook(hook, "checkpoint_write", 2)
    fire_hook(hook, "after_checkpoint", 3)
    assert not os.path.exists(flag)
    with pytest.raises(_Killed) as e:
        fire_hook(hook, "checkpoint_write", 3)
    assert e.value.args == (os.getpid(), signal.SIGKILL) and os.path.exists(flag)
    fire_hook(hook, "checkpoint_write", 3)  # its flag exists: a restarted worker passes the point


# --------------------------------------------------------------------------------------
# The job interrupted, then run again (slow)
# --------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_train_extract(uri: str, n_dev: int = 16, n_val: int = 4, seed: int = 0) -> str:
    """A tiny committed extract output for training runs: clips of 8-16 random frames, two
    5-word captions each (no audio, no Ray)."""
    from faults import write_extract_output

    rng = np.random.default_rng(seed)
    ids, subsets, frames, caps = [], [], [], []
    for i in range(n_dev + n_val):
        aid = f"a{i:03d}"
        ids.append(aid)
        subsets.append("development" if i < n_dev else "validation")
        frames.append(rng.standard_normal((int(rng.integers(8, 16)), 768)).astype(np.float32))
        caps += [(f"{aid}#{j}", subsets[-1], " ".join(rng.choice(WORDS, 5)), aid) for j in range(2)]
    return write_extract_output(uri, ids, subsets, frames, caps)


def _job_args(ext: str, out: str) -> list[str]:
    model = [f"model.{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "jobs/train_decoder.py", "configs/train_demo.yaml", f"embeddings={ext}", f"output={out}",
            "epochs=3", "batch_size=8", "num_workers=1", "ray.num_cpus=2", *model]


def _interrupt_at(args: list[str], hook: str, flag: str, log_path: str) -> None:
    """Run the job until its worker reaches `hook` (block), then SIGINT its process group."""
    from faults import isolated_env

    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")  # short: Ray's socket paths
    env = {**isolated_env(ray_tmp), "AACRAY_TEST_HOOK": hook, "AACRAY_TEST_HOOK_FLAG": flag}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not os.path.exists(flag):
            assert proc.poll() is None and time.time() < deadline, open(log_path).read()[-4000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of this job's own Ray is left
        except ProcessLookupError:
            pass
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_resume_after_interruption(tmp_path):
    """The job interrupted (SIGINT to its process group) when its checkpoint of epoch 2 is
    complete on disk but not yet reported: the moment at which Ray Train's own checkpoint
    list did not name it, so the rerun trained from epoch 1 in silence (issue 19). The
    rerun resumes from epoch 2, says so in its log and metrics.json, and each epoch is in
    the history once."""
    from faults import isolated_env

    ext = write_train_extract(str(tmp_path / "ext"))
    out = tmp_path / "train"
    args = _job_args(ext, str(out))
    _interrupt_at(args, "after_checkpoint:2:block", str(tmp_path / "hook.flag"), str(tmp_path / "first.log"))
    assert not (out / "_MANIFEST.json").exists()
    ckpt2 = out / "ray_train" / "checkpoint_epoch_0002"
    assert ckpt_lib.incomplete_reason(str(ckpt2)) is None
    ray_tmp = tempfile.mkdtemp(prefix="aacr", dir="/tmp")
    again = subprocess.run(args, cwd=ROOT, env=isolated_env(ray_tmp), capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert f"resumed from the checkpoint of epoch 2: {ckpt2}" in output
    assert f"resuming from the checkpoint of epoch 2: {ckpt2}" in output  # the driver's log line
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["summary"]["resumed_from"] == {"epoch": 2, "checkpoint": str(ckpt2)}
    assert metrics["resumes"] == [{"epoch": 2, "checkpoint": str(ckpt2)}]
