"""End to end on a tiny corpus through a real local Ray: extract -> train -> score_matrix.

The tiny corpus has 40 evaluation clips (200 captions) so the score matrix is 40 x 200.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from aacray import checkpoint as ckpt_lib
from aacray import storage
from aacray.config import ExtractConfig, ScoreConfig, TrainConfig, from_dict
from aacray.corpora import write_demo_corpus
from aacray.embeddings import read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.retrieval import rank_a2t_minmax, rank_a2t_raw, rank_t2a
from aacray.scorer import reference_loss_matrix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_corpus")
    write_demo_corpus(str(root), seed=3, n_dev=24, n_val=6, n_eval=40, min_seconds=1.5, max_seconds=3.0)
    return str(root)


@pytest.fixture(scope="module")
def extracted(corpus, tmp_path_factory, ray_local):
    from aacray.extract import run_extract

    out = str(tmp_path_factory.mktemp("pipe") / "extract")
    cfg = from_dict(
        ExtractConfig,
        {"input": {"kind": "clotho", "root": corpus, "subsets": ["dev", "val", "eval"]}, "output": out,
         "encoder": {"name": "logmel_pool"}, "actors": {"num_actors": 2, "batch_size": 8}},
    )
    summary = run_extract(cfg)
    assert summary["written"] == 70 and summary["quarantined"] == 0
    return out


@pytest.fixture(scope="module")
def trained(extracted, tmp_path_factory, ray_local):
    from aacray.train import run_train

    out = str(tmp_path_factory.mktemp("pipe") / "train")
    cfg = from_dict(
        TrainConfig,
        {"embeddings": extracted, "output": out, "epochs": 2, "batch_size": 8, "num_workers": 1,
         "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}},
    )
    summary = run_train(cfg)
    assert summary["epochs"] == 2
    return out


def test_extract_contract(extracted):
    m = storage.read_manifest(extracted)
    assert m["tables"]["embeddings"]["rows"] == 70
    t = storage.read_table(extracted, "embeddings")
    assert t.schema.names == ["audio_id", "subset", "n_frames", "embedding", "source", "sample_rate"]
    es = read_embeddings(extracted)
    for aid, n, f in zip(t.column("audio_id").to_pylist(), t.column("n_frames").to_pylist(), es.frames, strict=True):
        assert f.shape == (n, 768), aid
    assert set(t.column("sample_rate").to_pylist()) == {44100}
    caps = read_captions(extracted)
    assert caps.num_rows == 70 * 5
    assert set(caps.column("audio_id").to_pylist()) == set(es.audio_ids)
    # plain pyarrow reads every shard (no Ray needed to consume the contract)
    files = storage.table_files(extracted, "embeddings")
    assert sum(pq.read_metadata(f).num_rows for f in files) == 70


def _score(trained, extracted, out, **kw) -> dict:
    from aacray.scoring import run_score_matrix

    base = {"checkpoint": trained, "audio": extracted, "audio_subsets": ["evaluation"], "captions": extracted,
            "caption_subsets": ["evaluation"], "output": out, "write_scores": True, "plots": True}
    base.update(kw)
    fail = base.pop("_fail_on_block", None)
    return run_score_matrix(from_dict(ScoreConfig, base), _fail_on_block=fail)


@pytest.fixture(scope="module")
def scored(trained, extracted, tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("pipe") / "score_a")
    _score(trained, extracted, out, caption_block_size=64, actors={"num_actors": 2, "batch_size": 1})
    return out


def test_distributed_losses_equal_reference_loop(scored, trained, extracted):
    """The job's losses equal a plain loop over pair_loss within 1e-5 (40 x 200 matrix)."""
    model, tok, _ = ckpt_lib.load(trained)
    es = read_embeddings(extracted, ["evaluation"])
    caps = read_captions(extracted, ["evaluation"])
    cids = caps.column("caption_id").to_pylist()
    ref = reference_loss_matrix(model, tok.pad_id, es.frames, [tok.encode(t) for t in caps.column("text").to_pylist()])
    assert ref.shape == (40, 200)
    scores = storage.read_table(scored, "scores").to_pandas()
    assert len(scores) == 40 * 200 and not scores.duplicated(["audio_id", "caption_id"]).any()
    got = scores.pivot(index="audio_id", columns="caption_id", values="loss").loc[es.audio_ids, cids].to_numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)

    # the rankings written are the dense reference rankings of the job's losses (near-ties
    # within 1e-7 may order differently under the loop's rounding, so rank the job's values)
    got = got.astype(np.float64)
    t2a = storage.read_table(scored, "topk_t2a").to_pandas()
    exp = rank_t2a(got, es.audio_ids, cids, 10).lists()
    got_t2a = {c: g.sort_values("rank")["audio_id"].tolist() for c, g in t2a.groupby("caption_id")}
    assert got_t2a == exp
    mm = storage.read_table(scored, "topk_a2t").to_pandas()
    exp_mm = rank_a2t_minmax(got, es.audio_ids, cids, 10).lists()
    assert {a: g.sort_values("rank")["caption_id"].tolist() for a, g in mm.groupby("audio_id")} == exp_mm
    raw = storage.read_table(scored, "topk_a2t_raw").to_pandas()
    exp_raw = rank_a2t_raw(got, es.audio_ids, cids, 10).lists()
    assert {a: g.sort_values("rank")["caption_id"].tolist() for a, g in raw.groupby("audio_id")} == exp_raw
    stats = storage.read_table(scored, "caption_stats").to_pandas().set_index("caption_id").loc[cids]
    np.testing.assert_allclose(stats["loss_min"], ref.min(0), atol=1e-5)
    np.testing.assert_allclose(stats["loss_max"], ref.max(0), atol=1e-5)
    assert (stats["n_audios"] == 40).all()


