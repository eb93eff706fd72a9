"""Ranking rules, streaming top-k and retrieval metrics of aacray.retrieval.

References: the paper's Table 3, a naive python `sorted()` over tuple keys, the dense
full-sort path, and torchmetrics for Recall@k / mAP@10.
"""

import csv
import io
import math
from functools import reduce

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR

from aacray.retrieval import (
    DCASE_HEADER,
    BlockResult,
    CaptionStats,
    TopK,
    caption_stats,
    dcase_task6b_csv,
    find_hits,
    map_at_k,
    merge_blocks,
    merge_caption_stats,
    minmax_scale,
    rank_a2t_minmax,
    rank_a2t_raw,
    rank_t2a,
    retrieval_metrics,
    score_block,
    topk_a2t_minmax,
    topk_a2t_raw,
    topk_merge,
    topk_select,
    topk_t2a,
)

TABLE3 = np.array([[1.7, 8.4, 8.1], [2.1, 7.6, 8.5], [2.0, 8.3, 6.5]], dtype=np.float32)
AUDIOS3, CAPTIONS3 = ["A1", "A2", "A3"], ["C1", "C2", "C3"]
FIELDS = ("query_id", "rank", "cand_id", "score", "loss")


def assert_topk_equal(got: TopK, want: TopK) -> None:
    assert got.kind == want.kind
    for f in FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        assert np.array_equal(g, w), f"{f}: {g[:20]} != {w[:20]}"


# ----------------------------------------------------------------------------- paper Table 3


