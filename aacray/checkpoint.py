"""A decoder checkpoint folder: weights (+ optimizer and scheduler state), tokenizer, config.

Layout (a local folder or an s3:// prefix):
  model.pt        torch.save of plain tensors and numbers only (loads with weights_only=True):
                  {"model", "decoder_config", "vocab_size", "tokenizer_sha256" (the digest of
                  tokenizer.json's content, checked on load), "epoch", and for resuming
                  "optimizer", "scheduler"}
  tokenizer.json  the word-level `tokenizers` file the model was trained with
  config.yaml     the resolved training config

Inference always rebuilds the model from this folder, never from today's YAML. A
training output folder (runs/.../train_decoder) is accepted too: its manifest names the
final checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import torch

from aacray import storage
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.text import WordTokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def save(folder: str, model: CaptionDecoder, tokenizer: WordTokenizer, config_yaml: str, epoch: int, extra: dict | None = None) -> None:
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "decoder_config": dataclasses.asdict(model.cfg),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": _tokenizer_digest(tokenizer),
        "epoch": epoch,
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(folder, "model.pt"), buf.getvalue())
    storage.write_text(storage.join(folder, "tokenizer.json"), tokenizer.to_str())
    storage.write_text(storage.join(folder, "config.yaml"), config_yaml)


def _tokenizer_digest(tok: WordTokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def resolve(uri: str) -> str:
    """A checkpoint folder, or a train_decoder output whose manifest points at one."""
    if storage.exists(storage.join(uri, "model.pt")):
        return uri
    manifest = storage.read_manifest(uri)
    rel = manifest.get("extra", {}).get("checkpoint")
    if not rel:
        raise CheckpointError(f"{uri}: neither a checkpoint folder (model.pt) nor a train_decoder output")
    return storage.join(uri, rel)


def load_state(folder: str) -> dict:
    path = storage.join(folder, "model.pt")
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused: only plain tensors and numbers are loaded (weights_only=True); "
            f"this file holds something else ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def load(uri: str, device: str | torch.device = "cpu") -> tuple[CaptionDecoder, WordTokenizer, dict]:
    """(model in eval mode, tokenizer, info) from a checkpoint folder or training output."""
    folder = resolve(uri)
    state = load_state(folder)
    try:
        tok = WordTokenizer.from_str(storage.read_bytes(storage.join(folder, "tokenizer.json")).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: tokenizer.json is missing") from None
    if tok.vocab_size != state["vocab_size"]:
        raise CheckpointError(
            f"{folder}: tokenizer.json has {tok.vocab_size} words but the weights were trained "
            f"with {state['vocab_size']}: the tokenizer does not belong to this checkpoint"
        )
    # same size is not same vocabulary: model.pt records its tokenizer's digest (older
    # checkpoints without it get the size check only)
    if state.get("tokenizer_sha256", _tokenizer_digest(tok)) != _tokenizer_digest(tok):
        raise CheckpointError(
            f"{folder}: tokenizer.json is not the vocabulary the weights were trained with "
            "(its digest differs from the one model.pt records): the tokenizer does not belong "
            "to this checkpoint"
        )
    cfg = DecoderConfig(**state["decoder_config"])
    model = CaptionDecoder(cfg, tok.vocab_size, tok.pad_id)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit the model: {str(e)[:300]}") from None
    model.to(device).eval()
    digest = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    info = {"folder": folder, "epoch": state.get("epoch"), "tokenizer_sha": digest, "vocab_size": tok.vocab_size}
    return model, tok, info


def local_copy_dir(folder: str, tmp: str) -> str:
    """Copy a (possibly remote) checkpoint folder to a local temp dir; returns the local path."""
    for name in ("model.pt", "tokenizer.json", "config.yaml"):
        src = storage.join(folder, name)
        if storage.exists(src):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(src))
    return tmp