def test_block_size_and_actor_count_do_not_change_outputs(scored, trained, extracted, tmp_path):
    other = str(tmp_path / "score_b")
    # 5 captions a block: many blocks hold none of the heatmap corner captions
    _score(trained, extracted, other, caption_block_size=5, actors={"num_actors": 1})
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"):
        a = storage.read_table(scored, name).to_pandas()
        b = storage.read_table(other, name).to_pandas()
        key = [c for c in a.columns if c.endswith("_id")] + (["rank"] if "rank" in a.columns else [])
        a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
        for col in a.columns:
            assert a[col].tolist() == b[col].tolist(), f"{name}.{col}"  # identical, floats too
    ma = json.loads(open(os.path.join(scored, "metrics.json")).read())
    mb = json.loads(open(os.path.join(other, "metrics.json")).read())
    for k in ("t2a", "a2t_raw", "a2t_minmax"):
        assert ma[k] == mb[k]


def test_resume_skips_finished_blocks(scored, trained, extracted, tmp_path):
    """A run that dies at block 2 leaves the blocks scored before it done; the rerun skips
    them and the outputs equal a clean run."""
    out = str(tmp_path / "resumed")
    kw = {"caption_block_size": 64, "actors": {"num_actors": 1}}
    with pytest.raises(Exception, match="injected fault at block 2"):
        _score(trained, extracted, out, _fail_on_block=2, **kw)
    assert not os.path.exists(os.path.join(out, "_MANIFEST.json"))
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_table(out, "topk_t2a")
    _score(trained, extracted, out, **kw)
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    # blocks 0-3 of 64, 64, 64, 8 captions sorted by length, run longest first (3, 2, 1, 0)
    # one at a time by the single actor: block 3 finished before the fault at block 2
    assert m["blocks"] == 4 and m["blocks_skipped_on_resume"] == 1
    assert m["pairs_scored_this_run"] == 40 * (200 - 8)
    assert m["timing"]["actors_used"] == 1  # this run's blocks only: the skipped one is not timed again
    assert not os.path.exists(os.path.join(out, "_blocks"))
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw", "scores"):
        a = storage.read_table(scored, name).to_pandas()
        b = storage.read_table(out, name).to_pandas()
        key = [c for c in a.columns if c.endswith("_id")] + (["rank"] if "rank" in a.columns else [])
        a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
        assert a.equals(b), name


