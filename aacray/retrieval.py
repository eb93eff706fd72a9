"""Retrieval from captioning losses: ranking rules, streaming top-k, Recall@k, mAP@10 and
the DCASE task 6b submission file.

Every audio x caption pair has a loss L[a, c], lower = better match (DESIGN.md "Retrieval
rules"). Shapes: N audios of the index, M captions, m captions of one block, Q queries, C
candidates per query, R candidate rows, K top-k depth (the legend of aacray/scorer.py, plus
the ranking's own letters).

- T2A, caption c: audios by ascending L[:, c], then audio id.
- A2T raw, audio a: captions by ascending L[a, :], then caption id.
- A2T min-max: s(a, c) = (L[a, c] - min_c) / (max_c - min_c), min/max over all N audios
  (s = 0 where max_c == min_c); captions by s, then raw loss, then caption id. The scaling
  is `minmax_scale`, the only place it is written (refinement, plots and reindex call it).
- A2T min-max, the authors' code (`minmax_ties="authors"`, `authors_tie_order`): the same
  s, but the captions tied at an audio's smallest s are re-ordered as conette's
  `retrieve.scale_losses` does (an argsort output used as ranks); other ties as above.
- mAP@10 (`map_at_k`): one formula for T2A (one relevant audio) and A2T (every caption of
  the audio relevant), as LAION-CLAP and WavCaps report it.

Non-obvious choices:
- One total order serves all three: (score, loss, candidate id) ascending, where score is
  the loss itself for T2A and raw A2T. Ids are strings compared by code point, which is
  Python's `<` and numpy's order for unicode arrays; internally an id becomes its rank in
  the sorted id array so that a single integer `np.lexsort` key breaks ties.
- Because the order is total, the top-K of a union equals the top-K of the union of
  each part's top-K. So lists computed on blocks merge exactly, in any order and grouping
  (`topk_merge`), and the full matrix never has to exist at once.
- A scoring block is all N audios x m captions: its per-caption min/max are complete, so
  its T2A lists and min-max scores are final; its A2T lists are per-audio candidates to
  merge across blocks. Min and max are associative (`merge_caption_stats`).
- Adding audios moves min_c/max_c, which changes min-max scores of pairs already scored:
  stored min-max A2T lists cannot be merged then; recompute them from the stored losses
  with the merged stats (`topk_a2t_minmax(..., loss_min=, loss_max=)`). T2A and raw A2T
  lists merge directly.
- Scores and losses come out as float64, an exact widening of float32 losses, so the
  blocked and the dense paths agree bit for bit.
- Fast path (`topk_*`): `np.partition` finds each query's K-th smallest score; every
  candidate at or below it (boundary ties included) goes to one `np.lexsort`. The
  `rank_*` functions fully sort every query and are the dense reference.
- The authors' rule needs every caption tied at an audio's minimum, which can be more than
  K: its candidate lists keep those too (`keep_min_ties`), which stays exact under merging
  (the union's ties at its minimum are the parts' ties at that value), and one final
  `authors_tie_order` re-orders them and cuts to K.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("t2a", "a2t_raw", "a2t_minmax")
T2A_COLUMNS = ("caption_id", "rank", "audio_id", "loss")
A2T_COLUMNS = ("audio_id", "rank", "caption_id", "score", "loss")
CAPTION_STATS_COLUMNS = ("caption_id", "loss_min", "loss_max", "n_audios")
RECALL_KS = (1, 5, 10)
MINMAX_TIES = ("paper", "authors")
"""Min-max A2T tie rules: the paper's (s, loss, id), or the authors' code (`authors_tie_order`)."""
AUTHORS_TIE_STEP = 1e-5  # conette's EPSILON in retrieve.scale_losses
DCASE_TOP_N = 10
DCASE_HEADER = ("caption", *(f"fname_{i}" for i in range(1, DCASE_TOP_N + 1)))
"""The DCASE language-based audio retrieval submission's columns (task 6b, 2022-2024)."""
MAP_DEPTH = 10
# Metrics need each list this deep (or the full ranking when there are fewer candidates).
METRICS_MIN_K = max(max(RECALL_KS), MAP_DEPTH)


# ----------------------------------------------------------------------------- validation


