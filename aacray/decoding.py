"""Batched beam search with the paper's repetition rule (paper 3.3), as the authors run it.

It follows conette 0.3.2's `generate` (tests/test_conette_parity.py compares the two on the
same weights); the defaults are CoNeTTE's: beam 3, at least 3 words, at most 20 tokens.
Choices worth knowing:
- Masks act on the logits, before the log-softmax, so the allowed tokens renormalise: eos
  is forbidden for the first `min_len` tokens; with `forbid_repeats`, a token already in
  the hypothesis (bos included) may not come again unless it is a stopword (conette's
  "content words" mask: every token but the stopwords, specials included); with
  `ban_specials` (aacray's addition), pad, bos, unk and the task tokens of a CoNeTTE
  vocabulary (`WordTokenizer.special_ids`) are never generated. conette can emit them; a trained model gives them almost no probability, and `ban_specials=False`
  is conette's search exactly. If every token is forbidden, eos is allowed (conette would
  get NaN).
- Each audio has `beam_size` slots. Hypotheses are ranked by their summed log-probs; at
  the first step only one beam is expanded, so the beams start with distinct words. A
  hypothesis that emits eos, or reaches `max_len` tokens (then without eos), leaves the
  beam with its score: the audio goes on with one beam fewer, and ends with beam_size
  finished hypotheses. A hypothesis' score is its mean log-prob per generated token
  (words and eos, not bos) under the masked distribution; the best mean wins (the first
  slot on ties), no other length penalty. `beam_search` returns that best one per audio;
  `beam_search_n_best` every finished hypothesis, best first (the shortlist's
  descriptions, aacray/shortlist.py). Without masks at work (no repeat forbidden, eos
  not forbidden, no special banned) the score is -pair_loss of its tokens.
- The new hypotheses of an audio fill its live slots in slot order, as conette's do.
- All audios of a batch are decoded together: the audio memory and its cross-attention
  keys/values are computed once per audio and repeated for its beams; each step runs the
  decoder on the new position of the live hypotheses only (`FastDecoder.step`, fp32, the
  module's maths), with every earlier position's self-attention keys/values cached, and a
  hypothesis' cache follows it when the beams are reassigned.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from aacray.decoder import CaptionDecoder
from aacray.scorer import FastDecoder
from aacray.text import WordTokenizer


class Generated(NamedTuple):
    """One decoded caption."""

    text: str
    """The words, space-separated."""
    score: float
    """Mean log p per generated token (words and eos) under the masked distribution."""
    tokens: list[int]
    """[bos, w1, ..., wn, eos], or [bos, w1, ..., w_max_len] when cut at max_len; ready
    for `pair_loss` or `WordTokenizer.decode`."""


def content_word_mask(tokenizer: WordTokenizer, stopwords: Iterable[str] | None = None) -> Tensor:
    """(V,) bool: True for tokens that may not repeat: all but the stopwords (as conette).
    stopwords None: the tokenizer's own (NLTK's list; a CoNeTTE folder's, from its mask)."""
    stop = tokenizer.stopwords if stopwords is None else frozenset(stopwords)
    return torch.tensor([w not in stop for w in tokenizer.itos], dtype=torch.bool)


