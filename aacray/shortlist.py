"""The shortlist: which audio x caption pairs the cross-entropy re-ranks when the cross
product is too large to score (score_matrix `candidates: shortlist`, or a pairs file). No Ray.

Shapes: N audios, M captions, K candidates per query, P candidate pairs, V vocabulary
(the legend of aacray/scorer.py).

The captioner describes each audio once (its n-best beams, `beam_search_n_best`); then one
of two retrievers proposes, per audio, its K best captions (A2T) and, per caption, its K
best audios (T2A):
- bm25 (`bm25_scores`): BM25 (bm25s, Lucene's formula: k1 1.5, b 0.75) over normalised
  words (`text.words`). A2T: an audio's beams, concatenated, query the caption texts; T2A: a caption
  queries the audios' concatenated beams.
- profile (`word_profiles`, `profile_scores`): the decoder's own word distribution along
  the audio's best caption, p_a(w) (the mean over positions of the next-token softmax), and
  a caption's mean pointwise mutual information with it, mean over the caption's words of
  log p_a(w) - log p(w), p(w) the mean of p_a over the index. One score serves both ways
  (the log p(w) term is constant per caption, so T2A ranks by log p_a alone).
The pairs scored (`candidate_pairs`) are the union of both lists, plus every caption
against a fixed seeded sample of audios (`sample_audios`): a caption's min/max for min-max
A2T run over the sample and its own candidates; with the sample equal to the index they are
exact, and with K >= N and M so is everything else (tests/test_shortlist.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1024  # queries scored at a time: the (Q, D) score matrix never exists whole


def _bm25_index(docs: list[list[str]]):
    import bm25s  # only the shortlist needs it

    index = bm25s.BM25()
    index.index(docs, show_progress=False)
    return index


def _bm25_rows(index, queries: list[list[str]], n_docs: int) -> np.ndarray:
    vocab = index.vocab_dict
    out = np.zeros((len(queries), n_docs), dtype=np.float32)
    for i, q in enumerate(queries):
        known = [w for w in q if w in vocab]
        if known:
            out[i] = index.get_scores(known)
    return out


def bm25_scores(queries: list[list[str]], docs: list[list[str]]) -> np.ndarray:
    """BM25 (bm25s, Lucene's variant, its defaults) of each query against each document:
    (Q, D) float32, higher = better. A query word repeated counts each time; a word no
    document holds scores nothing."""
    return _bm25_rows(_bm25_index(docs), queries, len(docs))


def bm25_top_k(queries: list[list[str]], docs: list[list[str]], k: int) -> np.ndarray:
    """`top_k` of `bm25_scores`, CHUNK queries at a time: (Q, min(k, D)) int64."""
    index = _bm25_index(docs)
    parts = [top_k(_bm25_rows(index, queries[q0 : q0 + CHUNK], len(docs)), k) for q0 in range(0, len(queries), CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, min(k, len(docs))), dtype=np.int64)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, D) scores, higher = better -> (Q, min(k, D)) int64 positions of each row's best,
    ties by the lower position (a total order: the same lists on every machine)."""
    Q, D = scores.shape
    k = min(k, D)
    if k == 0 or Q == 0:
        return np.zeros((Q, k), dtype=np.int64)
    neg = -scores
    if k < D:  # np.partition finds each row's k-th; only what is at or above it is sorted
        kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]
        rows, cols = np.nonzero(neg <= kth)  # >= k a row, boundary ties all kept
    else:
        rows, cols = np.divmod(np.arange(Q * D), D)
    order = np.lexsort((cols, neg[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    first = np.searchsorted(rows, np.arange(Q))
    keep = np.arange(rows.size) - first[rows] < k
    return cols[keep].reshape(Q, k).astype(np.int64)


def word_profiles(model, memory: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]]) -> np.ndarray:
    """The decoder's word distribution along each audio's best caption: memory (B, S, D) (the
    encoded frames), tokens B lists [bos .. eos] -> (B, V) float32 log of the mean, over the
    caption's positions, of the next-token softmax."""
    T = max(len(t) for t in tokens) - 1
    tok = torch.full((len(tokens), T), model.pad_id, dtype=torch.long, device=memory.device)
    for i, t in enumerate(tokens):
        tok[i, : len(t) - 1] = torch.tensor(t[:-1])
    with torch.inference_mode():
        logits = model.decode(memory, mask, model.embed_tokens(tok), tok == model.pad_id).float()
        p = logits.softmax(dim=-1) * (tok != model.pad_id)[..., None]
        mean = p.sum(dim=1) / (tok != model.pad_id).sum(dim=1, keepdim=True)
    return mean.clamp_min(1e-12).log().cpu().numpy()


def _profile_parts(log_p: np.ndarray, captions: list[list[int]], skip: set[int]):
    """(each caption's mean word counts, (M, V) sparse; the profiles' PMI, (N, V) float32)."""
    import scipy.sparse as sp

    V = log_p.shape[1]
    rows, cols = [], []
    for j, t in enumerate(captions):
        kept = [w for w in t if w not in skip]
        rows += [j] * len(kept)
        cols += kept
    count = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(captions), V))
    count = sp.diags(1.0 / np.maximum(np.asarray(count.sum(axis=1)).ravel(), 1)) @ count
    lp = log_p.astype(np.float64)
    pmi = lp - np.log(np.exp(lp).mean(axis=0))
    return count.tocsr(), pmi


