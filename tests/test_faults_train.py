"""Training stopped at each moment that matters, then run again (issue 19).

A fault hook (AACRAY_TEST_HOOK, aacray/train.py FaultHook) stops the worker loop at a
named point, so every fault lands where it is meant to:
  mid_epoch:2         after epoch 2's first step            -> resume from epoch 1
  validation:2        during epoch 2's validation           -> resume from epoch 1
  checkpoint_write:2  model.pt of checkpoint 2 written only -> skip it, resume from epoch 1
  after_checkpoint:2  checkpoint 2 complete, not reported   -> resume from epoch 2
The four moments run fast, through the job with the loop in this process
(`fit=train.fit_in_process`, the hook raising where a killed worker would stop). On Ray
Train (slow): the worker SIGKILLed mid-epoch and restarted by Ray (max_failures=1), and a
run to s3:// killed while a checkpoint is written; tests/test_train.py::
test_resume_after_interruption interrupts the job itself with SIGINT, as in the issue.
Every run, stopped or not, must train exactly what an uninterrupted run trains (same
history, same final weights), and the Ray runs what the in-process run trains.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from test_train import write_train_extract

from aacray import checkpoint as ckpt_lib
from aacray import storage
from aacray.config import TrainConfig, from_dict
from aacray.errors import BadInputError
from aacray.train import InjectedFault, fit_in_process, run_train

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}
SMALL_RUN = {"epochs": 3, "batch_size": 8, "num_workers": 1, "model": TINY, "ray": {"num_cpus": 2}}


def _cfg(ext: str, out: str, **kw) -> TrainConfig:
    return from_dict(TrainConfig, {"embeddings": ext, "output": out, **SMALL_RUN, **kw})


def _metrics(out: str) -> dict:
    return storage.read_json(storage.join(out, "metrics.json"))


def _ckpt(out: str, epoch: int) -> str:
    return storage.join(out, "ray_train", ckpt_lib.run_checkpoint_name(epoch))


@pytest.fixture(scope="module")
def train_extract(tmp_path_factory) -> str:
    return write_train_extract(str(tmp_path_factory.mktemp("train_ext") / "ext"))


@pytest.fixture(scope="module")
def reference(train_extract, tmp_path_factory) -> str:
    """An uninterrupted run (in process): what every stopped-and-resumed run must reproduce."""
    out = str(tmp_path_factory.mktemp("reference") / "train")
    run_train(_cfg(train_extract, out), fit=fit_in_process)
    return out


def assert_same_training(out: str, reference: str) -> None:
    """The run trained the epochs the uninterrupted one did: same history, same selected
    epoch, same weights."""
    got, want = _metrics(out)["history"], _metrics(reference)["history"]
    sel, sel_ref = _metrics(out)["selected"], _metrics(reference)["selected"]
    assert {**sel, "value": pytest.approx(sel_ref["value"], rel=1e-5)} == sel_ref
    assert [h["epoch"] for h in got] == [1, 2, 3]
    for a, b in zip(got, want, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    ma, mb = ckpt_lib.load(out)[0].state_dict(), ckpt_lib.load(reference)[0].state_dict()
    for k in mb:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6, msg=k)


def _arm(monkeypatch, tmp_path, hook: str) -> str:
    flag = str(tmp_path / "hook.flag")
    monkeypatch.setenv("AACRAY_TEST_HOOK", hook)
    monkeypatch.setenv("AACRAY_TEST_HOOK_FLAG", flag)
    return flag


def _rerun(cfg: TrainConfig, caplog, **kw) -> dict:
    with caplog.at_level(logging.INFO, logger="aacray.train"):
        return run_train(cfg, **kw)


MOMENTS = [
    ("mid_epoch:2", 1, "local"),
    ("validation:2", 1, "local"),
    ("checkpoint_write:2", 1, "local"),
    ("checkpoint_write:2", 1, "s3"),
    ("after_checkpoint:2", 2, "local"),
]


@pytest.mark.parametrize("hook, resumed, where", MOMENTS, ids=[f"{h.split(':')[0]}-{w}" for h, _, w in MOMENTS])
def test_stopped_run_resumes_from_newest_complete_checkpoint(
    train_extract, reference, tmp_path, monkeypatch, caplog, request, hook, resumed, where
):
    out = f"{request.getfixturevalue('s3_bucket')}/train" if where == "s3" else str(tmp_path / "train")
    flag = _arm(monkeypatch, tmp_path, hook + ":raise")
    with pytest.raises(InjectedFault, match=hook):
        run_train(_cfg(train_extract, out), fit=fit_in_process)
    assert os.path.exists(flag) and not storage.exists(storage.join(out, storage.MANIFEST))
    half = _ckpt(out, 2)
    assert (ckpt_lib.incomplete_reason(half) is None) == hook.startswith("after_checkpoint")
    if hook.startswith("checkpoint_write"):
        assert [f.rsplit("/", 1)[-1] for f in storage.get_fs(half)[0].ls(storage.get_fs(half)[1])] == ["model.pt"]
    monkeypatch.delenv("AACRAY_TEST_HOOK")
    summary = _rerun(_cfg(train_extract, out), caplog, fit=fit_in_process)
    ckpt = _ckpt(out, resumed)
    assert summary["resumed_from"] == {"epoch": resumed, "checkpoint": ckpt}
    assert f"resuming from the checkpoint of epoch {resumed}: {ckpt}" in caplog.text
    assert _metrics(out)["resumes"] == [{"epoch": resumed, "checkpoint": ckpt}]
    if hook.startswith("checkpoint_write"):
        assert f"skipping checkpoint {half}: no _COMPLETE.json" in caplog.text
    assert_same_training(out, reference)


def test_finished_run_run_again_trains_nothing_and_commits_the_same(train_extract, reference, tmp_path, caplog):
    out = str(tmp_path / "train")
    shutil.copytree(reference, out)
    summary = _rerun(_cfg(train_extract, out), caplog, fit=lambda job: pytest.fail("nothing was left to train"))
    assert summary["resumed_from"] == {"epoch": 3, "checkpoint": _ckpt(out, 3)}
    assert "all 3 epochs are in" in caplog.text
    assert_same_training(out, reference)


@pytest.mark.parametrize("change", [{"model": {**TINY, "d_model": 64}}, {"label_smoothing": 0.1}, {"min_freq": 3}])
def test_rerun_with_another_model_recipe_or_vocabulary_is_refused(train_extract, reference, tmp_path, change):
    """A finished run's output run again with another model size, recipe or vocabulary
    (min_freq 3 drops words): refused before anything is written, the output untouched."""
    out = str(tmp_path / "train")
    shutil.copytree(reference, out)
    before = sorted(os.listdir(os.path.join(out, "ray_train")))
    with pytest.raises(BadInputError, match=r"was trained with another config") as e:
        run_train(_cfg(train_extract, out, **change), fit=fit_in_process)
    assert f"{next(iter(change))}: " in str(e.value)
    assert "restart=true" in str(e.value)
    assert storage.read_manifest(out)["extra"]["epochs"] == 3
    assert sorted(os.listdir(os.path.join(out, "ray_train"))) == before


# --------------------------------------------------------------------------------------
# On Ray Train (the session's embedded Ray)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(ray_local, train_extract, reference, tmp_path, monkeypatch):
    """The Ray Train worker SIGKILLed mid-epoch 3 under max_failures=1: Ray Train restarts
    the worker group within the same job, and the new worker continues from the newest
    complete checkpoint on disk (epoch 2), not from Ray's own checkpoint list."""
    out = str(tmp_path / "train")
    flag = _arm(monkeypatch, tmp_path, "mid_epoch:3:kill")
    summary = run_train(_cfg(train_extract, out, max_failures=1))
    assert os.path.exists(flag), "the fault hook never fired"
    assert summary["resumed_from"] is None  # the job itself started from epoch 1
    assert _metrics(out)["resumes"] == [{"epoch": 2, "checkpoint": _ckpt(out, 2)}]
    assert storage.read_manifest(out)["extra"]["epochs"] == 3
    assert_same_training(out, reference)


