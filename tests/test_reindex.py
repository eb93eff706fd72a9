"""Reindex: incremental updates equal a full recompute; reruns, crashes, locks, versions.

Fixtures build, once per module, an extract_embeddings-shaped output (30 evaluation + 6
validation audios of 6 to 14 random frames, 5 captions each from the demo vocabulary) and
a seeded, randomly initialised 2-layer width-32 decoder saved as a checkpoint: equality
with a full recompute needs no trained model, and this skips audio decoding and Ray Train.
Index A is 30 audios x 147 captions; adding the 3 held-out captions must give
score_matrix's output on 30 x 150, and then adding the 6 validation audios with their 30
captions score_matrix's output on 36 x 180.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from aacray import lock, reindex, stage, storage, versions
from aacray.config import ReindexConfig, ScoreConfig, from_dict, load_config
from aacray.embeddings import CAPTION_SCHEMA, EMB_DIM, embedding_table, read_captions
from aacray.errors import BadInputError
from aacray.index import VERSION_TABLES, compare_outputs, load_score_matrix
from aacray.retrieval import rank_a2t_minmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELD = 3  # captions held out of index A (2% of 150)
WORDS = {
    "src": ["a dog", "a bell", "rain", "birds", "a siren", "an engine", "a man", "a car"],
    "verb": ["barks", "rings", "falls", "chirp", "howls", "hums", "speaks", "idles"],
    "rel": ["then", "while", "before", "after", "as"],
}


def _synthetic_extract(out: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids, subsets, frames, caps = [], [], [], []
    for subset, n in (("evaluation", 30), ("validation", 6)):
        for i in range(n):
            aid = f"{subset[:3]}_{i:03d}.wav"
            ids.append(aid)
            subsets.append(subset)
            frames.append(rng.normal(size=(int(rng.integers(6, 15)), EMB_DIM)).astype(np.float32))
            for j in range(5):
                a, b = rng.integers(0, 8, size=2)
                text = f"{WORDS['src'][a]} {WORDS['verb'][a]} {WORDS['rel'][rng.integers(0, 5)]} {WORDS['src'][b]} {WORDS['verb'][b]}"
                caps.append((f"{aid}#{j}", subset, text, aid))
    storage.write_table(out, "embeddings", embedding_table(ids, subsets, frames, ["synthetic"] * len(ids), [32000] * len(ids)))
    cols = list(zip(*caps, strict=True))
    storage.write_table(out, "captions", pa.table([pa.array(c, pa.string()) for c in cols], schema=CAPTION_SCHEMA))
    storage.commit_output(out, "extract_embeddings", {}, ["embeddings", "captions"])


def _random_checkpoint(out: str, texts: list[str]) -> None:
    import torch

    from aacray import checkpoint as ckpt_lib
    from aacray.decoder import CaptionDecoder, DecoderConfig
    from aacray.text import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer.build(texts)
    model = CaptionDecoder(DecoderConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64), tok.vocab_size, tok.pad_id)
    ckpt_lib.save(out, model, tok, "synthetic: true\n", epoch=0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("re")
    ext, ckpt = str(root / "extract"), str(root / "ckpt")
    _synthetic_extract(ext, seed=5)
    _random_checkpoint(ckpt, read_captions(ext).column("text").to_pylist())
    caps = read_captions(ext, ["evaluation"])
    ids = caps.column("caption_id").to_pylist()
    held = set(ids[:: len(ids) // HELD][:HELD])
    base_caps, new_caps = str(root / "base_captions.parquet"), str(root / "new_captions.parquet")
    pq.write_table(caps.filter(pc.invert(pc.is_in(caps.column("caption_id"), pa.array(sorted(held))))), base_caps)
    pq.write_table(caps.filter(pc.is_in(caps.column("caption_id"), pa.array(sorted(held)))), new_caps)
    return {"root": root, "extract": ext, "ckpt": ckpt, "base_caps": base_caps, "new_caps": new_caps}


def _score(p, out, captions, subsets=("evaluation",), caption_subsets=None, **kw) -> str:
    from aacray.scoring import run_score_matrix

    cfg = {"checkpoint": p["ckpt"], "audio": p["extract"], "audio_subsets": list(subsets), "captions": captions,
           "caption_subsets": caption_subsets, "output": out, "write_scores": True, "plots": False, "k": 10,
           "caption_block_size": 40, "actors": {"num_actors": 1, "num_cpus": 1}}
    cfg.update(kw)
    run_score_matrix(from_dict(ScoreConfig, cfg))
    return out


def _reindex(out, **kw) -> dict:
    cfg = {"output": out, "caption_block_size": 40, "actors": {"num_actors": 1, "num_cpus": 1}}
    cfg.update(kw)
    return reindex.run_reindex(from_dict(ReindexConfig, cfg))


@pytest.fixture(scope="module")
def full_a(pipeline):
    return _score(pipeline, str(pipeline["root"] / "full_a"), pipeline["extract"], caption_subsets=["evaluation"])


@pytest.fixture(scope="module")
def index_a(pipeline):
    """Index A (version 0) and the same after adding the held-out captions with actors."""
    out = str(pipeline["root"] / "index_a")
    _score(pipeline, out, pipeline["base_caps"])
    v0 = str(pipeline["root"] / "index_a_v0")
    shutil.copytree(out, v0)
    res = _reindex(out, new_captions=pipeline["new_caps"])
    return {"out": out, "v0": v0, "res": res}


@pytest.fixture(scope="module")
def small(index_a, pipeline):
    """Index A's version 0 as score_matrix with write_scores: false leaves it: no scores
    table in the manifest (a copy whose manifest drops the table; saves a scoring run)."""
    out = str(pipeline["root"] / "small")
    shutil.copytree(index_a["v0"], out)
    m = storage.read_json(os.path.join(out, "_MANIFEST.json"))
    del m["tables"]["scores"]
    shutil.rmtree(os.path.join(out, "scores"))
    storage.write_json(os.path.join(out, "_MANIFEST.json"), m)
    return out


def _copy(src, tmp_path, name="idx") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _csv(tmp_path, rows, name="new.csv") -> str:
    f = tmp_path / name
    f.write_text("caption_id,text\n" + "".join(f"{c},{t}\n" for c, t in rows))
    return str(f)


def _job(name: str):
    """A script of jobs/ as a module (its `main` and helpers), without running it."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", os.path.join(ROOT, "jobs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_tables(a: str, b: str) -> dict:
    cmp = compare_outputs(a, b)
    print(f"\nreindex vs full recompute: {cmp}")
    return cmp


# ----------------------------------------------------------------------------- exactness


def test_add_captions_equals_full_recompute(index_a, full_a, pipeline):
    res = index_a["res"]
    assert res["status"] == "committed" and res["version"] == 1 and not res["inline"]
    assert res["new_captions"] == HELD and res["pairs_scored"] == 30 * HELD
    assert res["pairs_full"] == 30 * 150 and res["scored_share"] == pytest.approx(HELD / 150)
    # new captions meet the same audio chunks as in score_matrix: the same bits
    cmp = _same_tables(index_a["out"], full_a)
    assert cmp == {name: "identical" for name in cmp}
    got = json.loads(open(os.path.join(index_a["out"], "versions/0001/metrics.json")).read())
    want = json.loads(open(os.path.join(full_a, "metrics.json")).read())
    for key in ("t2a", "a2t_raw", "a2t_minmax", "n_audios", "n_captions", "n_pairs"):
        assert got[key] == want[key], key
    assert got["reindex"]["pairs_scored"] == 90
    # its timing, from the units timed inside the one actor: they fit in the pool's run,
    # which is score_seconds; the actor waited at least half its set-up for its first unit
    t = got["reindex"]["timing"]
    assert t["actors_used"] == 1 and t["ray_data_seconds"] == got["reindex"]["score_seconds"]
    assert 0 < t["block_seconds_total"] <= t["ray_data_seconds"]
    assert t["actor_busy_share"] == pytest.approx(t["block_seconds_total"] / t["ray_data_seconds"], abs=1e-3)
    assert t["first_block_after_seconds"] >= t["actor_setup_seconds_max"] / 2 > 0
    assert got["reindex"]["timing"] == res["timing"]
    m = storage.read_manifest(index_a["out"])
    assert m["version"] == 1 and m["extra"]["pairs_scored"] == 90
    assert m["tables"]["scores"]["rows"] == 30 * 150


def test_version_zero_untouched(index_a):
    """Version 0's files are not rewritten: its own manifest still reads the old index."""
    root = storage.read_json(os.path.join(index_a["out"], "_MANIFEST.json"))
    assert root == storage.read_json(os.path.join(index_a["v0"], "_MANIFEST.json"))
    t = storage.read_table(index_a["v0"], "caption_stats")
    assert t.num_rows == 150 - HELD
    assert storage.read_table(index_a["out"], "caption_stats").num_rows == 150
    assert versions.current_version(index_a["out"]) == 1 and versions.current_version(index_a["v0"]) == 0


@pytest.fixture(scope="module")
def index_b(index_a, pipeline):
    """Index A version 1 + the 6 validation audios and their 30 captions (inline path)."""
    out = str(pipeline["root"] / "index_b")
    shutil.copytree(index_a["out"], out)
    res = _reindex(out, new_audio=pipeline["extract"], new_audio_subsets=["validation"],
                   new_captions=pipeline["extract"], new_caption_subsets=["validation"], inline_max_pairs=10**6)
    full = _score(pipeline, str(pipeline["root"] / "full_b"), pipeline["extract"],
                  subsets=("evaluation", "validation"), caption_subsets=["evaluation", "validation"])
    return {"out": out, "res": res, "full": full}


def test_add_audios_and_captions_equals_full_recompute(index_b):
    res = index_b["res"]
    assert res["status"] == "committed" and res["version"] == 2 and res["inline"]
    assert (res["new_audios"], res["new_captions"]) == (6, 30)
    assert res["pairs_scored"] == 36 * 30 + 6 * 150  # new captions x all, new audios x old captions
    assert res["pairs_full"] == 36 * 180
    cmp = _same_tables(index_b["out"], index_b["full"])
    # ids and ranks equal; losses bit-identical or within 1e-6 (min-max scores within that
    # divided by the loss span, `compare_outputs`):
    # new audios x old captions run in smaller audio batches than in the full job, and the
    # full job scores the old pairs in larger ones than version 0 did
    assert set(cmp.values()) <= {"identical", "allclose"}, cmp
    # inline, the driver is the one "actor": its set-up and units fall inside the run
    t = res["timing"]
    assert t["actors_used"] == 1 and t["ray_data_seconds"] == res["score_seconds"]
    assert t["actor_setup_seconds_max"] <= t["first_block_after_seconds"] + 0.01
    assert 0 < t["block_seconds_total"] <= t["ray_data_seconds"] - t["first_block_after_seconds"] + 0.01
    got = json.loads(open(os.path.join(index_b["out"], "versions/0002/metrics.json")).read())
    want = json.loads(open(os.path.join(index_b["full"], "metrics.json")).read())
    for key in ("t2a", "a2t_raw", "a2t_minmax", "n_audios", "n_captions", "n_pairs"):
        assert got[key] == want[key], key


def test_minmax_lists_recomputed_from_scores(index_b):
    """The min-max lists of version 2 are the dense reference ranking of its own scores."""
    L, aids, cids = load_score_matrix(index_b["out"])
    assert L.shape == (36, 180)
    ref = rank_a2t_minmax(L.astype(np.float64), aids, cids, 10).lists()
    mm = storage.read_table(index_b["out"], "topk_a2t").to_pandas()
    assert {a: g.sort_values("rank")["caption_id"].tolist() for a, g in mm.groupby("audio_id")} == ref


def _edit_table(out: str, name: str, edit) -> None:
    """Apply `edit(df)` to the first file the current version lists for table `name`."""
    path = os.path.join(out, storage.read_manifest(out)["tables"][name]["files"][0])
    schema = pq.read_schema(path)
    df = pq.read_table(path).to_pandas()
    edit(df)
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)