def test_bf16_refined_gives_fp32_outputs(scored, trained, extracted, tmp_path):
    """precision bf16-refined: every pair screened in bf16, the pairs that decide a list or a
    caption's min/max re-scored in fp32. Against the fp32 run: caption stats within 1e-6;
    every top-k table has the same queries and ranks, each rank's loss / score within fp32's
    last bit (1e-6, min-max scores 4e-6 / the smallest span), and where a rank names another
    candidate, that candidate's fp32 value ties the fp32 run's within twice that bound (a
    swap of near-tied neighbours, nothing else), at least 99% of rows naming the same one; the
    metrics are equal; the scores table holds fp32's bits on some pairs, bf16 losses within
    the margin elsewhere."""
    out = str(tmp_path / "refined")
    _score(trained, extracted, out, scorer={"precision": "bf16-refined"}, caption_block_size=64, actors={"num_actors": 2})
    # fp32's own last bit: a re-scored pair may round differently from the fp32 run (a forward
    # of another row count) by an ulp or two, 1e-6 on these losses; min-max scores divide that
    # by the caption's span. Within it, neighbours may swap, so compare each rank's score.
    sa = storage.read_table(scored, "caption_stats").to_pandas().set_index("caption_id").sort_index()
    sb = storage.read_table(out, "caption_stats").to_pandas().set_index("caption_id").sort_index()
    assert sa.index.equals(sb.index) and (sa["n_audios"] == sb["n_audios"]).all()
    np.testing.assert_allclose(sb[["loss_min", "loss_max"]], sa[["loss_min", "loss_max"]], rtol=0, atol=1e-6)
    span = (sa["loss_max"] - sa["loss_min"]).min()
    # fp32 loss of every pair, to check the candidates of swapped ranks
    fp32 = storage.read_table(scored, "scores").to_pandas().set_index(["audio_id", "caption_id"])["loss"]
    same_ids = rows = 0
    for name, q, col in (("topk_t2a", "caption_id", "loss"), ("topk_a2t_raw", "audio_id", "score"), ("topk_a2t", "audio_id", "score")):
        a = storage.read_table(scored, name).to_pandas().sort_values([q, "rank"]).reset_index(drop=True)
        b = storage.read_table(out, name).to_pandas().sort_values([q, "rank"]).reset_index(drop=True)
        assert a[[q, "rank"]].equals(b[[q, "rank"]]), name
        tol = 1e-6 if name != "topk_a2t" else 4e-6 / span
        np.testing.assert_allclose(b[col], a[col], rtol=0, atol=tol, err_msg=name)  # rank by rank
        cand = "audio_id" if q == "caption_id" else "caption_id"
        differ = a[cand] != b[cand]
        same_ids += int((~differ).sum())
        rows += len(a)
        for (_, ra), (_, rb) in zip(a[differ].iterrows(), b[differ].iterrows(), strict=True):
            aid, cid = (rb[cand], rb[q]) if q == "caption_id" else (rb[q], rb[cand])
            value = fp32[(aid, cid)]  # the swapped-in candidate's fp32 loss (raw / T2A)
            if name == "topk_a2t":  # its min-max score under the caption's fp32 stats
                value = (value - sa.at[cid, "loss_min"]) / (sa.at[cid, "loss_max"] - sa.at[cid, "loss_min"])
            # two roundings apart at most: the fp32 run's, and the re-scored pair's own
            assert abs(value - ra[col]) <= 2 * tol, f"{name}: {rb[q]} rank {rb['rank']} names {rb[cand]}, not a tie of {ra[cand]}"
    print(f"\nbf16-refined vs fp32: {same_ids} of {rows} top-k rows name the same candidate")
    assert same_ids >= 0.99 * rows
    ma = json.loads(open(os.path.join(scored, "metrics.json")).read())
    mb = json.loads(open(os.path.join(out, "metrics.json")).read())
    for k in ("t2a", "a2t_raw", "a2t_minmax"):
        assert ma[k] == mb[k]
    refine = mb["scorer"]["refine"]
    assert mb["scorer"]["precision"] == "bf16-refined" and refine["within_margin"]
    assert 0 < refine["rescored_pairs"] < mb["n_pairs"] and 0 < refine["max_rel_err_seen"] <= refine["margin"]
    la = storage.read_table(scored, "scores").to_pandas().set_index(["audio_id", "caption_id"])["loss"]
    lb = storage.read_table(out, "scores").to_pandas().set_index(["audio_id", "caption_id"])["loss"]
    lb = lb.loc[la.index]
    same = (la.to_numpy() == lb.to_numpy()).sum()
    assert 0 < same < len(la)  # the re-scored pairs carry fp32's bits, the rest bf16's
    np.testing.assert_allclose(lb.to_numpy(), la.to_numpy(), rtol=refine["margin"])