def _as_ids(ids: Any, name: str) -> np.ndarray:
    """Any 1-D sequence of str (list, numpy, pyarrow column) -> numpy unicode array."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {arr.shape=}")
    if arr.size == 0:
        return np.empty(0, dtype="U1")
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.tolist()):
        return arr.astype(str)
    raise TypeError(f"{name} must hold str ids, got dtype {arr.dtype}")


def _as_unique_ids(ids: Any, name: str) -> np.ndarray:
    arr = _as_ids(ids, name)
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} holds duplicate ids")
    return arr


def _as_losses(L: Any, audio_ids: Any, caption_ids: Any):
    a_ids = _as_unique_ids(audio_ids, "audio_ids")
    c_ids = _as_unique_ids(caption_ids, "caption_ids")
    arr = np.asarray(L)
    if arr.ndim != 2 or arr.shape != (a_ids.size, c_ids.size):
        raise ValueError(
            f"L must be (N audios, M captions) = {(a_ids.size, c_ids.size)}, got {arr.shape=}"
        )
    if arr.dtype.kind != "f":
        raise TypeError(f"L must be floating point, got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("L holds NaN or inf losses")
    return arr.astype(np.float64), a_ids, c_ids


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _id_rank(ids: np.ndarray) -> np.ndarray:
    """(n,) unique ids -> (n,) int64 position of each id in sorted (code point) order."""
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(ids.size)
    return rank


# ----------------------------------------------------------------------------- top-k tables


@dataclass(frozen=True, eq=False)
class TopK:
    """Top-K candidates per query, one row per (query, rank), rows sorted by query id then rank.

    kind: "t2a" (query caption, candidate audio), "a2t_raw" or "a2t_minmax" (query audio,
    candidate caption). Fields, all (R,): query_id str, rank int32 starting at 1, cand_id str,
    score float64 (the sort key: loss for t2a / a2t_raw, min-max score for a2t_minmax) and
    loss float64 (raw loss, second key). `columns()` gives the Parquet data contract.
    """

    kind: str
    query_id: np.ndarray
    rank: np.ndarray
    cand_id: np.ndarray
    score: np.ndarray
    loss: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        sizes = {len(x) for x in (self.query_id, self.rank, self.cand_id, self.score, self.loss)}
        if len(sizes) != 1:
            raise ValueError(f"TopK fields differ in length: {sizes}")

    def __len__(self) -> int:
        return len(self.rank)

    @property
    def query_column(self) -> str:
        return "caption_id" if self.kind == "t2a" else "audio_id"

    @property
    def cand_column(self) -> str:
        return "audio_id" if self.kind == "t2a" else "caption_id"

    def columns(self) -> dict[str, np.ndarray]:
        """Contract columns: t2a -> caption_id, rank, audio_id, loss; a2t_* -> audio_id, rank,
        caption_id, score, loss (score == loss for a2t_raw). Feed to `pyarrow.table(...)`."""
        cols = {
            self.query_column: self.query_id,
            "rank": self.rank,
            self.cand_column: self.cand_id,
            "score": self.score,
            "loss": self.loss,
        }
        if self.kind == "t2a":
            del cols["score"]
        return cols

    @classmethod
    def from_columns(cls, table: Any, kind: str) -> TopK:
        """Inverse of `columns()`: table is anything indexable by column name (dict of arrays,
        pyarrow.Table, pandas.DataFrame). Rows are taken as given (ranks are not recomputed)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        q, c = ("caption_id", "audio_id") if kind == "t2a" else ("audio_id", "caption_id")
        loss = np.asarray(table["loss"], dtype=np.float64)
        score = loss if kind == "t2a" else np.asarray(table["score"], dtype=np.float64)
        return cls(
            kind,
            _as_ids(table[q], q),
            np.asarray(table["rank"], dtype=np.int32),
            _as_ids(table[c], c),
            score,
            loss,
        )

    def lists(self) -> dict[str, list[str]]:
        """{query id: candidate ids in rank order}; handy in tests and notebooks."""
        out: dict[str, list[str]] = defaultdict(list)
        order = np.lexsort((self.rank, self.query_id))
        for q, c in zip(self.query_id[order].tolist(), self.cand_id[order].tolist(), strict=True):
            out[q].append(c)
        return dict(out)