def _swap_first_two(cand: str):
    def edit(df):
        df.loc[[0, 1], cand] = df.loc[[1, 0], cand].to_numpy()  # ranks 1 and 2 of the first list
    return edit


def _next_float(col: str):
    def edit(df):  # one float32 step up: within compare_outputs' atol for losses below 8
        df.loc[0, col] = np.nextafter(df[col].to_numpy()[0], np.float32(np.inf))
    return edit


def _bump(col: str, by: float):
    def edit(df):
        df.loc[0, col] += by
    return edit


@pytest.mark.parametrize("table,edit,verdict", [
    ("scores", _bump("loss", 1e-3), "differs"),
    ("scores", _next_float("loss"), "allclose"),  # last-bit noise is not a difference
    ("caption_stats", _bump("loss_max", 1e-3), "differs"),
    ("caption_stats", _bump("n_audios", 1), "differs"),
    ("topk_t2a", _swap_first_two("audio_id"), "differs"),
    ("topk_a2t_raw", _swap_first_two("caption_id"), "differs"),
    ("topk_a2t", _bump("score", 1e-3), "differs"),
])
def test_compare_outputs_reports_each_difference(index_a, tmp_path, table, edit, verdict):
    """The equality check the exactness tests rely on can answer "differs", table by table."""
    out = _copy(index_a["out"], tmp_path)
    assert compare_outputs(index_a["out"], out) == {name: "identical" for name in (*VERSION_TABLES, "scores")}
    _edit_table(out, table, edit)
    cmp = compare_outputs(index_a["out"], out)
    assert cmp == {name: (verdict if name == table else "identical") for name in (*VERSION_TABLES, "scores")}