@pytest.mark.slow
def test_training_to_s3_resumes_and_loads(ray_local, train_extract, reference, s3_bucket, tmp_path, monkeypatch, caplog):
    """Output and checkpoints on s3:// (moto): the worker killed while checkpoint 2 is
    written, the job fails (max_failures=0); the rerun skips that checkpoint on S3,
    resumes from epoch 1, and checkpoint.load reads the result."""
    from ray.train import TrainingFailedError

    out = f"{s3_bucket}/runs/train"
    _arm(monkeypatch, tmp_path, "checkpoint_write:2:kill")
    with pytest.raises(TrainingFailedError):
        run_train(_cfg(train_extract, out))
    assert "half-written" in ckpt_lib.incomplete_reason(_ckpt(out, 2))
    monkeypatch.delenv("AACRAY_TEST_HOOK")
    summary = _rerun(_cfg(train_extract, out), caplog)
    assert summary["resumed_from"] == {"epoch": 1, "checkpoint": _ckpt(out, 1)}
    assert f"skipping checkpoint {_ckpt(out, 2)}" in caplog.text
    _, _, info = ckpt_lib.load(out)
    selected = _metrics(out)["selected"]["epoch"]
    assert info["epoch"] == selected and info["folder"] == f"{out}/checkpoint"
    kept = [e for e, _ in ckpt_lib.run_checkpoints(storage.join(out, "ray_train"))]
    assert kept == sorted({3, 2, selected}, reverse=True)  # the two newest and the selected one
    assert _metrics(out)["resumes"] == [{"epoch": 1, "checkpoint": _ckpt(out, 1)}]
    assert_same_training(out, reference)