def profile_scores(log_p: np.ndarray, captions: list[list[int]], skip: set[int]) -> np.ndarray:
    """log_p (N, V) word profiles, captions M token lists -> (N, M) float32: the mean over a
    caption's tokens (bar those in `skip`: bos, eos, pad) of log p_a(w) - log p(w), with
    p(w) the mean profile of the index. Higher = better."""
    count, pmi = _profile_parts(log_p, captions, skip)
    return np.asarray((count @ pmi.T).T, dtype=np.float32)


def profile_top_k(log_p: np.ndarray, captions: list[list[int]], skip: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` of `profile_scores` both ways, CHUNK rows at a time: (a2t (N, min(k, M))
    caption positions, t2a (M, min(k, N)) audio positions)."""
    count, pmi = _profile_parts(log_p, captions, skip)
    n, m = pmi.shape[0], count.shape[0]
    a2t = [top_k(np.asarray((count @ pmi[a0 : a0 + CHUNK].T).T, np.float32), k) for a0 in range(0, n, CHUNK)]
    t2a = [top_k(np.asarray(count[c0 : c0 + CHUNK] @ pmi.T, np.float32), k) for c0 in range(0, m, CHUNK)]
    return np.concatenate(a2t), np.concatenate(t2a)


def sample_audios(n: int, size: int, seed: int, include: list[int] | None = None) -> np.ndarray:
    """A fixed seeded sample of `size` of n audio positions (all when size >= n), plus
    `include`: sorted int64, no repeats."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    drawn = np.random.default_rng(seed).choice(n, size=size, replace=False)
    return np.unique(np.concatenate([drawn, np.asarray(include or [], dtype=np.int64)]))


@dataclass
class Candidates:
    """The pairs to score, per caption: caption j's audios are audio[start[j]:start[j + 1]]
    (sorted positions, no repeats); a2t (N, K) / t2a (M, K) the retriever's own lists (None
    for a pairs file), kept for the shortlist's figures."""

    start: np.ndarray  # (M + 1,) int64
    audio: np.ndarray  # (P,) int64
    a2t: np.ndarray | None
    t2a: np.ndarray | None
    sample: np.ndarray

    @property
    def n_pairs(self) -> int:
        return int(self.audio.size)

    @property
    def per_caption(self) -> np.ndarray:
        """(M,) int64: how many audios each caption is scored against."""
        return np.diff(self.start)

    def of(self, j: int) -> np.ndarray:
        return self.audio[self.start[j] : self.start[j + 1]]


def candidate_pairs(n_audios: int, n_captions: int, pairs: tuple[np.ndarray, np.ndarray], sample: np.ndarray,
                    a2t: np.ndarray | None = None, t2a: np.ndarray | None = None) -> Candidates:
    """The union of listed (audio, caption) positions `pairs`, the retriever's lists a2t
    (N, K) of caption positions and t2a (M, K) of audio positions, and every caption x
    `sample` -> Candidates (duplicates once)."""
    a = [np.asarray(pairs[0], np.int64), np.repeat(sample, n_captions)]
    c = [np.asarray(pairs[1], np.int64), np.tile(np.arange(n_captions, dtype=np.int64), sample.size)]
    if a2t is not None:
        a.append(np.repeat(np.arange(n_audios, dtype=np.int64), a2t.shape[1]))
        c.append(a2t.reshape(-1))
    if t2a is not None:
        a.append(t2a.reshape(-1))
        c.append(np.repeat(np.arange(n_captions, dtype=np.int64), t2a.shape[1]))
    key = np.unique(np.concatenate(c) * n_audios + np.concatenate(a))
    cap, aud = np.divmod(key, n_audios)
    start = np.searchsorted(cap, np.arange(n_captions + 1))
    return Candidates(start.astype(np.int64), aud.astype(np.int64), a2t, t2a, sample)


def shortlist_figures(cands: Candidates, gt_audio: np.ndarray, n_audios: int) -> dict:
    """The shortlist's own figures. gt_audio (M,): each caption's audio position, -1 for
    none. Recall of the ground truth in the retriever's lists (T2A: the caption's audio among
    its K; A2T: at least one of the audio's captions among its K, and the share of true pairs
    there) and in the pairs scored; pairs scored as a share of N x M."""
    M = cands.start.size - 1
    has = np.flatnonzero(gt_audio >= 0)
    out: dict = {"pairs": cands.n_pairs, "share_of_all_pairs": round(cands.n_pairs / max(n_audios * M, 1), 5),
                 "minmax_sample": int(cands.sample.size), "minmax_exact": bool(cands.sample.size == n_audios)}
    if not has.size:
        return out
    scored = np.array([gt_audio[j] in set(cands.of(j).tolist()) for j in has])
    out["gt_pairs_scored"] = round(float(scored.mean()), 5)
    if cands.t2a is not None:
        out["t2a_gt_in_list"] = round(float((cands.t2a[has] == gt_audio[has, None]).any(axis=1).mean()), 5)
    if cands.a2t is not None:
        in_list = np.zeros(has.size, dtype=bool)
        listed = {(int(a), int(j)) for a in range(cands.a2t.shape[0]) for j in cands.a2t[a]}
        in_list[:] = [(int(gt_audio[j]), int(j)) in listed for j in has]
        audios = np.unique(gt_audio[has])
        hit = {int(gt_audio[j]) for j, ok in zip(has, in_list, strict=True) if ok}
        out["a2t_gt_in_list"] = round(len(hit) / audios.size, 5)
        out["a2t_gt_pairs_in_list"] = round(float(in_list.mean()), 5)
    return out