def test_reindex_on_s3_equals_local(index_a, pipeline, s3_bucket):
    """score_matrix writes index A to S3 and reindex adds the held-out captions there (lock,
    shared shards, version pointer on S3): the tables equal the same update on local disk."""
    out = _score(pipeline, s3_bucket + "/index_a", pipeline["base_caps"])
    res = _reindex(out, new_captions=pipeline["new_caps"], inline_max_pairs=10**6)
    assert res["status"] == "committed" and res["version"] == 1 and res["pairs_scored"] == 30 * HELD
    assert versions.current_version(out) == 1
    cmp = _same_tables(out, index_a["out"])
    assert cmp == {name: "identical" for name in cmp}
    assert _reindex(out, new_captions=pipeline["new_caps"])["status"] == "unchanged"
    assert not storage.exists(storage.join(out, lock.LOCK))


def test_memory_guard_refuses_before_any_actor(small, tmp_path, monkeypatch):
    """An actor that cannot hold the audio index is refused in the driver, before any pool
    starts and before anything is written."""
    out = _copy(small, tmp_path)

    def no_pool(*a, **k):
        raise AssertionError("an actor pool was started")

    monkeypatch.setattr(stage, "map_actors", no_pool)
    with pytest.raises(BadInputError, match=r"reindex: one actor needs .*embeddings.*kv_cache.*forward.* \(actors.memory_gb\)\. Ways out"):
        _reindex(out, new_captions=_csv(tmp_path, [("s5", "a bell rings")]),
                 actors={"num_actors": 1, "num_cpus": 1, "memory_gb": 0.001})
    assert not os.path.exists(os.path.join(out, "versions")) and not os.path.exists(os.path.join(out, "captions_added"))
    assert not os.path.exists(os.path.join(out, lock.LOCK)) and versions.current_version(out) == 0