@pytest.mark.parametrize("impl", ["reference", "fast", "block"])
def test_table3_rankings(impl):
    L, a, c = TABLE3, AUDIOS3, CAPTIONS3
    if impl == "reference":
        t2a, raw, mm = rank_t2a(L, a, c, 3), rank_a2t_raw(L, a, c, 3), rank_a2t_minmax(L, a, c, 3)
    elif impl == "fast":
        t2a, raw, mm = topk_t2a(L, a, c, 3), topk_a2t_raw(L, a, c, 3), topk_a2t_minmax(L, a, c, 3)
    else:
        b = score_block(L, a, c, 3)
        t2a, raw, mm = b.t2a, b.a2t_raw, b.a2t_minmax
    assert {q: v[0] for q, v in t2a.lists().items()} == {"C1": "A1", "C2": "A2", "C3": "A3"}
    assert {q: v[0] for q, v in raw.lists().items()} == {"A1": "C1", "A2": "C1", "A3": "C1"}
    assert {q: v[0] for q, v in mm.lists().items()} == {"A1": "C1", "A2": "C2", "A3": "C3"}
    # Full lists by hand. A2: s = 1 for C1 ((2.1-1.7)/(2.1-1.7)) and C3 ((8.5-6.5)/(8.5-6.5)):
    # the tie goes to the lower raw loss, C1 (2.1) before C3 (8.5).
    assert mm.lists() == {
        "A1": ["C1", "C3", "C2"],
        "A2": ["C2", "C1", "C3"],
        "A3": ["C3", "C1", "C2"],
    }
    assert raw.lists() == {
        "A1": ["C1", "C3", "C2"],
        "A2": ["C1", "C2", "C3"],
        "A3": ["C1", "C3", "C2"],
    }
    assert t2a.lists() == {
        "C1": ["A1", "A3", "A2"],
        "C2": ["A2", "A3", "A1"],
        "C3": ["A3", "A1", "A2"],
    }
    a2 = mm.query_id == "A2"
    np.testing.assert_allclose(mm.score[a2], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(mm.loss[a2], [7.6, 2.1, 8.5], rtol=1e-6)
    assert np.array_equal(raw.score, raw.loss)
    assert np.array_equal(mm.rank[a2], [1, 2, 3])


def test_table3_metrics_and_arrow_round_trip():
    b = score_block(TABLE3, AUDIOS3, CAPTIONS3, 10)
    gt = dict(zip(CAPTIONS3, AUDIOS3, strict=True))
    m = retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, gt)
    assert m["t2a"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP@10": 1.0, "n_queries": 3}
    assert m["a2t_raw"]["R@1"] == pytest.approx(1 / 3)
    assert m["a2t_raw"]["R@5"] == 1.0
    assert m["a2t_minmax"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP@10": 1.0, "n_queries": 3}
    # raw A2T: C1 first for every audio; A2's C2 second (1/2), A3's C3 second (1/2)
    assert m["a2t_raw"]["mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    # Contract tables through pyarrow give the same metrics and the same TopK.
    tables = [pa.table(t.columns()) for t in (b.t2a, b.a2t_raw, b.a2t_minmax)]
    assert tables[0].column_names == ["caption_id", "rank", "audio_id", "loss"]
    assert tables[2].column_names == ["audio_id", "rank", "caption_id", "score", "loss"]
    assert retrieval_metrics(*tables, gt) == m
    assert_topk_equal(TopK.from_columns(tables[2], "a2t_minmax"), b.a2t_minmax)
    assert CaptionStats.from_columns(pa.table(b.stats.columns())).columns().keys() == {
        "caption_id",
        "loss_min",
        "loss_max",
        "n_audios",
    }


# ----------------------------------------------------------------------------- brute force

# Ids out of sorted order, with code-point traps: case, digits ("a10" < "a2"), non-ASCII.
ID_POOL = ["b", "a10", "a2", "Z", "é", "a", "zz", "A", "_x", "0", "é2", "b1", "m", "Q", "k9", "k10"]


def random_case(seed: int):
    """Loss matrix (N, M) rounded to 1 decimal (many ties), with constant columns
    (max == min) and a duplicated column (min-max ties across captions)."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(5, 12)), int(rng.integers(8, 25))
    L = np.round(rng.uniform(1.0, 2.0, size=(n, m)), 1).astype(np.float32)
    L[:, rng.choice(m, 2, replace=False)] = np.float32(1.5)
    L[:, 0] = L[:, 1] * 1.0
    pool = ID_POOL + [f"x{i}" for i in range(40)]
    audio_ids = [f"au_{s}" for s in rng.permutation(pool)[:n]]
    caption_ids = [f"{s}" for s in rng.permutation(pool)[:m]]
    return L, audio_ids, caption_ids


def naive_lists(L, audio_ids, caption_ids, kind, k):
    """{query: [(cand, score, loss), ...]} via python floats and sorted() on tuple keys."""
    L = L.astype(np.float64).tolist()
    n, m = len(audio_ids), len(caption_ids)
    out = {}
    if kind == "t2a":
        for j, c in enumerate(caption_ids):
            rows = sorted((L[i][j], L[i][j], audio_ids[i]) for i in range(n))
            out[c] = [(a, s, v) for s, v, a in rows[:k]]
        return out
    lo = [min(L[i][j] for i in range(n)) for j in range(m)]
    hi = [max(L[i][j] for i in range(n)) for j in range(m)]
    for i, a in enumerate(audio_ids):
        rows = []
        for j, c in enumerate(caption_ids):
            if kind == "a2t_raw":
                s = L[i][j]
            else:
                s = (L[i][j] - lo[j]) / (hi[j] - lo[j]) if hi[j] != lo[j] else 0.0
            rows.append((s, L[i][j], c))
        out[a] = [(c, s, v) for s, v, c in sorted(rows)[:k]]
    return out


def as_naive(t: TopK):
    out = {}
    for q, r, c, s, v in zip(*(getattr(t, f).tolist() for f in FIELDS), strict=True):
        out.setdefault(q, []).append((r, c, s, v))
    return {q: [(c, s, v) for _, c, s, v in sorted(rows)] for q, rows in out.items()}


REFERENCE = {"t2a": rank_t2a, "a2t_raw": rank_a2t_raw, "a2t_minmax": rank_a2t_minmax}
FAST = {"t2a": topk_t2a, "a2t_raw": topk_a2t_raw, "a2t_minmax": topk_a2t_minmax}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 10, 100])
def test_dense_reference_and_fast_path_equal_naive_sort(seed, k):
    L, a, c = random_case(seed)
    for kind in REFERENCE:
        ref = REFERENCE[kind](L, a, c, k)
        assert as_naive(ref) == naive_lists(L, a, c, kind, k), kind
        assert_topk_equal(FAST[kind](L, a, c, k), ref)
        # Rows come sorted by query id, then rank.
        assert list(ref.query_id) == sorted(ref.query_id.tolist())
        assert ref.rank.min() == 1 and ref.rank.max() == min(k, len(a) if kind == "t2a" else len(c))


def random_partition(rng, items: list, n_parts: int) -> list[list]:
    cuts = np.sort(rng.choice(np.arange(1, len(items)), n_parts - 1, replace=False))
    perm = rng.permutation(len(items))
    return [[items[i] for i in part] for part in np.split(perm, cuts)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 4, 10])
def test_caption_blocks_merge_to_dense_reference(seed, k):
    L, a, c = random_case(seed)
    rng = np.random.default_rng(100 + seed)
    col = {cid: j for j, cid in enumerate(c)}
    for n_parts in (2, 3, min(6, len(c))):
        blocks = []
        for part in random_partition(rng, c, n_parts):
            blocks.append(score_block(L[:, [col[x] for x in part]], a, part, k))
        rng.shuffle(blocks)
        merged = merge_blocks(blocks, k)
        assert_topk_equal(merged.t2a, rank_t2a(L, a, c, k))
        assert_topk_equal(merged.a2t_raw, rank_a2t_raw(L, a, c, k))
        assert_topk_equal(merged.a2t_minmax, rank_a2t_minmax(L, a, c, k))
        want = caption_stats(L, c)
        order = np.argsort(want.caption_id)
        for f in ("caption_id", "loss_min", "loss_max", "n_audios"):
            assert np.array_equal(getattr(merged.stats, f), getattr(want, f)[order])
        # Folding blocks one at a time (a running merge) gives the same lists.
        running = reduce(
            lambda acc, b: topk_merge([acc, b.a2t_minmax], k), blocks[1:], blocks[0].a2t_minmax
        )
        assert_topk_equal(running, merged.a2t_minmax)


@pytest.mark.parametrize("seed", range(4))
def test_audio_blocks_merge_to_dense_reference(seed):
    """Reindex with new audios: T2A lists merge; min-max needs the merged stats."""
    L, a, c = random_case(seed)
    k = 4
    rng = np.random.default_rng(200 + seed)
    row = {aid: i for i, aid in enumerate(a)}
    parts = random_partition(rng, a, 2)
    sub = [(L[[row[x] for x in p]], p) for p in parts]
    stats = merge_caption_stats(*(caption_stats(Lp, c) for Lp, _ in sub))
    lo, hi = stats.aligned(c)
    t2a = topk_merge([topk_t2a(Lp, p, c, k) for Lp, p in sub], k)
    raw = topk_merge([topk_a2t_raw(Lp, p, c, k) for Lp, p in sub], k)
    mm = topk_merge([topk_a2t_minmax(Lp, p, c, k, lo, hi) for Lp, p in sub], k)
    assert_topk_equal(t2a, rank_t2a(L, a, c, k))
    assert_topk_equal(raw, rank_a2t_raw(L, a, c, k))
    assert_topk_equal(mm, rank_a2t_minmax(L, a, c, k))
    # Min-max on one audio part alone uses that part's min/max: generally a different answer.
    Lp, p = sub[0]
    with pytest.raises(ValueError, match="outside"):
        topk_a2t_minmax(Lp, p, c, k, *caption_stats(sub[1][0], c).aligned(c))


def test_topk_select_is_exact_on_10k_queries():
    rng = np.random.default_rng(7)
    n_q, n_c, k = 10_000, 100, 10
    q = np.repeat(np.array([f"audio_{i:05d}" for i in rng.permutation(n_q)]), n_c)
    c = np.array([f"cap_{i:07d}" for i in rng.permutation(n_q * n_c)])
    loss = np.round(rng.uniform(0, 1, n_q * n_c), 2)  # ties: ids decide
    top = topk_select(q, c, loss, loss, k, "a2t_raw")
    assert len(top) == n_q * k
    lists = top.lists()
    for query in rng.choice(np.unique(q), 20, replace=False).tolist():
        rows = np.flatnonzero(q == query)
        want = sorted(zip(loss[rows].tolist(), c[rows].tolist(), strict=True))[:k]
        assert lists[query] == [cid for _, cid in want]


def test_duplicate_pairs_and_bad_inputs_raise():
    b = score_block(TABLE3, AUDIOS3, CAPTIONS3, 3)
    with pytest.raises(ValueError, match="twice"):
        topk_merge([b.a2t_raw, b.a2t_raw], 3)
    with pytest.raises(ValueError, match="kinds"):
        topk_merge([b.a2t_raw, b.a2t_minmax], 3)
    with pytest.raises(ValueError, match="overlap"):
        merge_blocks([b, b], 3)
    bad = TABLE3.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topk_t2a(bad, AUDIOS3, CAPTIONS3, 3)
    with pytest.raises(ValueError, match="duplicate"):
        topk_t2a(TABLE3, ["A1", "A1", "A3"], CAPTIONS3, 3)
    with pytest.raises(ValueError, match="shape"):
        topk_t2a(TABLE3[:, :2], AUDIOS3, CAPTIONS3, 3)
    with pytest.raises(ValueError, match="k must"):
        topk_t2a(TABLE3, AUDIOS3, CAPTIONS3, 0)
    with pytest.raises(TypeError):
        topk_t2a(TABLE3, [1, 2, 3], CAPTIONS3, 3)


# ----------------------------------------------------------------------------- min-max, stats


def test_minmax_scale_values_and_constant_columns():
    L = np.array([[1.0, 3.0, 2.0], [2.0, 3.0, 4.0], [1.5, 3.0, 3.0]])
    s = minmax_scale(L, L.min(0), L.max(0))
    np.testing.assert_array_equal(s, [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.0, 0.5]])
    assert np.isfinite(s).all()


def test_merge_caption_stats_associative_and_equal_to_concatenation():
    rng = np.random.default_rng(3)
    L = rng.normal(size=(12, 7))
    ids = ["c", "a", "g", "b", "f", "e", "d"]
    whole = caption_stats(L, ids)
    p1, p2, p3 = (caption_stats(L[s], ids) for s in (slice(0, 3), slice(3, 8), slice(8, 12)))
    left = merge_caption_stats(merge_caption_stats(p1, p2), p3)
    right = merge_caption_stats(p1, merge_caption_stats(p3, p2))
    order = np.argsort(ids)
    for f in ("caption_id", "loss_min", "loss_max", "n_audios"):
        assert np.array_equal(getattr(left, f), getattr(right, f)), f
        assert np.array_equal(getattr(left, f), getattr(whole, f)[order]), f
    assert (left.n_audios == 12).all()
    # Disjoint caption sets (new captions) pass through unchanged.
    split = merge_caption_stats(caption_stats(L[:, :3], ids[:3]), caption_stats(L[:, 3:], ids[3:]))
    lo, hi = split.aligned(ids)
    assert np.array_equal(lo, L.min(0)) and np.array_equal(hi, L.max(0))
    with pytest.raises(KeyError):
        split.aligned(["nope"])


# ----------------------------------------------------------------------------- metrics


def metric_case(seed: int):
    """20 audios, 3 captions each plus 10 external captions; 4 audios have no caption.
    Continuous losses, gt pairs lowered so recall is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    audios = [f"a{i:02d}" for i in rng.permutation(24)]
    gt = {}
    for j, audio in enumerate(audios[:20]):
        for r in range(3):
            gt[f"c{j}_{r}"] = audio
    for e in range(10):
        gt[f"ext{e}"] = None
    captions = list(rng.permutation(list(gt)))
    L = rng.normal(5.0, 1.0, size=(len(audios), len(captions)))
    L += rng.normal(0.0, 1.0, size=(1, len(captions)))  # caption bias: min-max matters
    for j, caption in enumerate(captions):
        if gt[caption] is not None:
            L[audios.index(gt[caption]), j] -= 1.5
    return L, audios, captions, gt


def torchmetrics_value(metric, scores: dict, relevant: dict) -> float:
    """scores: {query: {cand: higher-is-better > 0}}; relevant: {query: set of cands}."""
    idx, preds, target = [], [], []
    for qi, (q, cands) in enumerate(sorted(relevant.items())):
        for cand, p in scores[q].items():
            idx.append(qi)
            preds.append(p)
            target.append(cand in cands)
    return float(
        metric(
            torch.tensor(preds, dtype=torch.float64),
            torch.tensor(target),
            indexes=torch.tensor(idx),
        )
    )


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_torchmetrics(seed):
    L, audios, captions, gt = metric_case(seed)
    b = score_block(L, audios, captions, 10)
    got = retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, gt)

    # Positive "higher is better" scores: torchmetrics' MRR ignores preds <= 0 as relevant.
    top = float(L.max()) + 1.0
    t2a_scores = {
        c: {a: top - L[i, j] for i, a in enumerate(audios)} for j, c in enumerate(captions)
    }
    raw_scores = {
        a: {c: top - L[i, j] for j, c in enumerate(captions)} for i, a in enumerate(audios)
    }
    # Min-max scores tie (several captions at s = 0): use positions of the naive sort instead.
    naive_mm = naive_lists(L, audios, captions, "a2t_minmax", len(captions))
    mm_scores = {
        a: {c: len(rows) - pos for pos, (c, _, _) in enumerate(rows)}
        for a, rows in naive_mm.items()
    }
    t2a_rel = {c: {a} for c, a in gt.items() if a is not None}
    a2t_rel: dict[str, set[str]] = {}
    for c, a in gt.items():
        if a is not None:
            a2t_rel.setdefault(a, set()).add(c)

    for k in (1, 5, 10):
        assert got["t2a"][f"R@{k}"] == pytest.approx(
            torchmetrics_value(RetrievalHitRate(top_k=k), t2a_scores, t2a_rel)
        )
        assert got["a2t_raw"][f"R@{k}"] == pytest.approx(
            torchmetrics_value(RetrievalHitRate(top_k=k), raw_scores, a2t_rel)
        )
        assert got["a2t_minmax"][f"R@{k}"] == pytest.approx(
            torchmetrics_value(RetrievalHitRate(top_k=k), mm_scores, a2t_rel)
        )
    assert got["t2a"]["mAP@10"] == pytest.approx(
        torchmetrics_value(RetrievalMRR(top_k=10), t2a_scores, t2a_rel)
    )
    # External captions are candidates but not T2A queries; caption-less audios are not A2T queries.
    assert got["t2a"]["n_queries"] == 60
    assert got["a2t_raw"]["n_queries"] == got["a2t_minmax"]["n_queries"] == 20
    assert 0.0 < got["t2a"]["R@1"] < 1.0 and 0.0 < got["a2t_raw"]["R@1"] < 1.0


def test_metrics_with_external_captions_only_and_nan_gt():
    L, audios, captions, gt = metric_case(0)
    b = score_block(L, audios, captions, 10)
    external = {c: (math.nan if i % 2 else None) for i, c in enumerate(captions)}
    m = retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, external)
    assert m["t2a"] == {"R@1": None, "R@5": None, "R@10": None, "mAP@10": None, "n_queries": 0}
    assert m["a2t_raw"]["n_queries"] == 0 and m["a2t_minmax"]["R@1"] is None
    # One caption with a gt among externals: a single T2A query, a single A2T query.
    one = dict(external)
    first = next(c for c in captions if gt[c] is not None)
    one[first] = gt[first]
    m = retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, one)
    assert m["t2a"]["n_queries"] == 1 and m["a2t_raw"]["n_queries"] == 1
    rank = b.t2a.rank[(b.t2a.query_id == first) & (b.t2a.cand_id == gt[first])]
    assert m["t2a"]["mAP@10"] == pytest.approx(1.0 / rank[0] if rank.size else 0.0)


