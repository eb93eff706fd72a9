"""A decoder checkpoint folder: weights (+ optimizer and scheduler state), tokenizer, config.

Layout (a local folder or an s3:// prefix):
  model.pt        torch.save of plain tensors and numbers only (loads with weights_only=True):
                  {"model", "decoder_config", "vocab_size", "tokenizer_sha256" (the digest of
                  tokenizer.json's content, checked on load), "epoch", and for resuming
                  "optimizer", "scheduler", "history", "resumes"}
  tokenizer.json  the word-level `tokenizers` file the model was trained with
  config.yaml     the resolved training config
  _COMPLETE.json  written last: the epoch and each file's size and sha256

A writer can be interrupted between any two files (a local file or an S3 object is
itself whole or absent), and a retried writer may overwrite a folder an earlier one left
half-written. So a folder is complete only when `_COMPLETE.json` exists and every file
it lists has the listed size and digest (`incomplete_reason`); training resumes only
from complete folders. `load` does not demand the marker: checkpoints written before it
existed still load, and its own checks say what is wrong with a file.

A training run keeps its checkpoints as `checkpoint_epoch_NNNN` folders under one run
folder (`run_checkpoints` lists them, newest first).

Inference always rebuilds the model from this folder, never from today's YAML. A
training output folder (runs/.../train_decoder) is accepted too: its manifest names the
final checkpoint. So is the authors' released model, a CoNeTTE folder as the Hugging Face
hub ships it (config.json + model.safetensors or pytorch_model.bin): `resolve` and `load`
dispatch on the folder's kind, so every job reads either through the same `load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Callable

import torch

from aacray import conette_model, storage
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.errors import CheckpointError
from aacray.text import WordTokenizer

MARKER = "_COMPLETE.json"
FILES = ("model.pt", "tokenizer.json", "config.yaml")
_RUN_FOLDER = re.compile(r"^checkpoint_epoch_(\d+)$")


def save(
    folder: str,
    model: CaptionDecoder,
    tokenizer: WordTokenizer,
    config_yaml: str,
    epoch: int,
    extra: dict | None = None,
    on_file_written: Callable[[str], None] | None = None,
) -> None:
    """Write the checkpoint's files one by one, `_COMPLETE.json` last. `on_file_written`
    is called with each file's name once it is written (before the marker)."""
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "decoder_config": dataclasses.asdict(model.cfg),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "epoch": epoch,
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {
        "model.pt": buf.getvalue(),
        "tokenizer.json": tokenizer.to_str().encode("utf-8"),
        "config.yaml": config_yaml.encode("utf-8"),
    }
    write_files(folder, files, epoch, on_file_written)


def write_files(folder: str, files: dict[str, bytes], epoch: int, on_file_written: Callable[[str], None] | None = None) -> None:
    """Write `files` into `folder` in order, then the marker that lists them."""
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
        if on_file_written is not None:
            on_file_written(name)
    listing = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()}
    storage.write_text(storage.join(folder, MARKER), json.dumps({"epoch": epoch, "files": listing}, indent=2) + "\n")


def copy(src: str, dst: str) -> None:
    """Copy a complete checkpoint folder (local or s3://) to `dst`, the marker last."""
    marker = storage.read_json(storage.join(src, MARKER))
    files = {name: storage.read_bytes(storage.join(src, name)) for name in marker["files"]}
    write_files(dst, files, int(marker["epoch"]))


def incomplete_reason(folder: str) -> str | None:
    """None when `folder` is a complete checkpoint, else why it is not (for a log line)."""
    try:
        marker = storage.read_json(storage.join(folder, MARKER))
        listing = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its writer stopped before it finished (half-written)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MARKER} is unreadable ({type(e).__name__}: {e})"
    for name, want in listing.items():
        try:
            data = storage.read_bytes(storage.join(folder, name))
        except FileNotFoundError:
            return f"{name} is missing (half-written)"
        if len(data) != want["bytes"] or _sha256(data) != want["sha256"]:
            return (
                f"{name} is not the file {MARKER} lists ({len(data)} bytes, {MARKER} says "
                f"{want['bytes']}): half-overwritten or damaged"
            )
    return None


def run_checkpoints(run: str) -> list[tuple[int, str]]:
    """(epoch, folder URI) of every `checkpoint_epoch_NNNN` folder under `run`, newest first.
    Other `checkpoint_*` folders (older aacray versions named them by time) come last,
    with epoch -1."""
    fs, path = storage.get_fs(run)
    try:
        entries = fs.ls(path, detail=True) if fs.exists(path) else []
    except Exception as e:
        raise storage.StorageError(f"listing {run} failed: {type(e).__name__}: {e}") from e
    found = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or not name.startswith("checkpoint_"):
            continue
        m = _RUN_FOLDER.match(name)
        found.append((int(m.group(1)) if m else -1, storage.join(run, name)))
    return sorted(found, key=lambda item: (-item[0], item[1]))