# ----------------------------------------------------------------------------- idempotence


def test_rerun_changes_nothing(index_a, pipeline):
    before = sorted(os.listdir(os.path.join(index_a["out"], "versions")))
    res = _reindex(index_a["out"], new_captions=pipeline["new_caps"])
    assert res["status"] == "unchanged" and res["version"] == 1 and "applied" in res["reason"]
    assert sorted(os.listdir(os.path.join(index_a["out"], "versions"))) == before
    assert not os.path.exists(os.path.join(index_a["out"], lock.LOCK))


def test_known_ids_are_skipped(index_a, pipeline, tmp_path):
    """Another file (another run key) holding only captions already indexed: nothing new."""
    caps = read_captions(pipeline["new_caps"]).to_pandas()
    f = _csv(tmp_path, list(zip(caps["caption_id"], caps["text"], strict=True))[::-1])
    out = _copy(index_a["out"], tmp_path)
    res = _reindex(out, new_captions=f)
    assert res["status"] == "unchanged" and res["skipped_captions"] == HELD and res["reason"] == "nothing new"
    assert versions.current_version(out) == 1
    bad = _csv(tmp_path, [(caps["caption_id"][0], "a totally different caption")], "bad.csv")
    with pytest.raises(BadInputError, match="another text"):
        _reindex(out, new_captions=bad)