def test_metrics_refuse_shallow_lists_and_foreign_ids():
    L, audios, captions, gt = metric_case(1)
    shallow = score_block(L, audios, captions, 5)
    with pytest.raises(ValueError, match="top-k >= 10"):
        retrieval_metrics(shallow.t2a, shallow.a2t_raw, shallow.a2t_minmax, gt)
    b = score_block(L, audios, captions, 10)
    with pytest.raises(ValueError, match="not in the scored index"):
        retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, {**gt, "unscored": audios[0]})
    with pytest.raises(ValueError, match="not in the scored index"):
        retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, {**gt, captions[0]: "no_such_audio"})
    # With fewer candidates than 10, complete lists are enough (Table 3 at k = 3).
    t3 = score_block(TABLE3, AUDIOS3, CAPTIONS3, 3)
    assert isinstance(t3, BlockResult)
    retrieval_metrics(t3.t2a, t3.a2t_raw, t3.a2t_minmax, dict(zip(CAPTIONS3, AUDIOS3, strict=True)))


# ----------------------------------------------------------------------------- mAP@10, DCASE


def test_map_at_10_hand_computed():
    """Audio A: relevant c01, c03, c12 of 12 listed -> ranks 1, 3 in the top 10 (12 is out):
    AP = (1/1 + 2/3) / 3. B: one relevant at rank 4 -> 1/4. C: its relevant unlisted -> 0."""
    q = ["A"] * 12 + ["B"] * 12 + ["C"] * 12
    cand = [f"c{i:02d}" for i in range(1, 13)] * 3
    rank = list(range(1, 13)) * 3
    loss = np.arange(36, dtype=np.float64)
    t = TopK("a2t_raw", np.array(q), np.array(rank, np.int32), np.array(cand), loss, loss)
    hits = find_hits(t, {"A": {"c01", "c03", "c12"}, "B": {"c04"}, "C": {"zz"}})
    assert hits.best().tolist() == [1, 4, 0]
    assert map_at_k(hits) == pytest.approx(((1 + 2 / 3) / 3 + 1 / 4 + 0) / 3)
    assert map_at_k(hits, depth=12) == pytest.approx(((1 + 2 / 3 + 3 / 12) / 3 + 1 / 4) / 3)
    assert map_at_k(find_hits(t, {})) is None


