"""Checkpoint selection (aacray/selection.py, issue 16 point 3): the rule on hand-made
histories, the validation mAP@10 against a brute force, and through train_decoder (in
process): the selected epoch is the one the criterion picks, its weights are what
`checkpoint/` holds, its folder survives pruning, and a run stopped and resumed selects
what an uninterrupted run selects."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_faults_train import SMALL_RUN, _arm, assert_same_training
from test_train import TINY, write_train_extract

from aacray import checkpoint as ckpt_lib
from aacray import selection, storage
from aacray.config import TrainConfig, from_dict
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.embeddings import EmbeddingSet, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.scorer import reference_loss_matrix
from aacray.train import InjectedFault, fit_in_process, prepare, prune_checkpoints, run_train


def _history(values: dict[int, float], key: str = "val_loss") -> list[dict]:
    return [{"epoch": e, key: v} for e, v in sorted(values.items())]


@pytest.mark.parametrize(
    "criterion, values, every, want",
    [
        ("val_loss", {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.7}, 1, 2),  # lowest
        ("t2a_mAP@10", {1: 0.1, 2: 0.3, 3: 0.3, 4: 0.2}, 1, 2),  # highest, ties: the earliest
        ("val_loss", {1: 3.0, 2: 2.0, 3: 1.0, 4: 2.7}, 2, 2),  # epoch 3 has no checkpoint
        ("val_loss", {1: 3.0, 2: 2.0, 3: 1.0}, 2, 3),  # the last epoch always has one
        ("last", {1: 3.0, 2: 1.0, 3: 2.0}, 1, 3),
    ],
)
def test_select_picks_the_best_checkpointed_epoch(criterion, values, every, want):
    key = "val_loss" if criterion == "last" else criterion
    chosen = selection.select(_history(values, key), criterion, epochs=max(values), every=every)
    assert chosen.epoch == want
    assert chosen.value == (None if criterion == "last" else values[want])


def test_select_refuses_a_history_without_the_value():
    with pytest.raises(ValueError, match=r"epochs \[2\] have no cider_d"):
        selection.select([{"epoch": 1, "cider_d": 0.1}, {"epoch": 2}], "cider_d", epochs=2, every=1)


@pytest.mark.parametrize("selected, left", [(1, (1, 4, 5)), (3, (3, 4, 5)), (5, (4, 5)), (4, (4, 5))])
def test_prune_keeps_the_two_newest_and_the_selected_epoch(tmp_path, selected, left):
    run = str(tmp_path / "run")
    for e in range(1, 6):
        folder = os.path.join(run, ckpt_lib.run_checkpoint_name(e))
        os.makedirs(folder)
        open(os.path.join(folder, ckpt_lib.MARKER), "w").close()
    prune_checkpoints(run, newest=5, also_keep=selected)
    assert sorted(os.listdir(run)) == [ckpt_lib.run_checkpoint_name(e) for e in left]


def test_validation_map_equals_a_brute_force():
    """t2a_mAP@10 on 12 clips x 2 captions: the pair scorer and retrieval rules against
    the reference loss loop, a full argsort per caption and mean 1/rank within 10."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    model = CaptionDecoder(DecoderConfig(**TINY), 30, 0).eval()
    ids = [f"v{i:02d}" for i in range(12)]
    frames = [rng.standard_normal((int(rng.integers(3, 9)), 768)).astype(np.float32) for _ in ids]
    tokens = {a: [[1, *rng.integers(4, 30, int(rng.integers(2, 6))).tolist(), 2] for _ in range(2)] for a in ids}
    tok = type("Tok", (), {"pad_id": 0})()
    got = selection.t2a_map_at_10(model, tok, EmbeddingSet(ids, ["validation"] * 12, frames), tokens)
    flat = [(a, t) for a in ids for t in tokens[a]]
    L = reference_loss_matrix(model, 0, frames, [t for _, t in flat])  # (N, M)
    rr = []
    for j, (a, _) in enumerate(flat):
        order = sorted(range(len(ids)), key=lambda i: (L[i, j], ids[i]))
        rank = [ids[i] for i in order].index(a) + 1
        rr.append(1.0 / rank if rank <= 10 else 0.0)
    assert got == pytest.approx(float(np.mean(rr)), abs=1e-12)
    assert 0 < got < 1


# --------------------------------------------------------------------------------------
# Through train_decoder, in process
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> str:
    return write_train_extract(str(tmp_path_factory.mktemp("sel_ext") / "ext"))


def _cfg(ext: str, out: str, **kw) -> TrainConfig:
    return from_dict(TrainConfig, {"embeddings": ext, "output": out, **SMALL_RUN, **kw})