def test_submission_id(tmp_path, capsys):
    f = _csv(tmp_path, [("x1", "a dog barks")])
    cfg_file = tmp_path / "re.yaml"
    cfg_file.write_text(f"output: {tmp_path}/out\nnew_captions: {f}\n")
    cfg = load_config(ReindexConfig, [str(cfg_file)])
    sid = reindex.submission_id(cfg)
    assert sid.startswith("reindex-") and len(sid) == len("reindex-") + 16
    assert _job("reindex").main(["--submission-id", str(cfg_file)]) == 0
    assert capsys.readouterr().out.strip() == sid
    assert reindex.submission_id(load_config(ReindexConfig, [str(cfg_file), f"output={tmp_path}/other"])) != sid
    _csv(tmp_path, [("x1", "a dog barks"), ("x2", "rain falls")])  # same file, new content
    assert reindex.submission_id(cfg) != sid


def test_demo_config_loads():
    cfg = load_config(ReindexConfig, ["configs/reindex_demo.yaml"])
    assert cfg.output == "runs/demo/score_matrix" and cfg.new_captions == "configs/demo_new_captions.csv"
    caps = read_captions(cfg.new_captions)
    assert caps.num_rows == 10 and len(set(caps.column("caption_id").to_pylist())) == 10


# ----------------------------------------------------------------------------- scores table


def test_adding_audio_needs_scores(small, pipeline, tmp_path):
    out = _copy(small, tmp_path)
    with pytest.raises(BadInputError, match="no scores table.*write_scores: true"):
        _reindex(out, new_audio=pipeline["extract"], new_audio_subsets=["validation"])
    assert not os.path.exists(os.path.join(out, "versions")) and not os.path.exists(os.path.join(out, lock.LOCK))
    # captions alone need no scores; the new version then has none either
    res = _reindex(out, new_captions=_csv(tmp_path, [("s5", "a bell rings")]), inline_max_pairs=10**6)
    assert res["status"] == "committed" and res["pairs_scored"] == 30
    m = storage.read_manifest(out)
    assert "scores" not in m["tables"] and m["tables"]["caption_stats"]["rows"] == 148