def beam_search_n_best(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tokenizer: WordTokenizer,
    beam_size: int = 3,
    min_len: int = 3,
    max_len: int = 20,
    forbid_repeats: bool = True,
    stopwords: Iterable[str] | None = None,
    ban_specials: bool = True,
) -> list[list[Generated]]:
    """Caption each audio, keeping every finished beam: frames (B, S, E), frame_pad_mask
    (B, S) or None -> B lists of up to beam_size results, best (highest mean log p) first.

    min_len: eos is forbidden for the first min_len tokens (at least min_len words);
    max_len: most generated tokens, eos included. stopwords: the words that may repeat
    (None: the tokenizer's, `content_word_mask`). Runs in eval mode (the model's mode is
    restored afterwards) under torch.inference_mode.
    """
    assert frames.ndim == 3, f"{frames.shape=}"
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 0 <= min_len <= max_len or max_len < 1:
        raise ValueError(
            f"need 0 <= min_len <= max_len and max_len >= 1, got min_len={min_len}, max_len={max_len}"
        )
    if max_len > model.cfg.max_len:
        raise ValueError(
            f"max_len={max_len} tokens need {max_len} input positions (bos + {max_len - 1}), "
            f"more than the decoder's max_len={model.cfg.max_len}"
        )
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {model.vocab_size}")

    banned = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    if ban_specials:
        banned[list(tokenizer.special_ids)] = True
    rules = _Rules(
        tokenizer.eos_id,
        min_len,
        content_word_mask(tokenizer, stopwords) if forbid_repeats else None,
        banned,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _beam_search(model, frames, frame_pad_mask, tokenizer, beam_size, max_len, rules)
    finally:
        model.train(was_training)


@functools.wraps(beam_search_n_best, assigned=())  # its signature (inspect follows __wrapped__)
def beam_search(*args, **kwargs) -> list[Generated]:
    """Caption each audio: the best beam of `beam_search_n_best` (same arguments), B results."""
    return [b[0] for b in beam_search_n_best(*args, **kwargs)]


class _Rules(NamedTuple):
    eos_id: int
    min_len: int
    repeat_mask: Tensor | None
    banned: Tensor

    def mask(self, logits: Tensor, prefix: Tensor, step: int) -> Tensor:
        """-inf on the forbidden tokens of each row. logits (R, V), prefix (R, step + 1)."""
        forbid = self.banned.to(logits.device).expand_as(logits).clone()
        if step < self.min_len:
            forbid[:, self.eos_id] = True
        if self.repeat_mask is not None:
            seen = torch.zeros_like(forbid).scatter_(1, prefix, True)
            forbid |= seen & self.repeat_mask.to(logits.device)
        forbid[forbid.all(dim=1), self.eos_id] = False  # stuck: end rather than break a rule
        return logits.masked_fill(forbid, float("-inf"))


def _beam_search(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tok: WordTokenizer,
    K: int,
    max_len: int,
    rules: _Rules,
) -> list[list[Generated]]:
    """Every audio's finished beams, best (highest mean log p) first."""
    device = next(model.parameters()).device
    frames = frames.to(device)
    mask = None if frame_pad_mask is None else frame_pad_mask.to(device)
    B, V = frames.shape[0], model.vocab_size
    fast = FastDecoder(model)  # fp32: the module's maths, a position at a time
    kv = [(k.repeat_interleave(K, dim=0), v.repeat_interleave(K, dim=0)) for k, v in fast.audio_kv(model.encode(frames, mask))]
    mask = fast.memory_mask(None if mask is None else mask.repeat_interleave(K, dim=0))  # (B*K, 1, 1, S)
    cache = fast.self_attn_cache(B * K, max_len)

    seqs = torch.full((B * K, max_len + 1), tok.pad_id, dtype=torch.long, device=device)
    seqs[:, 0] = tok.bos_id
    sums = torch.zeros(B * K, device=device)
    live = torch.ones(B * K, dtype=torch.bool, device=device)
    means = torch.full((B * K,), float("-inf"), device=device)
    lengths = torch.zeros(B * K, dtype=torch.long, device=device)
    first_slot = torch.arange(B * K, device=device) % K == 0

    for step in range(max_len):
        rows = live.nonzero(as_tuple=True)[0]
        prefix = seqs[rows, : step + 1]
        hidden = fast.step(model.embed_tokens(prefix)[:, -1:], step, rows, cache, kv, mask)
        logits = fast.classifier(hidden).float()
        logp = torch.full((B * K, V), float("-inf"), device=device)
        logp[rows] = rules.mask(logits, prefix, step).log_softmax(dim=-1)
        cand = sums[:, None] + logp
        if step == 0:  # every slot holds the same bos: expand one
            cand[~first_slot] = float("-inf")
        top_val, top_idx = cand.reshape(B, K * V).topk(K, dim=1)
        dest, src, new_tok, new_sum = _assign(top_val, top_idx, live.reshape(B, K), V)

        seqs[dest] = seqs[src]
        seqs[dest, step + 1] = new_tok
        fast.move_cache(cache, dest, src, step + 1)
        sums[dest] = new_sum
        ended = dest[(new_tok == tok.eos_id) | (step == max_len - 1)]
        means[ended] = sums[ended] / (step + 1)
        lengths[ended] = step + 2  # bos + generated tokens
        live[ended] = False
        if not bool(live.any()):
            break

    # best first; a stable sort keeps the first of equal means first (argmax's choice)
    order = torch.argsort(-means.reshape(B, K), dim=1, stable=True) + torch.arange(B, device=device)[:, None] * K
    out = []
    for rows_b in order.tolist():
        beams = [r for r in rows_b if means[r] > float("-inf")]
        out.append([Generated(tok.decode(ids), float(means[r]), ids) for r in beams
                    for ids in [seqs[r, : int(lengths[r])].tolist()]])
    return out


def _assign(
    top_val: Tensor, top_idx: Tensor, live: Tensor, V: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The n_b best candidates of audio b go, best first, to its n_b live slots in slot
    order. top_* (B, K) sorted best first, live (B, K). -> dest rows, source rows, tokens,
    summed log-probs (each (N,), N = number of live slots)."""
    B, K = live.shape
    base = torch.arange(B, device=live.device)[:, None] * K
    used = torch.arange(K, device=live.device)[None, :] < live.sum(dim=1, keepdim=True)
    slots = torch.argsort((~live).to(torch.int8), dim=1, stable=True)  # live slots first
    dest = (slots + base)[used]
    src = (top_idx // V + base)[used]
    return dest, src, (top_idx % V)[used], top_val[used]