def _metrics(out: str) -> dict:
    return json.loads(open(os.path.join(out, "metrics.json")).read())


def test_checkpoint_holds_the_selected_epoch(extract, tmp_path, monkeypatch):
    """A criterion scripted to peak at epoch 1: the output keeps epoch 1's weights (equal to
    its checkpoint under ray_train/, kept through pruning), metrics.json says why."""
    scripted = {1: 0.9, 2: 0.2, 3: 0.5}
    seen = []

    def fake_value(criterion, model, tok, val, val_tokens, val_texts):
        seen.append(criterion)
        return scripted[len(seen)]

    monkeypatch.setattr(selection, "criterion_value", fake_value)
    out = str(tmp_path / "train")
    summary = run_train(_cfg(extract, out, select_by="t2a_mAP@10"), fit=fit_in_process)
    assert seen == ["t2a_mAP@10"] * 3
    m = _metrics(out)
    assert [h["t2a_mAP@10"] for h in m["history"]] == [0.9, 0.2, 0.5]
    assert m["selected"]["epoch"] == summary["selected_epoch"] == 1
    assert m["selected"]["value"] == 0.9 and m["selected"]["mode"] == "max" and "highest t2a_mAP@10" in m["selected"]["why"]
    kept = [e for e, _ in ckpt_lib.run_checkpoints(os.path.join(out, "ray_train"))]
    assert kept == [3, 2, 1]
    final, _, info = ckpt_lib.load(out)
    epoch1, _, _ = ckpt_lib.load(os.path.join(out, "ray_train", ckpt_lib.run_checkpoint_name(1)))
    assert info["epoch"] == 1
    for k, v in epoch1.state_dict().items():
        torch.testing.assert_close(final.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_real_criterion_values_in_the_history(extract, tmp_path):
    """select_by=t2a_mAP@10 for real: each epoch's value equals the brute-force-checked
    function on that epoch's own checkpoint, and the selection is their argmax."""
    out = str(tmp_path / "train")
    run_train(_cfg(extract, out, select_by="t2a_mAP@10", epochs=2), fit=fit_in_process)
    m = _metrics(out)
    values = [h["t2a_mAP@10"] for h in m["history"]]
    assert m["selected"]["epoch"] == int(np.argmax(values)) + 1
    val = read_embeddings(extract, ["validation"])
    model, tok, _ = ckpt_lib.load(os.path.join(out, "ray_train", ckpt_lib.run_checkpoint_name(2)))
    state = ckpt_lib.load_state(os.path.join(out, "ray_train", ckpt_lib.run_checkpoint_name(2)))
    assert state["history"][-1]["t2a_mAP@10"] == values[1]
    prep = prepare(_cfg(extract, out), read_embeddings(extract, ["development"]), val, read_captions(extract))
    assert selection.t2a_map_at_10(model, tok, val, prep.val_tokens) == pytest.approx(values[1], abs=1e-12)


def test_resumed_run_selects_what_an_uninterrupted_run_selects(extract, tmp_path, monkeypatch):
    cfg = {"select_by": "t2a_mAP@10"}
    ref = str(tmp_path / "ref")
    run_train(_cfg(extract, ref, **cfg), fit=fit_in_process)
    out = str(tmp_path / "train")
    _arm(monkeypatch, tmp_path, "mid_epoch:3:raise")
    with pytest.raises(InjectedFault):
        run_train(_cfg(extract, out, **cfg), fit=fit_in_process)
    monkeypatch.delenv("AACRAY_TEST_HOOK")
    summary = run_train(_cfg(extract, out, **cfg), fit=fit_in_process)
    assert summary["resumed_from"]["epoch"] == 2
    assert _metrics(out)["selected"] == _metrics(ref)["selected"]
    assert_same_training(out, ref)


def test_unavailable_criterion_is_refused_before_training(extract, tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "fense_problem", lambda: "FENSE's models are not in the cache (fix: ...)")
    out = str(tmp_path / "train")
    with pytest.raises(BadInputError, match=r"select_by=fense cannot run here: FENSE's models .*choose another select_by"):
        run_train(_cfg(extract, out, select_by="fense"), fit=fit_in_process)
    assert not storage.exists(out)


def test_another_select_by_is_a_resume_mismatch(extract, tmp_path):
    out = str(tmp_path / "train")
    run_train(_cfg(extract, out, epochs=2), fit=fit_in_process)
    with pytest.raises(BadInputError, match=r"select_by: 'val_loss' in the checkpoint, 'last' now"):
        run_train(_cfg(extract, out, epochs=2, select_by="last"), fit=fit_in_process)