def test_bf16_refined_index(index_a, pipeline, tmp_path):
    """An index scored with precision bf16-refined: new captions are refined too, so adding
    them gives the lists the fp32 index got (floats to fp32's last bit); adding audios is refused
    (its min-max lists would be recomputed from stored bf16 losses)."""
    out = _copy(index_a["v0"], tmp_path)
    cfg_file = os.path.join(out, "config.yaml")
    text = open(cfg_file).read()
    assert "precision: fp32" in text
    open(cfg_file, "w").write(text.replace("precision: fp32", "precision: bf16-refined"))
    with pytest.raises(BadInputError, match="bf16-refined.*Add captions alone"):
        _reindex(out, new_audio=pipeline["extract"], new_audio_subsets=["validation"])
    res = _reindex(out, new_captions=pipeline["new_caps"])
    assert res["status"] == "committed"
    cmp = compare_outputs(index_a["out"], out)
    print(f"\nbf16-refined reindex vs fp32 reindex: {cmp}")
    for name in ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"):
        assert cmp[name] in ("identical", "allclose"), (name, cmp)
    refine = res["refine"]  # the new pairs went through refinement
    assert 0 < refine["rescored_pairs"] <= res["pairs_scored"] and refine["within_margin"]


def test_caption_ids_from_text_when_absent(small, tmp_path):
    out = _copy(small, tmp_path)
    f = tmp_path / "noid.csv"
    f.write_text("text\na siren howls\nA siren howls!\n")  # the same caption after normalisation
    res = _reindex(out, new_captions=str(f), inline_max_pairs=10**6)
    assert res["new_captions"] == 1 and res["skipped_captions"] == 1
    ids = storage.read_table(out, "caption_stats").column("caption_id").to_pylist()
    assert reindex.text_caption_id("a siren howls") in ids


# ----------------------------------------------------------------------------- crash safety


def test_interrupted_run_leaves_previous_version(small, tmp_path, monkeypatch):
    out = _copy(small, tmp_path)
    before = storage.read_table(out, "topk_a2t").to_pandas()
    new = _csv(tmp_path, [("s5", "a bell rings"), ("s6", "a man speaks")])

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between the version's manifest and the pointer")

    monkeypatch.setattr(versions, "set_current", crash)
    with pytest.raises(KeyboardInterrupt):
        _reindex(out, new_captions=new, inline_max_pairs=10**6)
    monkeypatch.undo()
    # the finished-but-unpublished version is invisible; readers see version 0 as before
    assert os.path.exists(os.path.join(out, "versions/0001/_MANIFEST.json"))
    assert versions.current_version(out) == 0
    assert storage.read_table(out, "topk_a2t").to_pandas().equals(before)
    assert not os.path.exists(os.path.join(out, lock.LOCK))
    res = _reindex(out, new_captions=new, inline_max_pairs=10**6)
    assert res["status"] == "committed" and res["version"] == 1
    assert storage.read_table(out, "caption_stats").num_rows == 149


def test_rewritten_root_voids_old_versions(small, pipeline, tmp_path):
    out = _copy(small, tmp_path)
    _reindex(out, new_captions=_csv(tmp_path, [("s5", "a bell rings")]), inline_max_pairs=10**6)
    assert storage.read_table(out, "caption_stats").num_rows == 148
    db = tmp_path / "two.csv"
    db.write_text("caption_id,text\nt1,a dog barks\nt2,birds chirp\n")
    _score(pipeline, out, str(db), write_scores=False)  # score_matrix again on the same folder
    assert versions.current_version(out) == 0
    assert sorted(storage.read_table(out, "caption_stats").column("caption_id").to_pylist()) == ["t1", "t2"]
    res = _reindex(out, new_captions=_csv(tmp_path, [("t3", "rain falls")], "t3.csv"), inline_max_pairs=10**6)
    assert res["version"] == 1 and res["parent_version"] == 0  # the voided version 1 is replaced
    assert sorted(storage.read_table(out, "caption_stats").column("caption_id").to_pylist()) == ["t1", "t2", "t3"]
    assert storage.read_table(out, "captions_added").column("caption_id").to_pylist() == ["t3"]
    assert sorted(os.listdir(os.path.join(out, "captions_added"))) == ["v0001-part-00000.parquet"]