def run_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_digest(tok: WordTokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def resolve(uri: str) -> str:
    """A checkpoint folder or a CoNeTTE model folder, or a train_decoder output whose
    manifest points at a checkpoint folder."""
    if storage.exists(storage.join(uri, "model.pt")) or conette_model.is_folder(uri):
        return uri
    if not storage.exists(storage.join(uri, storage.MANIFEST)):
        # a train_decoder output has config.yaml too: only these mark a checkpoint folder
        present = [name for name in ("tokenizer.json", MARKER) if storage.exists(storage.join(uri, name))]
        if present:
            raise CheckpointError(
                f"{storage.join(uri, 'model.pt')}: missing (the folder holds {', '.join(present)}): "
                "a checkpoint without its weights, e.g. a copy that stopped half-way; copy the "
                "whole folder again, or point at the train_decoder output that wrote it"
            )
    manifest = storage.read_manifest(uri)  # names a crashed or unfinished output itself
    rel = manifest.get("extra", {}).get("checkpoint")
    if not rel:
        raise CheckpointError(
            f"{uri}: neither a checkpoint folder (model.pt, tokenizer.json, config.yaml) nor a "
            "train_decoder output: point `checkpoint` at one of them"
        )
    return storage.join(uri, rel)


def load_state(folder: str) -> dict:
    path = storage.join(folder, "model.pt")
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not found: the checkpoint has no weights; copy the whole folder again "
            "or point at the train_decoder output that wrote it"
        ) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused: only plain tensors and numbers are loaded (weights_only=True); "
            f"this file holds something else ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _load_tokenizer(folder: str, state: dict) -> WordTokenizer:
    path = storage.join(folder, "tokenizer.json")
    try:
        tok = WordTokenizer.from_str(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing: the weights are unusable without the vocabulary they were "
            "trained with; copy tokenizer.json from the folder train_decoder wrote (it keeps "
            "model.pt and tokenizer.json together), or retrain"
        ) from None
    if tok.vocab_size != state["vocab_size"]:
        raise CheckpointError(
            f"{folder}: tokenizer.json has {tok.vocab_size} words but the weights were trained "
            f"with {state['vocab_size']}: the tokenizer does not belong to this checkpoint"
        )
    # same size is not same vocabulary: model.pt records its tokenizer's digest (older
    # checkpoints without it get the size check only)
    if state.get("tokenizer_sha256", tokenizer_digest(tok)) != tokenizer_digest(tok):
        raise CheckpointError(
            f"{folder}: tokenizer.json is not the vocabulary the weights were trained with "
            "(its digest differs from the one model.pt records): the tokenizer does not belong "
            "to this checkpoint"
        )
    return tok


def weights_path(uri: str) -> str:
    """The weights file of the checkpoint `uri` resolves to (model.pt, or a CoNeTTE folder's)."""
    folder = resolve(uri)
    if conette_model.is_folder(folder):
        return storage.join(folder, next(n for n in conette_model.WEIGHT_FILES if storage.exists(storage.join(folder, n))))
    return storage.join(folder, "model.pt")


def load(
    uri: str, device: str | torch.device = "cpu", task: str = conette_model.DEFAULT_TASK
) -> tuple[CaptionDecoder, WordTokenizer, dict]:
    """(model in eval mode, tokenizer, info) from a checkpoint folder, a training output or
    a CoNeTTE model folder (aacray/conette_model.py), the one loader of every job.

    task: the CoNeTTE task whose token starts every caption (the tokenizer's bos); aacray's
    own checkpoints have no task tokens and take the default only.
    """
    folder = resolve(uri)
    if conette_model.is_folder(folder):
        model, tok, extra = conette_model.load(folder, task)
        return model.to(device).eval(), tok, _info(folder, None, tok) | extra
    if task != conette_model.DEFAULT_TASK:
        raise CheckpointError(
            f"{folder}: an aacray checkpoint has no task tokens, so task={task!r} does not apply (it "
            f"selects a CoNeTTE model's caption style): leave task at {conette_model.DEFAULT_TASK}"
        )
    state = load_state(folder)
    tok = _load_tokenizer(folder, state)
    cfg = DecoderConfig(**state["decoder_config"])
    model = CaptionDecoder(cfg, tok.vocab_size, tok.pad_id)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{storage.join(folder, 'model.pt')}: its weights do not fit the decoder its own "
            f"decoder_config and vocab_size describe ({detail}): the file was damaged or "
            "edited; use the checkpoint folder train_decoder wrote, or retrain"
        ) from None
    model.to(device).eval()
    return model, tok, _info(folder, state.get("epoch"), tok)


def _info(folder: str, epoch: int | None, tok: WordTokenizer) -> dict:
    digest = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    return {"folder": folder, "epoch": epoch, "tokenizer_sha": digest, "vocab_size": tok.vocab_size}


def local_copy_dir(folder: str, tmp: str) -> str:
    """Copy a (possibly remote) checkpoint folder to a local temp dir; returns the local path."""
    for name in FILES:
        src = storage.join(folder, name)
        if storage.exists(src):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(src))
    return tmp
