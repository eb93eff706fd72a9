"""The shortlist's pure parts (aacray/shortlist.py, retrieval.score_pairs_block) against
brute force: BM25 by Lucene's formula written out, the PMI profile score by a loop, the
sparse block against the dense `score_block` and a full sort, the pairs' union by sets, and
the n-best beams against `beam_search`. The job-level invariants (shortlist with K >= N, M
equals exact; a pairs file scores as the full matrix) are in tests/test_pipeline.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aacray.retrieval import rank_a2t_minmax, rank_a2t_raw, rank_t2a, score_block, score_pairs_block
from aacray.shortlist import (
    bm25_scores,
    candidate_pairs,
    profile_scores,
    sample_audios,
    shortlist_figures,
    top_k,
)
from aacray.text import words

DOCS = [
    "A dog barks while a car passes by.",
    "Rain falls on a metal roof.",
    "A dog and another dog bark loudly, then rain.",
    "Birds chirp in the morning.",
    "",
    "A car engine idles; a car horn honks.",
]
QUERIES = ["dog barking", "a car", "rain rain roof", "whale song", "birds in the rain and a dog"]


def _lucene_bm25(query: list[str], docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Lucene's BM25, term by term: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part
    tf / (tf + k1 (1 - b + b |d| / avgdl)); a query term counts once per occurrence."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    out = np.zeros(n)
    for w in query:
        df = sum(1 for d in docs if w in d)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(w)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return out


def test_bm25_matches_brute_force_lucene_formula():
    docs = [words(d) for d in DOCS]
    queries = [words(q) for q in QUERIES]
    got = bm25_scores(queries, docs)
    ref = np.stack([_lucene_bm25(q, docs) for q in queries])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[3] == 0).all()  # "whale song": no document holds either word
    # the ranking: highest score first, ties (the zero rows) by position
    expect = [sorted(range(len(docs)), key=lambda i: (-round(float(r[i]), 5), i))[:3] for r in ref]
    assert top_k(got, 3).tolist() == expect


def test_top_k_breaks_ties_by_position_and_caps_at_the_row():
    s = np.array([[1.0, 3.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert top_k(s, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert top_k(s, 10).shape == (2, 4)
    rng = np.random.default_rng(6)  # against a full stable sort, ties everywhere
    for k in (1, 3, 7, 12):
        s = rng.integers(0, 4, size=(9, 12)).astype(np.float32)
        assert top_k(s, k).tolist() == np.argsort(-s, axis=1, kind="stable")[:, :k].tolist(), k


def test_profile_scores_match_a_loop():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=4)  # 4 audios, V = 7
    log_p = np.log(p).astype(np.float32)
    captions = [[0, 3, 4, 1], [0, 5, 5, 2, 1], [0, 6, 1]]  # bos 0, eos 1 skipped
    got = profile_scores(log_p, captions, skip={0, 1})
    mean = np.exp(log_p.astype(np.float64)).mean(axis=0)
    for a in range(4):
        for j, t in enumerate(captions):
            ws = [w for w in t if w not in (0, 1)]
            ref = np.mean([log_p[a, w] - np.log(mean[w]) for w in ws])
            assert got[a, j] == pytest.approx(ref, abs=1e-5)


def test_sample_audios_is_seeded_and_whole_when_large():
    a = sample_audios(100, 10, seed=3, include=[97])
    assert a.tolist() == sample_audios(100, 10, seed=3, include=[97]).tolist()
    assert 97 in a and a.size in (10, 11) and (np.diff(a) > 0).all()
    assert a.tolist() != sample_audios(100, 10, seed=4, include=[97]).tolist()
    assert sample_audios(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_candidate_pairs_is_the_union_of_lists_and_sample():
    rng = np.random.default_rng(1)
    n, m = 9, 13
    a2t = np.stack([rng.choice(m, 4, replace=False) for _ in range(n)])
    t2a = np.stack([rng.choice(n, 3, replace=False) for _ in range(m)])
    sample = np.array([2, 7])
    extra = (np.array([0, 0, 8]), np.array([12, 12, 0]))  # a repeat
    c = candidate_pairs(n, m, extra, sample, a2t, t2a)
    want = {(a, int(j)) for a in range(n) for j in a2t[a]} | {(int(a), j) for j in range(m) for a in t2a[j]}
    want |= {(int(a), j) for a in sample for j in range(m)} | {(0, 12), (8, 0)}
    got = {(int(a), j) for j in range(m) for a in c.of(j)}
    assert got == want and c.n_pairs == len(want)
    assert all((np.diff(c.of(j)) > 0).all() for j in range(m))


def test_shortlist_figures_count_ground_truth():
    # 3 audios, 4 captions: caption j belongs to audio gt[j]
    gt = np.array([0, 0, 1, -1])
    a2t = np.array([[1, 2], [2, 3], [0, 1]])  # audio 0 lists caption 1 (its own), audio 1 lists 2 (its own)
    t2a = np.array([[1, 2], [0, 2], [1, 0], [0, 1]])  # caption 1's list holds 0, caption 2's holds 1
    c = candidate_pairs(3, 4, (np.zeros(0, np.int64), np.zeros(0, np.int64)), np.array([], np.int64), a2t, t2a)
    f = shortlist_figures(c, gt, 3)
    assert f["t2a_gt_in_list"] == pytest.approx(2 / 3, abs=1e-5)  # captions 1 and 2 of the 3 with an audio
    assert f["a2t_gt_in_list"] == pytest.approx(1.0, abs=1e-5)  # both audios with captions list one
    assert f["a2t_gt_pairs_in_list"] == pytest.approx(2 / 3, abs=1e-5)  # (0, 1) and (1, 2) of 3 true pairs
    # (0, 0) is in neither audio 0's list [1, 2] nor caption 0's [1, 2]: not scored
    assert f["gt_pairs_scored"] == pytest.approx(2 / 3, abs=1e-5)
    assert f["pairs"] == c.n_pairs


def _ties(rng, n, m):
    L = rng.integers(0, 6, size=(n, m)).astype(np.float64) / 4  # many exact ties
    return L


@pytest.mark.parametrize("ties", ["paper", "authors"])
def test_score_pairs_block_with_every_pair_is_score_block(ties):
    rng = np.random.default_rng(2)
    n, m, k = 7, 5, 3
    L = _ties(rng, n, m)
    a_ids = [f"a{i}" for i in rng.permutation(n)]
    c_ids = [f"c{j}" for j in rng.permutation(m)]
    order = rng.permutation(n * m)
    a_pos, c_pos = np.divmod(order, m)
    dense = score_block(L, a_ids, c_ids, k, ties)
    sparse = score_pairs_block(a_pos, c_pos, L[a_pos, c_pos], a_ids, c_ids, k, ties)
    for name in ("caption_id", "loss_min", "loss_max", "n_audios"):
        assert getattr(sparse.stats, name).tolist() == getattr(dense.stats, name).tolist(), name
    for kind in ("t2a", "a2t_raw", "a2t_minmax"):
        d, s = getattr(dense, kind).columns(), getattr(sparse, kind).columns()
        for col in d:
            assert np.asarray(s[col]).tolist() == np.asarray(d[col]).tolist(), (kind, col)


def test_score_pairs_block_ranks_only_listed_pairs():
    """A subset of pairs: each caption's stats and T2A list over its listed audios, each
    audio's A2T candidates over its listed captions, as a full sort of the masked matrix."""
    rng = np.random.default_rng(3)
    n, m, k = 9, 6, 4
    L = _ties(rng, n, m)
    listed = rng.random((n, m)) < 0.6
    listed[0] = True  # every caption listed at least once
    a_ids, c_ids = [f"a{i}" for i in range(n)], [f"c{j}" for j in range(m)]
    a_pos, c_pos = np.nonzero(listed)
    got = score_pairs_block(a_pos, c_pos, L[a_pos, c_pos], a_ids, c_ids, k)
    big = 1e9  # unlisted pairs sort last and are cut below
    masked = np.where(listed, L, big)
    mn = np.where(listed, L, np.inf).min(axis=0)
    mx = np.where(listed, L, -np.inf).max(axis=0)
    assert got.stats.loss_min.tolist() == mn.tolist() and got.stats.loss_max.tolist() == mx.tolist()
    assert got.stats.n_audios.tolist() == listed.sum(axis=0).tolist()

    def keep(lists, allowed):
        return {q: [c for c in cs if allowed(q, c)] for q, cs in lists.items()}

    ok_t2a = lambda c, a: listed[a_ids.index(a), c_ids.index(c)]  # noqa: E731
    ok_a2t = lambda a, c: listed[a_ids.index(a), c_ids.index(c)]  # noqa: E731
    exp_t2a = {c: v[:k] for c, v in keep(rank_t2a(masked, a_ids, c_ids, n).lists(), ok_t2a).items()}
    assert got.t2a.lists() == exp_t2a
    exp_raw = {a: v[:k] for a, v in keep(rank_a2t_raw(masked, a_ids, c_ids, m).lists(), ok_a2t).items() if v}
    assert got.a2t_raw.lists() == exp_raw
    S_masked = np.where(listed, L, mx[None, :])  # any in-range value: unlisted rows are dropped
    full = rank_a2t_minmax(S_masked, a_ids, c_ids, m, mn, mx).lists()
    exp_mm = {a: [c for c in v if ok_a2t(a, c)][:k] for a, v in full.items()}
    assert got.a2t_minmax.lists() == {a: v for a, v in exp_mm.items() if v}


