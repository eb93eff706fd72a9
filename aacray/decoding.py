"""Batched beam search with the paper's repetition rule (paper 3.3).

Choices worth knowing:
- All audios of a batch are decoded together: the audio memory is computed once per
  audio and repeated for its beams; the decoder reruns over the whole prefix at each
  step (captions are short, at most max_len + 2 tokens, so no key/value cache).
- A hypothesis' score is the sum of the log-probabilities of its generated tokens,
  words and eos (not bos): the caption's log-likelihood under the model's unmasked
  distribution, so it equals -pair_loss * (n_words + 1) for the same caption. The
  masks below only forbid tokens; they never renormalise. No length penalty.
- Masks: pad, bos and unk are never generated; eos is forbidden before `min_len` words
  and forced once a hypothesis holds `max_len` words; with `forbid_repeats`, a word that
  is not in `stopwords` may appear at most once per caption. A hypothesis left with no
  allowed token ends with eos rather than break a rule.
- Beams that emitted eos stay in the beam with a frozen score and compete with the
  live ones; the search stops when every beam of every audio has ended. The result is
  the best-scoring beam per audio. beam_size=1 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from aacray.decoder import CaptionDecoder
from aacray.text import STOPWORDS, WordTokenizer


class Generated(NamedTuple):
    """One decoded caption."""

    text: str
    """The words, space-separated."""
    score: float
    """Sum of log p of the generated words and eos (the caption's log-likelihood)."""
    tokens: list[int]
    """[bos, w1, ..., wn, eos]: ready for `pair_loss` or `WordTokenizer.decode`."""


def content_word_mask(tokenizer: WordTokenizer, stopwords: Iterable[str] = STOPWORDS) -> Tensor:
    """(V,) bool: True for words that may not repeat (not a special, not a stopword)."""
    stop = frozenset(stopwords)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id}
    return torch.tensor(
        [i not in specials and w not in stop for i, w in enumerate(tokenizer.itos)],
        dtype=torch.bool,
    )


def beam_search(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tokenizer: WordTokenizer,
    beam_size: int = 3,
    min_len: int = 0,
    max_len: int = 20,
    forbid_repeats: bool = True,
    stopwords: Iterable[str] = STOPWORDS,
) -> list[Generated]:
    """Caption each audio. frames (B, S, E), frame_pad_mask (B, S) or None -> B results.

    min_len / max_len count words (eos excluded). Runs in eval mode (the model's mode
    is restored afterwards) under torch.inference_mode.
    """
    assert frames.ndim == 3, f"{frames.shape=}"
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"need 0 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if max_len + 1 > model.cfg.max_len:
        raise ValueError(
            f"max_len={max_len} words + bos exceed the decoder's max_len={model.cfg.max_len}"
        )
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {model.vocab_size}")

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _beam_search(
                model,
                frames,
                frame_pad_mask,
                tokenizer,
                beam_size,
                min_len,
                max_len,
                content_word_mask(tokenizer, stopwords) if forbid_repeats else None,
            )
    finally:
        model.train(was_training)


def _beam_search(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tok: WordTokenizer,
    K: int,
    min_len: int,
    max_len: int,
    content: Tensor | None,
) -> list[Generated]:
    device = next(model.parameters()).device
    frames = frames.to(device)
    B, V = frames.shape[0], model.vocab_size
    BK = B * K
    memory = model.encode(frames, None if frame_pad_mask is None else frame_pad_mask.to(device))
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, D)
    mem_mask = (
        None if frame_pad_mask is None else frame_pad_mask.to(device).repeat_interleave(K, dim=0)
    )

    never = torch.zeros(V, dtype=torch.bool, device=device)
    never[[tok.pad_id, tok.bos_id, tok.unk_id]] = True
    if content is not None:
        content = content.to(device)

    seqs = torch.full((BK, 1), tok.bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per audio at the start, so beams do not duplicate
    scores = scores.reshape(BK)
    done = torch.zeros(BK, dtype=torch.bool, device=device)
    used = torch.zeros(BK, V, dtype=torch.bool, device=device)
    neg_inf = torch.tensor(float("-inf"), device=device)

    for n_words in range(max_len + 1):
        logits = model.decode(memory, mem_mask, model.embed_tokens(seqs), None)[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (BK, V), unmasked log-probs
        forbid = never.expand(BK, V).clone()
        if n_words < min_len:
            forbid[:, tok.eos_id] = True
        if n_words >= max_len:
            forbid[:] = True
            forbid[:, tok.eos_id] = False
        if content is not None:
            forbid |= used
        stuck = forbid.all(dim=1)  # nothing allowed: end the caption instead of breaking a rule
        forbid[stuck, tok.eos_id] = False
        cand = logp.masked_fill(forbid, float("-inf"))
        # An ended beam has one continuation, pad, at no cost.
        cand[done] = float("-inf")
        cand[done, tok.pad_id] = 0.0
        cand = (scores[:, None] + cand).reshape(B, K * V)
        top_scores, top_idx = cand.topk(K, dim=1)  # (B, K)
        src = (top_idx // V + torch.arange(B, device=device)[:, None] * K).reshape(BK)
        new_tok = (top_idx % V).reshape(BK)

        seqs = torch.cat([seqs[src], new_tok[:, None]], dim=1)
        scores = top_scores.reshape(BK)
        was_done = done[src]
        done = was_done | (new_tok == tok.eos_id)
        used = used[src]
        if content is not None:
            rows = (~was_done).nonzero(as_tuple=True)[0]
            used[rows, new_tok[rows]] |= content[new_tok[rows]]
        # Beams at -inf cannot win; mark them ended so the loop can stop early.
        done |= torch.isinf(scores)
        if bool(done.all()):
            break

    scores = torch.where(torch.isfinite(scores), scores, neg_inf).reshape(B, K)
    best = scores.argmax(dim=1)
    out = []
    for b in range(B):
        row = b * K + int(best[b])
        ids = seqs[row].tolist()
        end = ids.index(tok.eos_id) + 1 if tok.eos_id in ids else len(ids)
        ids = ids[:end]
        out.append(Generated(tok.decode(ids), float(scores[b, best[b]]), ids))
    return out
