"""Synthetic inputs the project makes itself, for its tests and benchmarks: a committed
extract output (embeddings + captions, the contract of docs/operations.md) and a random
decoder checkpoint whose tokenizer holds the captions' words. No model weights or datasets
can be downloaded where they run; these exercise the real readers and loaders."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from aacray import checkpoint as ckpt_lib
from aacray import storage
from aacray.decoder import CaptionDecoder, DecoderConfig
from aacray.embeddings import CAPTION_SCHEMA, embedding_table
from aacray.text import WordTokenizer


def write_extract_output(uri: str, ids, subsets, frames: list[np.ndarray], caps, emb: pa.Table | None = None) -> str:
    """A committed extract_embeddings output: embeddings (each audio's frames x 768) and
    captions, `caps` rows of (caption_id, subset, text, audio_id). emb: an embeddings table
    built by the caller instead (another encoder's width)."""
    storage.begin_output(uri, ["embeddings", "captions"])
    if emb is None:
        n = len(ids)
        emb = embedding_table(list(ids), list(subsets), list(frames), [f"synthetic://{a}" for a in ids], [32000] * n)
    storage.write_table(uri, "embeddings", emb)
    cap = pa.table([pa.array([r[k] for r in caps], pa.string()) for k in range(4)], schema=CAPTION_SCHEMA)
    storage.write_table(uri, "captions", cap)
    storage.commit_output(uri, "extract_embeddings", {}, ["embeddings", "captions"])
    return uri


def write_random_checkpoint(folder: str, texts: list[str], seed: int = 0, model: DecoderConfig | None = None) -> WordTokenizer:
    """A checkpoint of a randomly initialised decoder (seeded) with a tokenizer built on
    `texts`; returns that tokenizer."""
    tok = WordTokenizer.build(texts)
    torch.manual_seed(seed)
    decoder = CaptionDecoder(model or DecoderConfig(), tok.vocab_size, tok.pad_id)
    ckpt_lib.save(folder, decoder, tok, "synthetic: true\n", epoch=1)
    return tok
