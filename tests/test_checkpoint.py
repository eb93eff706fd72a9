"""Checkpoint folders: the completion marker, and the files `checkpoint.load` refuses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from faults import CAPTIONS, TINY, write_random_checkpoint

from aacray import checkpoint as ckpt_lib
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.text import WordTokenizer


def _saved(tmp_path, name: str = "ckpt") -> str:
    folder = str(tmp_path / name)
    write_random_checkpoint(folder, CAPTIONS)
    return folder


def test_marker_is_written_last_and_lists_every_file(tmp_path):
    tok = WordTokenizer.build(CAPTIONS)
    model = CaptionDecoder(DecoderConfig(**TINY), tok.vocab_size, tok.pad_id)
    folder = str(tmp_path / "c")
    seen = []

    def written(name: str) -> None:
        seen.append((name, os.path.exists(os.path.join(folder, ckpt_lib.MARKER))))
        assert ckpt_lib.incomplete_reason(folder) is not None  # not complete before the marker

    ckpt_lib.save(folder, model, tok, "a: 1\n", epoch=3, on_file_written=written)
    assert seen == [("model.pt", False), ("tokenizer.json", False), ("config.yaml", False)]
    marker = json.loads(open(os.path.join(folder, ckpt_lib.MARKER)).read())
    assert marker["epoch"] == 3 and sorted(marker["files"]) == sorted(ckpt_lib.FILES)
    assert marker["files"]["config.yaml"]["bytes"] == len("a: 1\n")
    assert ckpt_lib.incomplete_reason(folder) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("no_marker", "no _COMPLETE.json"),
        ("no_tokenizer", "tokenizer.json is missing"),
        ("truncated_weights", "model.pt is not the file _COMPLETE.json lists"),
        ("same_size_other_bytes", "model.pt is not the file _COMPLETE.json lists"),
        ("bad_marker", "_COMPLETE.json is unreadable"),
    ],
)
def test_incomplete_checkpoint_named(tmp_path, damage, reason):
    folder = _saved(tmp_path)
    path = {"weights": os.path.join(folder, "model.pt"), "marker": os.path.join(folder, ckpt_lib.MARKER)}
    data = open(path["weights"], "rb").read()
    if damage == "no_marker":
        os.remove(path["marker"])
    elif damage == "no_tokenizer":
        os.remove(os.path.join(folder, "tokenizer.json"))
    elif damage == "truncated_weights":
        open(path["weights"], "wb").write(data[: len(data) // 2])
    elif damage == "same_size_other_bytes":
        open(path["weights"], "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        open(path["marker"], "w").write("{")
    assert reason in ckpt_lib.incomplete_reason(folder)


def test_run_checkpoints_newest_first(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_epoch_0002", "checkpoint_epoch_0010", "checkpoint_epoch_0001", "checkpoint_2026-01-01_00-00-00.000000", "other"):
        (run / name).mkdir(parents=True)
    (run / "checkpoint_epoch_0003").write_text("a file, not a folder")
    got = [(e, os.path.basename(f)) for e, f in ckpt_lib.run_checkpoints(str(run))]
    assert got == [
        (10, "checkpoint_epoch_0010"),
        (2, "checkpoint_epoch_0002"),
        (1, "checkpoint_epoch_0001"),
        (-1, "checkpoint_2026-01-01_00-00-00.000000"),
    ]
    assert ckpt_lib.run_checkpoints(str(tmp_path / "absent")) == []


def test_copy_keeps_weights_and_completeness(tmp_path):
    src = _saved(tmp_path)
    ckpt_lib.copy(src, str(tmp_path / "dst"))
    assert ckpt_lib.incomplete_reason(str(tmp_path / "dst")) is None
    a, b = ckpt_lib.load(src)[0], ckpt_lib.load(str(tmp_path / "dst"))[0]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_load_refuses_a_checkpoint_without_weights(tmp_path):
    folder = _saved(tmp_path)
    os.remove(os.path.join(folder, "model.pt"))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.pt: missing .*copy the whole folder again"):
        ckpt_lib.load(folder)


def test_load_refuses_a_checkpoint_without_tokenizer(tmp_path):
    folder = _saved(tmp_path)
    os.remove(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"tokenizer\.json: missing: .*copy tokenizer\.json from the folder"):
        ckpt_lib.load(folder)


@pytest.mark.parametrize("edit", ["missing_tensor", "wrong_shape", "other_width"])
def test_load_refuses_weights_that_do_not_fit(tmp_path, edit):
    folder = _saved(tmp_path)
    path = os.path.join(folder, "model.pt")
    state = torch.load(path, weights_only=True)
    if edit == "missing_tensor":
        state["model"].pop(next(iter(state["model"])))
    elif edit == "wrong_shape":
        key = next(k for k, v in state["model"].items() if v.ndim == 2)
        state["model"][key] = torch.zeros(3, 3)
    else:  # the config says another width than the tensors have
        state["decoder_config"]["d_model"] = 2 * state["decoder_config"]["d_model"]
    torch.save(state, path)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.pt: its weights do not fit the decoder .*retrain"):
        ckpt_lib.load(folder)


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="_MANIFEST.json is missing"):
        ckpt_lib.load(str(tmp_path / "empty"))