def test_pool_timing_worked_example():
    """Two of three actors scored units in a 100 s run starting at t = 1000: a two units of
    30 s (from +10 and +65 s), b two of 40 s (from +20 and +59 s): 60 + 80 s over 3 x 100 s
    of pool time; first units at +10 and +20 s, last ones end at 95 and 99."""
    from aacray.stage import PoolWork

    work = PoolWork()
    for actor, setup, started, seconds in [("a", 2.0, 1065.0, 30.0), ("b", 3.0, 1020.0, 40.0),
                                           ("a", 2.0, 1010.0, 30.0), ("b", 3.0, 1059.0, 40.0)]:
        work.add(actor, setup, started, seconds)
    t = work.timing("score_matrix", 3, 1000.0, 1100.0, 0.5)
    assert t == {"ray_data_seconds": 100.0, "reduce_seconds": 0.5, "actors_used": 2, "actor_setup_seconds_max": 3.0,
                 "first_block_after_seconds": 15.0, "idle_at_end_seconds": 3.0, "block_seconds_total": 140.0,
                 "actor_busy_share": round(140 / 300, 4)}
    assert PoolWork().timing("score_matrix", 2, 0.0, 1.0, 0.0)["actor_busy_share"] == 0.0  # a resume with nothing left


def test_metrics_and_plots_written(scored):
    m = json.loads(open(os.path.join(scored, "metrics.json")).read())
    assert m["n_pairs"] == 8000 and m["n_audios"] == 40 and m["n_captions"] == 200
    # the timing, timed inside the two actors: their blocks fit in 2 x the Ray Data run,
    # which fits in the scoring phase; each waited at least its set-up for its first block
    t = m["timing"]
    assert 1 <= t["actors_used"] <= 2 and 0 < t["block_seconds_total"] <= 2 * t["ray_data_seconds"]
    assert t["actor_busy_share"] == pytest.approx(t["block_seconds_total"] / (2 * t["ray_data_seconds"]), abs=1e-3)
    assert t["ray_data_seconds"] + t["reduce_seconds"] <= m["score_seconds"] + 0.02
    assert t["first_block_after_seconds"] >= t["actor_setup_seconds_max"] / 2 > 0
    for k in ("t2a", "a2t_raw", "a2t_minmax"):
        assert {"R@1", "R@5", "R@10"} <= set(m[k]) and 0 <= m[k]["R@1"] <= m[k]["R@5"] <= m[k]["R@10"] <= 1
    assert 0 <= m["t2a"]["mAP@10"] <= 1
    for png in ("loss_curves.png", "loss_heatmap.png"):
        with open(os.path.join(scored, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    manifest = storage.read_manifest(scored)
    assert set(manifest["tables"]) == {"caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw", "scores"}


def test_external_caption_database(trained, extracted, tmp_path, ray_local):
    """A caption file with no audio_id: rankings, no metrics."""
    db = tmp_path / "db.csv"
    db.write_text("caption_id,text\nx1,a dog barks\nx2,rain falls then a bell rings\nx3,birds chirp while an engine hums\n")
    out = str(tmp_path / "ext")
    s = _score(trained, extracted, out, captions=str(db), caption_subsets=None, write_scores=False, plots=False, k=3)
    assert s["n_captions"] == 3 and "t2a" not in s
    t2a = storage.read_table(out, "topk_t2a").to_pandas()
    assert sorted(t2a["caption_id"].unique()) == ["x1", "x2", "x3"] and (t2a.groupby("caption_id").size() == 3).all()


@pytest.mark.parametrize(
    "csv, match",
    [
        ("caption_id,text\nx1,a dog\nx1,a cat\n", "duplicate caption ids"),
        ("caption_id,text,audio_id\nx1,a dog,not_an_audio.wav\n", "ground-truth audio is not in the index"),
        ("caption_id,text\n", "caption set .* is empty"),
        ("caption_id,text\nx1,?!...\n", "empty after normalisation"),
    ],
)
def test_bad_inputs_refused_before_scoring(trained, extracted, tmp_path, csv, match):
    db = tmp_path / "db.csv"
    db.write_text(csv)
    out = str(tmp_path / "bad")
    with pytest.raises(BadInputError, match=match):
        _score(trained, extracted, out, captions=str(db), caption_subsets=None)
    assert not os.path.exists(os.path.join(out, "_MANIFEST.json"))


def test_tokenizer_mismatch_refused(trained, tmp_path):
    import shutil

    from aacray.text import WordTokenizer

    bad = tmp_path / "ckpt"
    shutil.copytree(os.path.join(trained, "checkpoint"), bad)
    WordTokenizer.build(["completely different words here"]).save(bad / "tokenizer.json")
    with pytest.raises(ckpt_lib.CheckpointError, match="does not belong to this checkpoint"):
        ckpt_lib.load(str(bad))


# ----------------------------------------------------------------------------- candidates (issue 18)


def _tables(out: str) -> dict:
    """The four ranking tables, rows in a canonical order."""
    got = {}
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"):
        t = storage.read_table(out, name).to_pandas()
        key = [c for c in t.columns if c.endswith("_id")] + (["rank"] if "rank" in t.columns else [])
        got[name] = t.sort_values(key).reset_index(drop=True)
    return got


def _ranked(table, query: str, cand: str) -> dict[str, list[str]]:
    return {q: g.sort_values("rank")[cand].tolist() for q, g in table.groupby(query)}


@pytest.mark.parametrize("method", ["bm25", "profile"])
def test_shortlist_covering_every_pair_gives_the_exact_outputs(scored, trained, extracted, tmp_path, method):
    """K >= N and M, and the min/max sample every audio: shortlist mode's tables and metrics
    are exact mode's, to the bit (40 x 200)."""
    out = str(tmp_path / f"short_{method}")
    _score(trained, extracted, out, caption_block_size=64, candidates="shortlist", write_scores=False,
           shortlist={"method": method, "k": 200, "minmax_sample": 40, "beams": 2, "max_len": 8})
    exact, short = _tables(scored), _tables(out)
    for name in exact:
        for col in exact[name].columns:
            assert exact[name][col].tolist() == short[name][col].tolist(), f"{name}.{col}"
    me = json.loads(open(os.path.join(scored, "metrics.json")).read())
    ms = json.loads(open(os.path.join(out, "metrics.json")).read())
    for k in ("t2a", "a2t_raw", "a2t_minmax"):
        assert ms[k] == me[k]
    c = ms["candidates"]
    assert c["mode"] == "shortlist" and c["method"] == method and c["minmax_exact"]
    assert c["pairs"] == ms["n_pairs"] == 40 * 200 and c["t2a_gt_in_list"] == 1.0 and c["a2t_gt_in_list"] == 1.0
    d = storage.read_table(out, "descriptions").to_pandas()
    assert len(d) == 40 and all(1 <= len(b) <= 2 for b in d["beams"])


def test_pairs_file_is_scored_as_in_the_full_matrix(scored, trained, extracted, tmp_path):
    """A retriever's pairs file: every listed pair's loss is the full matrix's (within 2 ulps
    of fp32, most bit for bit), and the tables rank exactly the pairs scored: per caption its listed audios, per
    audio its listed captions, min/max over them (a full sort of the sparse scores)."""
    import pandas as pd

    full = storage.read_table(scored, "scores").to_pandas().set_index(["audio_id", "caption_id"])["loss"]
    pairs = full.index.to_frame(index=False).sample(frac=0.3, random_state=5)
    pairs = pd.concat([pairs, pairs.head(7)])  # repeated rows are scored once, and counted
    path = tmp_path / "pairs.parquet"
    pairs.to_parquet(path)
    out = str(tmp_path / "from_pairs")
    _score(trained, extracted, out, candidates=str(path), shortlist={"minmax_sample": 0, "k": 10}, caption_block_size=16)
    got = storage.read_table(out, "scores").to_pandas()
    assert not got.duplicated(["audio_id", "caption_id"]).any()
    listed = set(map(tuple, pairs[["audio_id", "caption_id"]].to_numpy().tolist()))
    scored_set = set(map(tuple, got[["audio_id", "caption_id"]].to_numpy().tolist()))
    assert listed <= scored_set  # plus the figures' audios and the heatmap corner
    ref = full.loc[list(zip(got["audio_id"], got["caption_id"], strict=True))].to_numpy()
    # the kernels may round a row differently in a forward of another row count (scorer.py)
    np.testing.assert_array_max_ulp(got["loss"].to_numpy(), ref.astype(np.float32), maxulp=2)
    assert (got["loss"].to_numpy() == ref).mean() > 0.95
    # the tables: a full sort of the pairs scored, by the retrieval rules
    got = got.astype({"loss": np.float64})
    t = _tables(out)
    stats = got.groupby("caption_id")["loss"].agg(["min", "max", "size"])
    s = t["caption_stats"].set_index("caption_id").loc[stats.index]
    assert s["loss_min"].tolist() == stats["min"].tolist() and s["loss_max"].tolist() == stats["max"].tolist()
    assert s["n_audios"].tolist() == stats["size"].tolist()
    exp_t2a = {c: g.sort_values(["loss", "audio_id"])["audio_id"].head(10).tolist() for c, g in got.groupby("caption_id")}
    assert _ranked(t["topk_t2a"], "caption_id", "audio_id") == exp_t2a
    exp_raw = {a: g.sort_values(["loss", "caption_id"])["caption_id"].head(10).tolist() for a, g in got.groupby("audio_id")}
    assert _ranked(t["topk_a2t_raw"], "audio_id", "caption_id") == exp_raw
    span = (got["caption_id"].map(stats["max"]) - got["caption_id"].map(stats["min"])).to_numpy()
    got["s"] = np.where(span > 0, (got["loss"] - got["caption_id"].map(stats["min"])).to_numpy() / np.where(span > 0, span, 1), 0.0)
    exp_mm = {a: g.sort_values(["s", "loss", "caption_id"])["caption_id"].head(10).tolist() for a, g in got.groupby("audio_id")}
    assert _ranked(t["topk_a2t"], "audio_id", "caption_id") == exp_mm
    m = json.loads(open(os.path.join(out, "metrics.json")).read())["candidates"]
    assert m["mode"] == "pairs_file" and m["listed_pairs"] == len(pairs) and m["repeated_pairs_scored_once"] == 7
    assert not m["minmax_exact"] and m["pairs"] == len(scored_set)


def test_pairs_file_naming_unknown_ids_is_refused(trained, extracted, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("audio_id,caption_id\nnot_an_audio,also_not_a_caption\n")
    out = str(tmp_path / "bad_pairs")
    with pytest.raises(BadInputError, match=r"1 audio\(s\) outside the index .*not_an_audio.* 1 caption\(s\)"):
        _score(trained, extracted, out, candidates=str(path))
    assert not os.path.exists(os.path.join(out, "_MANIFEST.json"))


def test_reindex_refuses_a_shortlist_output(trained, extracted, tmp_path):
    from aacray.config import ReindexConfig
    from aacray.reindex import run_reindex

    out = str(tmp_path / "short")
    _score(trained, extracted, out, candidates="shortlist", plots=False, shortlist={"k": 10, "minmax_sample": 8, "beams": 2, "max_len": 8})
    db = tmp_path / "new.csv"
    db.write_text("caption_id,text\nn1,a dog barks\n")
    with pytest.raises(BadInputError, match="candidates: shortlist.*reindex an exact index"):
        run_reindex(from_dict(ReindexConfig, {"output": out, "new_captions": str(db)}))
    # re-scoring reuses the descriptions: nothing is described again
    again = str(tmp_path / "again")
    _score(trained, extracted, again, candidates="shortlist", plots=False,
           shortlist={"k": 10, "minmax_sample": 8, "beams": 2, "max_len": 8, "descriptions": out})
    m = json.loads(open(os.path.join(again, "metrics.json")).read())["candidates"]
    assert m["described"] == 0 and m["reused_descriptions"] == 40
    assert _tables(again)["topk_t2a"].equals(_tables(out)["topk_t2a"])