def brute_map_at_10(P: np.ndarray, S: np.ndarray, query_ids, cand_ids, relevant) -> float:
    """Full argsort of every query's candidates by (P, S, candidate id); per query with R
    relevant, AP@10 = sum(arange(1, n + 1) / ranks of the relevant in the top 10) / R
    (WavCaps' retrieval/tools/utils.py a2t, with R = 5 there); the mean over queries."""
    id_rank = np.argsort(np.argsort(np.asarray(cand_ids)))
    aps = []
    for i, q in enumerate(query_ids):
        if q not in relevant:
            continue
        order = np.lexsort((id_rank, S[i], P[i]))
        ranks = 1 + np.flatnonzero(np.isin(np.asarray(cand_ids)[order], list(relevant[q])))
        inds_map = ranks[ranks <= 10]
        aps.append(np.sum(np.arange(1, len(inds_map) + 1) / inds_map) / len(relevant[q]))
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", range(4))
def test_map_at_10_equals_a_full_argsort_for_t2a_and_a2t(seed):
    L, audios, captions, gt = metric_case(seed)
    L = np.round(L, 1)  # ties: ids decide
    b = score_block(L, audios, captions, 10)
    got = retrieval_metrics(b.t2a, b.a2t_raw, b.a2t_minmax, gt)
    a2t_rel: dict[str, set[str]] = {}
    for c, a in gt.items():
        if a is not None:
            a2t_rel.setdefault(a, set()).add(c)
    t2a_rel = {c: {a} for c, a in gt.items() if a is not None}
    S = minmax_scale(L, L.min(0), L.max(0))
    assert got["t2a"]["mAP@10"] == pytest.approx(brute_map_at_10(L.T, L.T, captions, audios, t2a_rel), abs=1e-12)
    assert got["a2t_raw"]["mAP@10"] == pytest.approx(brute_map_at_10(L, L, audios, captions, a2t_rel), abs=1e-12)
    assert got["a2t_minmax"]["mAP@10"] == pytest.approx(brute_map_at_10(S, L, audios, captions, a2t_rel), abs=1e-12)
    # three relevant captions per audio: A2T mAP@10 is below the best-hit MRR whenever a
    # second or third caption sits below rank 1
    assert 0 < got["a2t_raw"]["mAP@10"] < 1