def test_retention_keeps_what_current_lists(small, tmp_path):
    out = _copy(small, tmp_path)
    for i in range(3):
        _reindex(out, new_captions=_csv(tmp_path, [(f"r{i}", "a dog barks loudly")], f"r{i}.csv"),
                 keep_versions=1, inline_max_pairs=10**6)
    assert versions.list_versions(out) == [3]
    added = storage.read_table(out, "captions_added").column("caption_id").to_pylist()
    assert added == ["r0", "r1", "r2"]  # rows added by versions 1 and 2 outlive their folders
    assert storage.read_table(out, "caption_stats").num_rows == 150


# ----------------------------------------------------------------------------- the lock


def test_concurrent_run_refused(small, tmp_path):
    out = _copy(small, tmp_path)
    held = lock.Lock(out, "other-run")
    with held:
        with pytest.raises(lock.LockError, match=f"pid {os.getpid()}.*other-run"):
            _reindex(out, new_captions=_csv(tmp_path, [("s5", "a bell rings")]))
        assert versions.current_version(out) == 0
    assert not os.path.exists(os.path.join(out, lock.LOCK))


# ----------------------------------------------------------------------------- estimated min/max


def test_minmax_sample(index_a, pipeline, tmp_path):
    out = _copy(index_a["out"], tmp_path)
    new = _csv(tmp_path, [("e1", "a dog barks then a bell rings"), ("e2", "rain falls while birds chirp")])
    res = _reindex(out, new_captions=new, minmax_sample=5, minmax_seed=3, inline_max_pairs=10**6)
    assert res["minmax_estimated_captions"] == 2
    sample = storage.read_manifest(out)["extra"]["index"]["minmax_sample"]
    assert sample["size"] == 5 and len(sample["audio_ids"]) == 5
    L, aids, cids = load_score_matrix(out)
    rows = [aids.index(a) for a in sample["audio_ids"]]
    stats = storage.read_table(out, "caption_stats").to_pandas().set_index("caption_id")
    for c in ("e1", "e2"):
        col = L[rows, cids.index(c)]
        assert stats.loc[c, "loss_min"] == col.min() and stats.loc[c, "loss_max"] == col.max()
        assert stats.loc[c, "n_audios"] == 5
    # every later run must use the same sample
    with pytest.raises(BadInputError, match="same sample"):
        _reindex(out, new_captions=_csv(tmp_path, [("e3", "a bell rings")], "e3.csv"), minmax_sample=6)


def test_minmax_estimate_eval():
    rng = np.random.default_rng(0)
    L = rng.normal(size=(12, 30)).astype(np.float32)
    aids = [f"a{i:02d}" for i in range(12)]
    cids = [f"c{j:02d}" for j in range(30)]
    gt = {c: aids[j % 12] for j, c in enumerate(cids)}
    L[[j % 12 for j in range(30)], range(30)] -= 3  # own audio scores best
    bench = _job("bench_reindex")
    rows = bench.minmax_estimate_eval(L, aids, cids, gt, sizes=(3, 12), draws=2)
    assert [r["sample"] for r in rows] == ["raw", "all", "3", "12"]
    assert rows[-1]["R"] == rows[1]["R"]  # a sample of every audio is exact
    assert all(0 <= r <= 1 for row in rows for r in row["R"])
    assert "all audios (exact)" in bench.format_minmax_eval(rows, 12, 30, 2)
    assert reindex.draw_minmax_sample(aids, 4, 7) == reindex.draw_minmax_sample(aids[::-1], 4, 7)


def test_scored_pairs_follow_the_change():
    units = reindex.plan_units("v0001", ["n1", "n2"], [[1, 5, 2], [1, 2]], [f"o{i}" for i in range(100)],
                               [[1, 4, 2]] * 100, n_all=50, n_new=5, block=8)
    cap = [u for u in units if u.kind == "cap"]
    aud = [u for u in units if u.kind == "aud"]
    assert sum(len(u.caption_ids) for u in cap) == 2 and sum(len(u.caption_ids) for u in aud) == 100
    assert cap[0].caption_ids == ["n2", "n1"]  # shortest first
    assert len({u.file for u in units}) == len(units) and all(u.file.startswith("v0001-") for u in units)
