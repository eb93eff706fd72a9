"""A few audio files or arrays, no cluster: caption them, score them against captions, rank.

`Captioner(checkpoint)` takes either kind of checkpoint that every job takes (aacray's own, a
train_decoder output, or a CoNeTTE model folder: aacray/checkpoint.py) and runs the jobs'
own code on the clips it is given, in process:
- audio: decode, mono, resample, log-mel (aacray/audio.py, extract_embeddings' steps), then
  the encoder's frames (`encoder.encode_logmels`, extract_embeddings' forward);
- `caption`: `beam_search` on the padded batch (the caption job's call), with the CoNeTTE
  folder's decoding settings (beam 3, 3-20 tokens) or beam_search's defaults (the same);
- `losses`: `BlockScorer` (score_matrix's scorer), captions longer than the decoder takes
  refused as score_matrix refuses them (`scorer.over_long`);
- `rank`: `retrieval.score_block` (score_matrix's ranking of a block): T2A, raw A2T and
  min-max A2T over the given audios.
The encoder: a CoNeTTE folder carries its ConvNeXt and is used by default; with aacray's own
checkpoint name the encoder its embeddings were extracted with (`encoder`, and
`encoder_checkpoint` for convnext_tiny), as extract_embeddings was configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aacray import audio, storage
from aacray import checkpoint as ckpt_lib
from aacray.decoder import pad_frames
from aacray.decoding import beam_search
from aacray.encoder import build_encoder, encode_logmels
from aacray.errors import BadInputError
from aacray.retrieval import score_block
from aacray.scorer import BlockScorer, over_long

Audio = str | np.ndarray
"""A file path or URI (local or s3://), or samples (n,) or (channels, n) at `sample_rate`."""


@dataclass
class Rankings:
    """Losses (N audios x M captions) and the three rankings, best first."""

    losses: np.ndarray
    t2a: dict[str, list[str]]
    """caption id -> audio ids by ascending loss."""
    a2t: dict[str, list[str]]
    """audio id -> caption ids by ascending loss (raw A2T)."""
    a2t_minmax: dict[str, list[str]]
    """audio id -> caption ids by min-max scaled loss (each caption's loss scaled over the audios)."""


class Captioner:
    """A checkpoint and its audio encoder, ready for a few clips."""

    def __init__(self, checkpoint: str, task: str = "clotho", encoder: str | None = None,
                 encoder_checkpoint: str | None = None, device: str = "cpu") -> None:
        self.device = device
        self.model, self.tok, self.info = ckpt_lib.load(checkpoint, device, task)
        conette = self.info.get("kind") == "conette"
        name = encoder or "convnext_tiny"
        if encoder_checkpoint is None and conette and name == "convnext_tiny":
            encoder_checkpoint = checkpoint  # the folder's own ConvNeXt
        self.encoder, self.encoder_info = build_encoder(name, encoder_checkpoint, device)
        self.decoding: dict = dict(self.info.get("decoding", {}))

    def frames(self, audios: Sequence[Audio], sample_rate: int = audio.SAMPLE_RATE) -> list[np.ndarray]:
        """Clips -> frame embeddings [(S_i, E)], as extract_embeddings computes them."""
        logmels = []
        for a in audios:
            if isinstance(a, str):
                wav, _ = audio.load_clip(storage.read_bytes(a), a)
            else:
                x = np.asarray(a, dtype=np.float32)
                wav = audio.resample(x.mean(axis=0) if x.ndim == 2 else x, sample_rate)
            logmels.append(audio.log_mel(wav).numpy())
        return encode_logmels(self.encoder, logmels, self.device)

    def caption(self, audios: Sequence[Audio], sample_rate: int = audio.SAMPLE_RATE, **decoding) -> list[str]:
        """One caption per clip; decoding overrides beam_size, min_len, max_len, forbid_repeats."""
        x, mask = pad_frames(self.frames(audios, sample_rate))
        gen = beam_search(self.model, x.to(self.device), mask.to(self.device), self.tok, **(self.decoding | decoding))
        return [g.text for g in gen]

    def losses(self, audios: Sequence[Audio], captions: Sequence[str], sample_rate: int = audio.SAMPLE_RATE) -> np.ndarray:
        """Loss matrix (N audios, M captions) float32: the retrieval score of every pair."""
        frames = self.frames(audios, sample_rate)
        tokens = [self.tok.encode(t) for t in captions]
        ids = [f"caption {j}" for j in range(len(captions))]
        long = over_long(ids, tokens, self.model.cfg.max_tokens)
        if long:
            raise BadInputError(long)
        with torch.inference_mode():
            L, _ = BlockScorer(self.model, self.tok.pad_id, frames, self.device).losses(tokens, k=1)
        return L

    def rank(self, audios: Sequence[Audio], captions: Sequence[str], audio_ids: Sequence[str] | None = None,
             k: int = 10, sample_rate: int = audio.SAMPLE_RATE) -> Rankings:
        """Losses and rankings of `audios` (ids: `audio_ids`, default the file names or
        "audio i") against `captions` (ids: the texts themselves, which must be distinct)."""
        if audio_ids is None:
            audio_ids = [a.rsplit("/", 1)[-1] if isinstance(a, str) else f"audio {i}" for i, a in enumerate(audios)]
        L = self.losses(audios, captions, sample_rate)
        res = score_block(L, list(audio_ids), list(captions), k)
        return Rankings(L, res.t2a.lists(), res.a2t_raw.lists(), res.a2t_minmax.lists())