def test_dcase_task6b_csv_equals_a_full_sort():
    """Header and quoting as conette's export (csv defaults); rows in the given caption order;
    each row the top 10 audios of a full sort of the caption's column by (loss, audio id)."""
    L, audios, captions, _ = metric_case(2)
    L = np.round(L, 1)
    names = {a: f"clip {a}, take 1.wav" for a in audios}  # a comma: quoted
    texts = [f'text of {c}, with "quotes"' for c in captions]
    b = score_block(L, audios, captions, 12)
    out = dcase_task6b_csv(b.t2a, captions, texts, names)
    lines = out.split("\r\n")
    assert lines[0] == "caption," + ",".join(f"fname_{i}" for i in range(1, 11)) and lines[-1] == ""
    assert lines[1].startswith(f'"text of {captions[0]}, with ""quotes""","clip ')
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == DCASE_HEADER and len(rows) == 1 + len(captions)
    id_rank = np.argsort(np.argsort(np.asarray(audios)))
    for j, (c, row) in enumerate(zip(captions, rows[1:], strict=True)):
        top = np.lexsort((id_rank, L[:, j]))[:10]
        assert row == [texts[j], *(names[audios[i]] for i in top)], c
    with pytest.raises(ValueError, match="fewer than 10 audios"):
        dcase_task6b_csv(score_block(L, audios, captions, 5).t2a, captions, texts, names)