def _sort_rows(q: np.ndarray, primary: np.ndarray, secondary: np.ndarray, cand: np.ndarray):
    """(R,) keys -> row order by (q, primary, secondary, cand) ascending. cand holds integer
    keys, or str ids: then only rows tied on the first three keys get their ids ranked,
    which spares sorting a million strings when ties are rare."""
    if cand.dtype.kind != "U":
        return np.lexsort((cand, secondary, primary, q))
    order = np.lexsort((secondary, primary, q))
    qs, ps, ss = q[order], primary[order], secondary[order]
    same = (qs[1:] == qs[:-1]) & (ps[1:] == ps[:-1]) & (ss[1:] == ss[:-1])
    if not same.any():
        return order
    tied = np.zeros(order.size, dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    key = np.zeros(order.size, dtype=np.int64)
    key[tied] = np.unique(cand[order[tied]], return_inverse=True)[1]
    return order[np.lexsort((key, ss, ps, qs))]


def _group_pos(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R,) sorted query keys -> (position of each row within its query's run, 0-based;
    index of that run's first row), both (R,) int64."""
    new_group = np.ones(qs.size, dtype=bool)
    new_group[1:] = qs[1:] != qs[:-1]
    starts = np.flatnonzero(new_group)
    first = np.repeat(starts, np.diff(np.append(starts, qs.size)))
    return np.arange(qs.size) - first, first


def _select(q: np.ndarray, primary: np.ndarray, secondary: np.ndarray, cand: np.ndarray, k: int,
            keep_min_ties: bool = False):
    """Rows (R,) of integer query keys, float keys and candidate keys (int or str) -> (indices
    of the kept rows ordered by query then rank, their 1-based int32 ranks), <= k per query;
    keep_min_ties: also every row whose primary key equals its query's smallest."""
    order = _sort_rows(q, primary, secondary, cand)
    qs = q[order]
    if qs.size == 0:
        return order, np.empty(0, dtype=np.int32)
    pos, first = _group_pos(qs)
    keep = pos < k
    if keep_min_ties:  # the smallest primary key of a query is its first row's
        ps = primary[order]
        keep |= ps == ps[first]
    return order[keep], (pos[keep] + 1).astype(np.int32)


def topk_select(
    query_ids: Any, cand_ids: Any, score: Any, loss: Any, k: int, kind: str, keep_min_ties: bool = False
) -> TopK:
    """Flat candidate rows, all (R,): query_ids, cand_ids (str), score, loss (float) ->
    TopK of the K best candidates per query by (score, loss, cand id) ascending.
    keep_min_ties: also keep every row tied at its query's smallest score (the candidates
    `authors_tie_order` needs; their ranks run past K when more than K tie).

    For t2a / a2t_raw pass score = loss. A (query, candidate) pair kept twice raises
    ValueError (a block scored twice); 10k queries x 100 candidates take well under a second.
    """
    k = _check_k(k)
    q_ids, c_ids = _as_ids(query_ids, "query_ids"), _as_ids(cand_ids, "cand_ids")
    score = np.asarray(score, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if not (q_ids.shape == c_ids.shape == score.shape == loss.shape):
        raise ValueError(f"rows differ: {q_ids.shape=} {c_ids.shape=} {score.shape=} {loss.shape=}")
    if kind in ("t2a", "a2t_raw") and not np.array_equal(score, loss):
        raise ValueError(f"{kind}: score must equal loss")
    q = np.unique(q_ids, return_inverse=True)[1].astype(np.int64)
    idx, rank = _select(q, score, loss, c_ids, k, keep_min_ties)
    uc, c = np.unique(c_ids[idx], return_inverse=True)
    pair = np.sort(q[idx] * max(uc.size, 1) + c)
    if (pair[1:] == pair[:-1]).any():
        raise ValueError("a (query, candidate) pair occurs twice: was one block scored twice?")
    return TopK(kind, q_ids[idx], rank, c_ids[idx], score[idx], loss[idx])


def topk_merge(parts: Iterable[TopK | Any], k: int, kind: str | None = None, keep_min_ties: bool = False) -> TopK:
    """Merge top-K tables of disjoint candidate sets (e.g. caption blocks for A2T, audio
    blocks for T2A) into the top-K of their union: exact, as the order is total.

    parts: TopK objects or contract tables (then `kind` is required). Queries may differ
    between parts (a query missing from a part simply has no candidates there).
    keep_min_ties (parts made with it too): also exact, as the rows tied at a query's
    smallest score over the union are the parts' rows tied at that score.
    """
    tables = [p if isinstance(p, TopK) else TopK.from_columns(p, _need_kind(kind)) for p in parts]
    kinds = {t.kind for t in tables} | ({kind} if kind else set())
    if len(kinds) != 1:
        raise ValueError(f"cannot merge top-k tables of kinds {sorted(kinds)}")
    (merged_kind,) = kinds
    if not tables:
        return _empty_topk(merged_kind)
    cat = {
        f: np.concatenate([getattr(t, f) for t in tables])
        for f in ("query_id", "cand_id", "score", "loss")
    }
    return topk_select(cat["query_id"], cat["cand_id"], cat["score"], cat["loss"], k, merged_kind, keep_min_ties)


def _need_kind(kind: str | None) -> str:
    if kind is None:
        raise ValueError("kind is required to read a top-k table from columns")
    return kind


def _empty_topk(kind: str) -> TopK:
    ids, vals = np.empty(0, dtype="U1"), np.empty(0, dtype=np.float64)
    return TopK(kind, ids, np.empty(0, dtype=np.int32), ids, vals, vals)


# ----------------------------------------------------------------------------- dense matrices


def minmax_scale(L: Any, loss_min: Any, loss_max: Any) -> np.ndarray:
    """The min-max rule, the one place it is written: losses L and per-caption loss_min /
    loss_max over ALL audios of the index -> float64 s = (L - min) / (max - min), and 0
    where max == min (a caption every audio scores alike says nothing about any of them).

    Shapes: L (N, M) with stats (M,) (a matrix), L (M,) with stats (M,) (one audio's row), or
    flat rows L (R,) with stats (R,) (each row's own caption stats): the stats broadcast
    against L's last axis. Computed elementwise, so any layout of the same pairs gives the
    same bits."""
    L = np.asarray(L, dtype=np.float64)
    mn = np.asarray(loss_min, dtype=np.float64)
    mx = np.asarray(loss_max, dtype=np.float64)
    assert L.ndim >= 1 and mn.shape == mx.shape == L.shape[-1:], f"{L.shape=} {mn.shape=} {mx.shape=}"
    span = mx - mn
    out = np.zeros(L.shape, dtype=np.float64)
    np.divide(L - mn, span, out=out, where=np.broadcast_to(span > 0, L.shape))
    return out


def _minmax_scores(L: np.ndarray, loss_min: Any, loss_max: Any) -> np.ndarray:
    if (loss_min is None) != (loss_max is None):
        raise ValueError("give both loss_min and loss_max, or neither")
    if loss_min is None:
        if L.shape[0] == 0:
            raise ValueError("min-max scaling needs at least one audio")
        loss_min, loss_max = L.min(axis=0), L.max(axis=0)
    mn = np.asarray(loss_min, dtype=np.float64)
    mx = np.asarray(loss_max, dtype=np.float64)
    if mn.shape != (L.shape[1],) or mx.shape != (L.shape[1],):
        raise ValueError(
            f"loss_min / loss_max must be (M,) = ({L.shape[1]},), got {mn.shape}, {mx.shape}"
        )
    if L.size and ((L < mn).any() or (L > mx).any()):
        raise ValueError("losses fall outside [loss_min, loss_max]: stats do not cover this block")
    return minmax_scale(L, mn, mx)


def _dense_topk(kind, P, S, q_ids, c_ids, k, keep_min_ties: bool = False) -> TopK:
    """P primary, S secondary keys (Q, C); q_ids (Q,), c_ids (C,) -> TopK (fast path).
    The rows at or below the K-th smallest P hold every row tied at a query's minimum."""
    k = _check_k(k)
    n_q, n_c = P.shape
    if k < n_c:
        kth = np.partition(P, k - 1, axis=1)[:, k - 1 : k]
        rows, cols = np.nonzero(P <= kth)  # >= k per query; boundary ties all kept
    else:
        rows, cols = np.divmod(np.arange(n_q * n_c), n_c)
    p, s = P[rows, cols], S[rows, cols]
    idx, rank = _select(_id_rank(q_ids)[rows], p, s, _id_rank(c_ids)[cols], k, keep_min_ties)
    return TopK(kind, q_ids[rows[idx]], rank, c_ids[cols[idx]], p[idx], s[idx])


def _dense_reference(kind, P, S, q_ids, c_ids, k) -> TopK:
    """Same contract as `_dense_topk`, by a full sort of every query."""
    k = _check_k(k)
    n_q, n_c = P.shape
    c_rank = np.broadcast_to(_id_rank(c_ids), P.shape)
    order = np.lexsort((c_rank, S, P), axis=1)[:, :k]  # (Q, min(K, C))
    q_order = np.argsort(q_ids, kind="stable")
    depth = order.shape[1]
    rows = np.repeat(q_order, depth)
    cols = order[q_order].ravel()
    rank = np.tile(np.arange(1, depth + 1, dtype=np.int32), n_q)
    return TopK(kind, q_ids[rows], rank, c_ids[cols], P[rows, cols], S[rows, cols])


def rank_t2a(L: Any, audio_ids: Any, caption_ids: Any, k: int) -> TopK:
    """Reference T2A. L (N, M) over all N audios; ids (N,), (M,) -> TopK per caption of
    audios by (loss, audio id). Full sort: for small matrices and tests."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    return _dense_reference("t2a", L.T, L.T, c_ids, a_ids, k)


def rank_a2t_raw(L: Any, audio_ids: Any, caption_ids: Any, k: int) -> TopK:
    """Reference raw A2T. L (N, M) -> TopK per audio of captions by (loss, caption id)."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    return _dense_reference("a2t_raw", L, L, a_ids, c_ids, k)


def rank_a2t_minmax(
    L: Any, audio_ids: Any, caption_ids: Any, k: int, loss_min: Any = None, loss_max: Any = None
) -> TopK:
    """Reference min-max A2T. L (N, M); loss_min / loss_max (M,) over ALL audios of the index
    (default: over the N rows of L) -> TopK per audio by (s, loss, caption id)."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    return _dense_reference("a2t_minmax", _minmax_scores(L, loss_min, loss_max), L, a_ids, c_ids, k)


def topk_t2a(L: Any, audio_ids: Any, caption_ids: Any, k: int) -> TopK:
    """T2A of one block. L (N, m): ALL N audios x the block's m captions -> final TopK per
    caption. With only a subset of audios (reindex), the lists merge with `topk_merge`."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    return _dense_topk("t2a", L.T, L.T, c_ids, a_ids, k)


def topk_a2t_raw(L: Any, audio_ids: Any, caption_ids: Any, k: int) -> TopK:
    """Raw A2T candidates of one block. L (N, m) -> TopK per audio over the block's captions;
    merge over caption blocks with `topk_merge`."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    return _dense_topk("a2t_raw", L, L, a_ids, c_ids, k)


def topk_a2t_minmax(
    L: Any, audio_ids: Any, caption_ids: Any, k: int, loss_min: Any = None, loss_max: Any = None,
    keep_min_ties: bool = False,
) -> TopK:
    """Min-max A2T candidates of one block. L (N, m); loss_min / loss_max (m,) per caption
    over ALL audios of the index, computed from L when omitted (L holds all audios) -> TopK per
    audio over the block's captions; merge over caption blocks with `topk_merge` (with the
    same keep_min_ties: see `topk_select`)."""
    L, a_ids, c_ids = _as_losses(L, audio_ids, caption_ids)
    S = _minmax_scores(L, loss_min, loss_max)
    return _dense_topk("a2t_minmax", S, L, a_ids, c_ids, k, keep_min_ties)


# ----------------------------------------------------------------------------- the authors' tie rule


def check_minmax_ties(minmax_ties: str) -> str:
    if minmax_ties not in MINMAX_TIES:
        raise ValueError(f"minmax_ties must be one of {MINMAX_TIES}, got {minmax_ties!r}")
    return minmax_ties


def authors_tie_order(cands: TopK, k: int) -> TopK:
    """Min-max A2T candidates holding, per audio, its top K by (s, loss, caption id) and
    every caption tied at its smallest s (`topk_a2t_minmax(..., keep_min_ties=True)`, merged
    with `topk_merge(..., keep_min_ties=True)`) -> the final top-K under the authors' rule
    (ScoreConfig.minmax_ties "authors", conette's `retrieve.scale_losses`).

    Per audio, the tie set T (its captions at the smallest s, n of them, in column order =
    ascending caption id) gets the scores min + (p - n) * 1e-5, where p = argsort of T's raw
    losses (stable: equal losses keep caption id order) is used as if it held ranks. So the
    caption in column j of T lands at position p[j] of T, which is its loss rank only when
    n <= 2. Those scores are distinct and below every other caption's; the rest of the list
    keeps the paper's (s, loss, caption id) order. The `score` column then holds these
    adjusted scores (the authors' sort key)."""
    k = _check_k(k)
    if cands.kind != "a2t_minmax":
        raise ValueError(f"the authors' tie rule re-orders a2t_minmax lists, got {cands.kind}")
    if len(cands) == 0:
        return cands
    q = np.unique(cands.query_id, return_inverse=True)[1]
    row_min = np.full(int(q.max()) + 1, np.inf)
    np.minimum.at(row_min, q, cands.score)
    tied = np.flatnonzero(cands.score == row_min[q])
    tq = q[tied]
    cand_key = np.unique(cands.cand_id[tied], return_inverse=True)[1]  # code point order
    by_id = tied[np.lexsort((cand_key, tq))]  # T of each audio in column order
    by_loss = tied[np.lexsort((cand_key, cands.loss[tied], tq))]  # T by stable loss argsort
    pos, _ = _group_pos(q[by_id])
    n = np.bincount(q[by_id])[q[by_id]]
    column = np.empty(cands.score.size, dtype=np.int64)
    column[by_id] = pos
    # the j-th caption of T in column order gets argsort(losses)[j], i.e. by_loss's j-th column
    score = cands.score.copy()
    score[by_id] = row_min[q[by_id]] + (column[by_loss] - n) * AUTHORS_TIE_STEP
    return topk_select(cands.query_id, cands.cand_id, score, cands.loss, k, "a2t_minmax")


# ----------------------------------------------------------------------------- caption stats


@dataclass(frozen=True, eq=False)
class CaptionStats:
    """Per caption, all (M,): caption_id str, loss_min / loss_max float64, n_audios int64
    (how many audios the min and max run over)."""

    caption_id: np.ndarray
    loss_min: np.ndarray
    loss_max: np.ndarray
    n_audios: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        """The caption_stats data contract: caption_id, loss_min, loss_max, n_audios."""
        return {name: getattr(self, name) for name in CAPTION_STATS_COLUMNS}

    @classmethod
    def from_columns(cls, table: Any) -> CaptionStats:
        return cls(
            _as_unique_ids(table["caption_id"], "caption_id"),
            np.asarray(table["loss_min"], dtype=np.float64),
            np.asarray(table["loss_max"], dtype=np.float64),
            np.asarray(table["n_audios"], dtype=np.int64),
        )

    def aligned(self, caption_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(loss_min, loss_max), each (m,), in the order of caption_ids (m,)."""
        c_ids = _as_ids(caption_ids, "caption_ids")
        order = np.argsort(self.caption_id, kind="stable")
        sorted_ids = self.caption_id[order]
        pos = np.searchsorted(sorted_ids, c_ids)
        found = pos < sorted_ids.size
        found[found] = sorted_ids[pos[found]] == c_ids[found]
        if not found.all():
            raise KeyError(f"caption {c_ids[~found][0]!r} is missing from the stats")
        idx = order[pos]
        return self.loss_min[idx], self.loss_max[idx]


def caption_stats(L: Any, caption_ids: Any) -> CaptionStats:
    """L (n, M) losses of n audios x M captions, caption_ids (M,) -> per-caption min, max
    and n_audios = n, in the order of caption_ids."""
    c_ids = _as_unique_ids(caption_ids, "caption_ids")
    L = np.asarray(L)
    if L.ndim != 2 or L.shape[1] != c_ids.size or L.shape[0] == 0:
        raise ValueError(f"L must be (n >= 1 audios, {c_ids.size} captions), got {L.shape=}")
    if not np.isfinite(L).all():
        raise ValueError("L holds NaN or inf losses")
    L = L.astype(np.float64)
    n = np.full(c_ids.size, L.shape[0], dtype=np.int64)
    return CaptionStats(c_ids, L.min(axis=0), L.max(axis=0), n)


def merge_caption_stats(a: CaptionStats, b: CaptionStats) -> CaptionStats:
    """Outer join by caption id of stats over disjoint audio sets: min of mins, max of
    maxes, sum of counts (ids in only one side pass through). Associative and commutative;
    output rows sorted by caption id."""
    ids = np.concatenate([a.caption_id, b.caption_id])
    uniq, inv = np.unique(ids, return_inverse=True)
    mn = np.full(uniq.size, np.inf)
    mx = np.full(uniq.size, -np.inf)
    n = np.zeros(uniq.size, dtype=np.int64)
    np.minimum.at(mn, inv, np.concatenate([a.loss_min, b.loss_min]))
    np.maximum.at(mx, inv, np.concatenate([a.loss_max, b.loss_max]))
    np.add.at(n, inv, np.concatenate([a.n_audios, b.n_audios]))
    return CaptionStats(uniq, mn, mx, n)


# ----------------------------------------------------------------------------- one block


@dataclass(frozen=True, eq=False)
class BlockResult:
    """What one block (all N audios x m captions) contributes: final stats and T2A lists of
    its m captions, and per-audio A2T candidates to merge across blocks. With minmax_ties
    "authors", a2t_minmax also holds every caption tied at an audio's smallest s, and the
    merged candidates go through `authors_tie_order` once at the end."""

    stats: CaptionStats
    t2a: TopK
    a2t_raw: TopK
    a2t_minmax: TopK


def score_block(L: Any, audio_ids: Any, caption_ids: Any, k: int, minmax_ties: str = "paper") -> BlockResult:
    """L (N, m) losses of ALL N audios of the index x a block of m captions -> BlockResult.
    minmax_ties: "paper", or "authors" (a2t_minmax then holds `authors_tie_order`'s candidates)."""
    stats = caption_stats(L, caption_ids)
    ties = check_minmax_ties(minmax_ties) == "authors"
    return BlockResult(
        stats=stats,
        t2a=topk_t2a(L, audio_ids, caption_ids, k),
        a2t_raw=topk_a2t_raw(L, audio_ids, caption_ids, k),
        a2t_minmax=topk_a2t_minmax(L, audio_ids, caption_ids, k, stats.loss_min, stats.loss_max, ties),
    )


def score_pairs_block(
    audio_pos: Any, caption_pos: Any, L: Any, audio_ids: Any, caption_ids: Any, k: int, minmax_ties: str = "paper"
) -> BlockResult:
    """The listed pairs of a block -> BlockResult: `score_block` when not every pair is scored
    (score_matrix's shortlist and pairs-file candidates). Pair p is (audio_ids[audio_pos[p]],
    caption_ids[caption_pos[p]]) with loss L[p]; caption_ids (m,) are the block's captions,
    each listed at least once, and every pair of a caption is in its block. A caption's
    loss_min / loss_max and n_audios run over its listed audios (exact when it lists all);
    its T2A list ranks them; each audio's A2T candidates are its listed captions. With every
    pair listed this is `score_block` on the dense matrix, row for row."""
    a_ids, c_ids = _as_unique_ids(audio_ids, "audio_ids"), _as_unique_ids(caption_ids, "caption_ids")
    a_pos, c_pos = np.asarray(audio_pos, dtype=np.int64), np.asarray(caption_pos, dtype=np.int64)
    L = np.asarray(L, dtype=np.float64)
    if not (a_pos.shape == c_pos.shape == L.shape) or a_pos.ndim != 1:
        raise ValueError(f"pairs differ in shape: {a_pos.shape=} {c_pos.shape=} {L.shape=}")
    if not np.isfinite(L).all():
        raise ValueError("L holds NaN or inf losses")
    n = np.bincount(c_pos, minlength=c_ids.size)
    if n.size != c_ids.size or not n.all():
        raise ValueError(f"every caption of the block needs a listed pair: {c_ids[n[: c_ids.size] == 0][:5].tolist()}")
    mn, mx = np.full(c_ids.size, np.inf), np.full(c_ids.size, -np.inf)
    np.minimum.at(mn, c_pos, L)
    np.maximum.at(mx, c_pos, L)
    stats = CaptionStats(c_ids, mn, mx, n.astype(np.int64))
    ties = check_minmax_ties(minmax_ties) == "authors"
    qa, qc = a_ids[a_pos], c_ids[c_pos]
    return BlockResult(
        stats=stats,
        t2a=topk_select(qc, qa, L, L, k, "t2a"),
        a2t_raw=topk_select(qa, qc, L, L, k, "a2t_raw"),
        a2t_minmax=topk_select(qa, qc, minmax_scale(L, mn[c_pos], mx[c_pos]), L, k, "a2t_minmax", ties),
    )


def merge_blocks(blocks: Iterable[BlockResult], k: int, minmax_ties: str = "paper") -> BlockResult:
    """Block results over disjoint caption sets -> the result for all their captions
    (equal to `score_block` on the concatenated matrix, with the same minmax_ties)."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("no blocks to merge")
    stats = blocks[0].stats
    for b in blocks[1:]:
        stats = merge_caption_stats(stats, b.stats)
    if stats.caption_id.size != sum(b.stats.caption_id.size for b in blocks):
        raise ValueError("caption blocks overlap")
    ties = check_minmax_ties(minmax_ties) == "authors"
    return BlockResult(
        stats=stats,
        t2a=topk_merge([b.t2a for b in blocks], k),
        a2t_raw=topk_merge([b.a2t_raw for b in blocks], k),
        a2t_minmax=topk_merge([b.a2t_minmax for b in blocks], k, keep_min_ties=ties),
    )


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True, eq=False)
class Hits:
    """Where the relevant candidates of each query sit in a top-k table. queries (Q,) sorted
    ids, n_relevant (Q,) int64 relevant candidates per query (listed or not); per listed
    relevant row, (H,) sorted by query then rank: query (index into queries), rank (1-based)."""

    queries: np.ndarray
    n_relevant: np.ndarray
    query: np.ndarray
    rank: np.ndarray

    def best(self) -> np.ndarray:
        """(Q,) int64 best rank of a relevant candidate per query, 0 when none is listed."""
        best = np.zeros(self.queries.size, dtype=np.int64)
        pos, _ = _group_pos(self.query)
        best[self.query[pos == 0]] = self.rank[pos == 0]
        return best


def find_hits(topk: TopK, relevant: Mapping[str, Collection[str]], unlisted_ok: bool = False) -> Hits:
    """Queries of `relevant` (query id -> its relevant candidate ids) -> their `Hits` in
    `topk`. Every query must have rows in `topk` (unless unlisted_ok: then it has no hit)."""
    queries = _as_ids(sorted(relevant), "queries")
    n_rel = np.array([len(set(relevant[q])) for q in queries.tolist()], dtype=np.int64)
    if queries.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Hits(queries, n_rel, empty, empty)
    listed = np.isin(queries, topk.query_id)
    if not listed.all() and not unlisted_ok:
        raise ValueError(f"query {queries[~listed][0]!r} has no rows in the {topk.kind} table")
    rel_q = np.repeat(queries, n_rel)
    rel_c = _as_ids([c for q in queries.tolist() for c in sorted(set(relevant[q]))], "relevant candidates")
    n_rows = len(topk)
    uq, qi = np.unique(np.concatenate([topk.query_id, rel_q]), return_inverse=True)
    uc, ci = np.unique(np.concatenate([topk.cand_id, rel_c]), return_inverse=True)
    code = qi.astype(np.int64) * uc.size + ci
    hit = np.isin(code[:n_rows], code[n_rows:])  # a hit row's query is one of `queries`
    query = np.searchsorted(queries, topk.query_id[hit])
    rank = topk.rank[hit].astype(np.int64)
    order = np.lexsort((rank, query))
    return Hits(queries, n_rel, query[order], rank[order])


def hit_ranks(topk: TopK, relevant: Mapping[str, Collection[str]]) -> np.ndarray:
    """Queries of `relevant` in sorted id order -> (Q,) int64 best rank of a relevant candidate
    in `topk`, 0 when none is listed. Every query must have rows in `topk`."""
    return find_hits(topk, relevant).best()


def recall_at_k(ranks: np.ndarray, k: int) -> float | None:
    """(Q,) best hit ranks (0 = miss) -> share of queries hit within the top k; None if Q = 0."""
    k = _check_k(k)
    ranks = np.asarray(ranks)
    return float(np.mean((ranks >= 1) & (ranks <= k))) if ranks.size else None


def map_at_k(hits: Hits, depth: int = MAP_DEPTH) -> float | None:
    """mAP@depth as LAION-CLAP, WavCaps and DCASE task 6b compute it, for T2A and A2T alike:
    per query with R relevant candidates whose listed ranks within the top `depth` are
    r_1 < r_2 < ..., AP = (1/R) * sum_j j / r_j (0 with none listed); the mean over queries.
    With one relevant candidate (T2A: a caption's audio) AP is 1/rank. None if Q = 0."""
    depth = _check_k(depth)
    if hits.queries.size == 0:
        return None
    pos, _ = _group_pos(hits.query)  # hits are sorted by (query, rank): j - 1
    inside = hits.rank <= depth
    precision = np.where(inside, (pos + 1) / np.maximum(hits.rank, 1), 0.0)
    ap = np.bincount(hits.query, weights=precision, minlength=hits.queries.size)
    return float(np.mean(ap / np.maximum(hits.n_relevant, 1)))


def _as_topk(table: Any, kind: str) -> TopK:
    if isinstance(table, TopK):
        if table.kind != kind:
            raise ValueError(f"expected a {kind} table, got {table.kind}")
        return table
    return TopK.from_columns(table, kind)


def _check_depth(topk: TopK, n_candidates: int) -> None:
    need = min(METRICS_MIN_K, n_candidates)
    _, counts = np.unique(topk.query_id, return_counts=True)
    if counts.size and counts.min() < need:
        raise ValueError(
            f"{topk.kind}: metrics need top-k >= {METRICS_MIN_K} (or every candidate), "
            f"but a query lists {counts.min()} of {n_candidates} candidates"
        )


def retrieval_metrics(
    topk_t2a: Any,
    topk_a2t_raw: Any,
    topk_a2t_minmax: Any,
    gt_caption_to_audio: Mapping[str, str | None],
    index_ids: tuple[Any, Any] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Recall@1/5/10 and mAP@10 (`map_at_k`) from the three top-k tables of one whole index.

    Tables: TopK or contract columns. The index is read off them: every caption is a T2A
    query, every audio an A2T query. gt_caption_to_audio: caption id -> its audio id, or
    None (or NaN) for external captions. T2A queries: captions with an audio; A2T queries:
    audios with >= 1 caption, a hit being any of them (A2T mAP@10: all of them are
    relevant, 5 per Clotho audio, as LAION-CLAP and WavCaps count). Each sub-dict also has n_queries;
    metrics of zero queries are None. Raises ValueError on lists shallower than 10 (unless
    they hold every candidate) and on ground truth naming ids outside the index.
    index_ids (audio ids, caption ids): the index, when the tables rank listed candidates
    only (score_matrix's candidates): a query may then list fewer than 10, or none, and
    what it does not list counts as missed.
    """
    t2a = _as_topk(topk_t2a, "t2a")
    raw = _as_topk(topk_a2t_raw, "a2t_raw")
    mm = _as_topk(topk_a2t_minmax, "a2t_minmax")
    captions = np.unique(t2a.query_id)
    audios = np.unique(raw.query_id)
    if not np.array_equal(audios, np.unique(mm.query_id)):
        raise ValueError("a2t_raw and a2t_minmax tables list different audios")
    if index_ids is not None:
        audios, captions = (np.unique(_as_ids(x, "index_ids")) for x in index_ids)
    else:
        _check_depth(t2a, audios.size)
        _check_depth(raw, captions.size)
        _check_depth(mm, captions.size)

    t2a_rel: dict[str, set[str]] = {}
    a2t_rel: dict[str, set[str]] = defaultdict(set)
    caption_set, audio_set = set(captions.tolist()), set(audios.tolist())
    for caption, audio in gt_caption_to_audio.items():
        if audio is None or (isinstance(audio, float) and np.isnan(audio)):
            continue
        if caption not in caption_set or audio not in audio_set:
            raise ValueError(f"ground truth ({caption!r}, {audio!r}) is not in the scored index")
        t2a_rel[caption] = {audio}
        a2t_rel[audio].add(caption)

    unlisted_ok = index_ids is not None

    def block(hits: Hits) -> dict[str, float | int | None]:
        ranks = hits.best()
        out: dict[str, float | int | None] = {f"R@{k}": recall_at_k(ranks, k) for k in RECALL_KS}
        out[f"mAP@{MAP_DEPTH}"] = map_at_k(hits)
        out["n_queries"] = int(ranks.size)
        return out

    return {
        "t2a": block(find_hits(t2a, t2a_rel, unlisted_ok)),
        "a2t_raw": block(find_hits(raw, a2t_rel, unlisted_ok)),
        "a2t_minmax": block(find_hits(mm, a2t_rel, unlisted_ok)),
    }


# ----------------------------------------------------------------------------- DCASE export


def dcase_task6b_csv(t2a: TopK, caption_ids: Any, texts: Any, file_names: Mapping[str, str]) -> str:
    """The DCASE language-based audio retrieval submission (task 6b, 2022-2024) of a T2A
    table: header `caption,fname_1,...,fname_10`, then one row per caption query in the order
    of caption_ids (M,): its text (M,) and the file names of its top 10 audios by T2A
    (file_names: audio id -> file name). Written by Python's csv module with its defaults
    (minimal quoting, CRLF line ends), as conette's `export_to_dcase_task6b_csv` writes it.
    Raises ValueError when a caption lists fewer than 10 audios (k < 10, or fewer audios)."""
    c_ids = _as_unique_ids(caption_ids, "caption_ids")
    texts = list(texts)
    if len(texts) != c_ids.size:
        raise ValueError(f"{c_ids.size} caption ids but {len(texts)} texts")
    top = t2a.rank <= DCASE_TOP_N
    q, cand, rank = t2a.query_id[top], t2a.cand_id[top], t2a.rank[top]
    order = np.lexsort((rank, q))
    q, cand = q[order], cand[order]
    uq, counts = np.unique(q, return_counts=True)
    listed = np.isin(c_ids, uq)
    pos = np.searchsorted(uq, c_ids)
    short = ~listed
    short[listed] = counts[pos[listed]] < DCASE_TOP_N
    if short.any():
        raise ValueError(
            f"caption {c_ids[short][0]!r} lists fewer than {DCASE_TOP_N} audios: the DCASE task 6b format "
            f"needs a top {DCASE_TOP_N} per caption (k >= {DCASE_TOP_N} and at least {DCASE_TOP_N} audios)"
        )
    starts = np.cumsum(counts) - counts
    grid = cand[starts[pos][:, None] + np.arange(DCASE_TOP_N)]  # (M, 10) audio ids
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(DCASE_HEADER)
    writer.writerows([text, *(file_names[a] for a in row)] for text, row in zip(texts, grid.tolist(), strict=True))
    return out.getvalue()
