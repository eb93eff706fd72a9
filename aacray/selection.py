"""Checkpoint selection: which epoch's weights a train_decoder output keeps.

The authors select the epoch with the best validation FENSE and test that one (conette's
`pl_modules/conette.py` monitors a validation metric; the paper reports the selected
model). FENSE needs two model downloads, so it cannot be the default of a job that must
run offline; aacray's default is `val_loss`: the mean per-pair cross-entropy of every
validation caption against its own clip, the same loss the retrieval ranks by, computed
every epoch anyway, and free of Java and downloads. `t2a_mAP@10` (text-to-audio retrieval
on the validation set: every validation caption against every validation clip) selects
for retrieval directly; `cider_d` and `fense` select for captioning (beam search on every
validation clip, CoNeTTE's defaults). `last` keeps the final epoch.

Only checkpointed epochs can be selected (every `checkpoint_every`, and the last). A
criterion's value is written into the epoch's history row by rank 0 before the
checkpoint, so the choice is a function of the history alone: a resumed run, whose
history comes from its checkpoint, selects what an uninterrupted one selects. Ties go to
the earliest epoch. Pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from aacray.decoder import CaptionDecoder, pad_frames
from aacray.decoding import beam_search
from aacray.embeddings import EmbeddingSet
from aacray.metrics_env import evaluate_captions, fense_problem
from aacray.retrieval import retrieval_metrics, score_block
from aacray.scorer import PairScorer
from aacray.text import WordTokenizer

CRITERIA: dict[str, str | None] = {
    "last": None,
    "val_loss": "min",
    "t2a_mAP@10": "max",
    "cider_d": "max",
    "fense": "max",
}
"""Criterion -> which way is better (None: the last epoch)."""

CAPTION_METRICS = ("cider_d", "fense")
"""Criteria computed from beam-search captions of the validation clips (aac-metrics)."""


@dataclass(frozen=True)
class Selected:
    criterion: str
    epoch: int
    value: float | None

    def record(self, epochs: list[int]) -> dict:
        """metrics.json's `selected`: the epoch and why."""
        mode = CRITERIA[self.criterion]
        why = (
            "the last epoch (select_by=last)"
            if mode is None
            else f"{'lowest' if mode == 'min' else 'highest'} {self.criterion} of the {len(epochs)} "
            f"checkpointed epochs ({epochs[0]}..{epochs[-1]}); ties go to the earliest"
        )
        return {"by": self.criterion, "mode": mode, "epoch": self.epoch, "value": self.value, "why": why}


def is_checkpointed(epoch: int, epochs: int, every: int) -> bool:
    """Whether train_decoder writes a checkpoint after `epoch` (1-based)."""
    return epoch == epochs or epoch % every == 0


def select(history: list[dict], criterion: str, epochs: int, every: int) -> Selected:
    """The selected epoch among the checkpointed rows of `history` (one row per epoch, as
    train_decoder records it). Raises ValueError when a checkpointed row lacks the value."""
    if criterion not in CRITERIA:
        raise ValueError(f"select_by must be one of {list(CRITERIA)}, got {criterion!r}")
    rows = [h for h in history if is_checkpointed(h["epoch"], epochs, every)]
    if not rows:
        raise ValueError("no checkpointed epoch in the history")
    mode = CRITERIA[criterion]
    if mode is None:
        return Selected(criterion, rows[-1]["epoch"], None)
    missing = [h["epoch"] for h in rows if h.get(criterion) is None]
    if missing:
        raise ValueError(f"select_by={criterion}: epochs {missing} have no {criterion} in the history")
    values = np.array([float(h[criterion]) for h in rows])
    best = int(np.argmin(values) if mode == "min" else np.argmax(values))  # first of equals
    return Selected(criterion, rows[best]["epoch"], float(values[best]))


def t2a_map_at_10(model: CaptionDecoder, tok: WordTokenizer, val: EmbeddingSet, val_tokens: Mapping[str, list[list[int]]]) -> float:
    """Text-to-audio mAP@10 of the validation set: every validation caption (a T2A query,
    its own clip relevant) against every validation clip, by the fp32 pair scorer and the
    retrieval rules of score_matrix."""
    audio_ids = [a for a in val.audio_ids if a in val_tokens]
    index = val.index()
    caption_ids, tokens, gt = [], [], {}
    for a in audio_ids:
        for j, t in enumerate(val_tokens[a]):
            caption_ids.append(f"{a}#{j}")
            tokens.append(t)
            gt[caption_ids[-1]] = a
    was_training = model.training
    try:
        scorer = PairScorer(model, tok.pad_id, [val.frames[index[a]] for a in audio_ids])
        L = scorer.loss_matrix(tokens)
    finally:
        model.train(was_training)
    block = score_block(L, audio_ids, caption_ids, k=10)
    return float(retrieval_metrics(block.t2a, block.a2t_raw, block.a2t_minmax, gt)["t2a"]["mAP@10"])


def caption_metric(
    metric: str, model: CaptionDecoder, tok: WordTokenizer, val: EmbeddingSet, references: Mapping[str, list[str]], batch_size: int = 64
) -> float:
    """CIDEr-D or FENSE of beam-search captions of the validation clips against their
    references, through aac-metrics on normalised text (no Java, the same every epoch)."""

    audio_ids = [a for a in val.audio_ids if a in references]
    index = val.index()
    device = next(model.parameters()).device
    candidates: list[str] = []
    for b in range(0, len(audio_ids), batch_size):
        x, mask = pad_frames([val.frames[index[a]] for a in audio_ids[b : b + batch_size]])
        # beam_search's defaults are CoNeTTE's (beam 3, min 3, max 20), as jobs/caption.py uses
        candidates += [g.text for g in beam_search(model, x.to(device), mask.to(device), tok)]
    result = evaluate_captions(candidates, [list(references[a]) for a in audio_ids], [metric], tokenizer="normalize")
    if metric in result.skipped:
        raise RuntimeError(f"select_by={metric}: {result.skipped[metric]}")
    return float(result.scores[metric])


def criterion_value(
    criterion: str,
    model: CaptionDecoder,
    tok: WordTokenizer,
    val: EmbeddingSet,
    val_tokens: Mapping[str, list[list[int]]],
    val_texts: Mapping[str, list[str]],
) -> float | None:
    """The value rank 0 adds to a checkpointed epoch's history row (None for `last` and
    `val_loss`, whose value the history already holds)."""
    with torch.inference_mode():
        if criterion == "t2a_mAP@10":
            return t2a_map_at_10(model, tok, val, val_tokens)
        if criterion in CAPTION_METRICS:
            return caption_metric(criterion, model, tok, val, val_texts)
    return None


def unavailable(criterion: str) -> str | None:
    """Why `criterion` cannot run on this machine (checked before training), else None."""
    if criterion == "fense":
        return fense_problem()
    return None