def test_n_best_beams_are_distinct_sorted_and_scored_by_the_model():
    """Every kept beam's score is its mean log p under the model (with no decoding rule on,
    the masked distribution is the plain softmax: score = -pair_loss); beams are distinct,
    best first, and the first is `beam_search`'s caption."""
    from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss
    from aacray.decoding import beam_search, beam_search_n_best
    from aacray.text import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer.build(["a dog barks", "rain on a roof", "a car passes by", "birds chirp"])
    model = CaptionDecoder(DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=12), tok.vocab_size, tok.pad_id).eval()
    frames = torch.randn(3, 5, 768)
    rules = {"min_len": 0, "max_len": 6, "forbid_repeats": False, "ban_specials": False}
    beams = beam_search_n_best(model, frames, None, tok, beam_size=4, **rules)
    assert [b[0] for b in beams] == beam_search(model, frames, None, tok, beam_size=4, **rules)
    for i, b in enumerate(beams):
        assert len(b) == 4
        assert [g.score for g in b] == sorted((g.score for g in b), reverse=True)
        assert len({tuple(g.tokens) for g in b}) == len(b)  # distinct hypotheses
        for g in b:
            with torch.inference_mode():
                loss = pair_loss(model, frames[i : i + 1], None, torch.tensor([g.tokens]), tok.pad_id)
            assert g.score == pytest.approx(-float(loss), abs=1e-5)


def test_chunked_top_k_equals_the_whole_matrix(monkeypatch):
    """bm25_top_k and profile_top_k score CHUNK queries at a time: the same lists as top_k
    over the whole score matrix (here chunks of 2 rows)."""
    from aacray import shortlist

    monkeypatch.setattr(shortlist, "CHUNK", 2)
    docs, queries = [words(d) for d in DOCS], [words(q) for q in QUERIES]
    assert shortlist.bm25_top_k(queries, docs, 3).tolist() == top_k(bm25_scores(queries, docs), 3).tolist()
    rng = np.random.default_rng(4)
    log_p = np.log(rng.dirichlet(np.ones(9), size=5)).astype(np.float32)
    caps = [[0, *rng.integers(2, 9, size=rng.integers(1, 5)).tolist(), 1] for _ in range(7)]
    a2t, t2a = shortlist.profile_top_k(log_p, caps, {0, 1}, 4)
    S = profile_scores(log_p, caps, {0, 1})
    assert a2t.tolist() == top_k(S, 4).tolist() and t2a.tolist() == top_k(S.T, 4).tolist()
