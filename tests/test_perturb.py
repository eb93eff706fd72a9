"""Perturbations: matching, Replace / Invert on hand-written sentences, accuracies, the Ray job."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from aacray.perturb import (
    SETS,
    accuracy_table,
    build_perturbations,
    caption_rng,
    find_relations,
    format_table,
    perturb_caption,
)


def by_set(text, **kw):
    out: dict[str, list[str]] = {}
    for p in perturb_caption(text, **kw):
        out.setdefault(p.set, []).append(p.perturbed)
    return out


# --------------------------------------------------------------------------------------
# Pure text
# --------------------------------------------------------------------------------------


def test_paper_example_then():
    got = by_set("a man speaks then a dog barks")
    assert got["invert_seq"] == ["a dog barks then a man speaks"]
    assert got["replace_seq2sup"] == ["a man speaks as a dog barks", "a man speaks while a dog barks"]
    assert set(got) == {"invert_seq", "replace_seq2sup"}  # "then" is neither BAT nor sup


def test_before_after_test():
    got = by_set("x before y")
    assert got["replace_bat"] == ["x after y"]
    assert by_set("x after y")["replace_bat"] == ["x before y"]
    assert got["invert_bat"] == ["y before x"]
    assert got["invert_seq"] == ["y before x"]  # before is also a sequence word
    assert got["replace_seq2sup"] == ["x as y", "x while y"]


def test_multi_word_relation_is_one_unit():
    got = by_set("a dog barks and then a bell rings")
    assert got["replace_seq2sup"] == ["a dog barks as a bell rings", "a dog barks while a bell rings"]
    assert got["invert_seq"] == ["a bell rings and then a dog barks"]
    rels = find_relations("a dog barks and then a bell rings".split())
    assert [(r.start, r.end, r.phrase) for r in rels] == [(3, 5, "and then")]
    rels = find_relations("birds chirp followed by a car".split())
    assert [(r.start, r.end, r.phrase) for r in rels] == [(2, 4, "followed by")]


def test_sup2seq_gives_every_sequence_phrase():
    got = by_set("a man speaks while a dog barks")
    assert got["replace_sup2seq"] == [
        "a man speaks followed by a dog barks",
        "a man speaks and then a dog barks",
        "a man speaks then a dog barks",
        "a man speaks before a dog barks",
        "a man speaks after a dog barks",
    ]
    assert got["invert_sup"] == ["a dog barks while a man speaks"]
    assert "replace_bat" not in got and "invert_seq" not in got


def test_whole_words_only_and_normalisation():
    assert perturb_caption("thenceforth the weather afterwards whilst aside") == []
    # punctuation and case are normalised away before matching
    got = by_set("A man speaks, THEN a dog barks.")
    assert got["invert_seq"] == ["a dog barks then a man speaks"]


def test_no_relation_word_gives_nothing():
    assert perturb_caption("a dog barks loudly in the distance") == []
    assert perturb_caption("") == []
    assert build_perturbations(["c1"], ["rain falls on a roof"], ["a1"]) == []


def test_invert_bounded_by_neighbouring_relations():
    got = by_set("a man speaks then a dog barks while it rains")
    assert got["invert_seq"] == ["a dog barks then a man speaks while it rains"]
    assert got["invert_sup"] == ["a man speaks then it rains while a dog barks"]
    # one perturbed caption per occurrence: two "then"s give two inversions
    got = by_set("a b then c d then e")
    assert got["invert_seq"] == ["c d then a b then e", "a b then e then c d"]


def test_invert_needs_two_propositions_and_identical_results_are_dropped():
    assert "invert_seq" not in by_set("then a dog barks")
    assert "invert_seq" not in by_set("a dog barks then")
    # swapping equal propositions changes nothing: no perturbation
    assert "invert_sup" not in by_set("a dog barks while a dog barks")


def test_set_selection_and_errors():
    got = perturb_caption("x before y", sets=["replace_bat"])
    assert [(p.set, p.perturbed, p.relation, p.replacement, p.position) for p in got] == [
        ("replace_bat", "x after y", "before", "after", 1)
    ]
    with pytest.raises(ValueError, match="bat"):
        perturb_caption("x before y", sets=["bat"])
    with pytest.raises(ValueError, match="rng"):
        perturb_caption("x before y", alternatives="random")


def test_random_alternatives_are_seeded_and_drawn_from_the_set():
    text = "a man speaks while a dog barks as a car passes"
    all_alts = {p.perturbed for p in perturb_caption(text, ["replace_sup2seq"])}
    a = build_perturbations(["c"], [text], ["x"], ["replace_sup2seq"], "random", seed=3)
    b = build_perturbations(["c"], [text], ["x"], ["replace_sup2seq"], "random", seed=3)
    assert [r[2] for r in a] == [r[2] for r in b]
    assert len(a) == 2  # one per occurrence
    assert {r[2].perturbed for r in a} <= all_alts
    # a caption's draw does not depend on the other captions
    c = build_perturbations(["z", "c"], ["x then y", text], ["x", "x"], ["replace_sup2seq"], "random", seed=3)
    assert [r[2] for r in c if r[0] == "c"] == [r[2] for r in a]
    # different seeds draw differently somewhere
    draws = {caption_rng(s, "c").choice(range(1000)) for s in range(5)}
    assert len(draws) > 1


# --------------------------------------------------------------------------------------
# Accuracies
# --------------------------------------------------------------------------------------


def test_accuracy_on_a_hand_made_loss_table():
    t = pa.table(
        {
            "set": ["replace_bat"] * 4 + ["invert_seq"] * 3,
            "caption_id": ["c1", "c1", "c2", "c3", "c1", "c4", "c4"],
            "loss_original": [1.0, 1.0, 2.0, 3.0, 1.0, 5.0, 5.0],
            "loss_perturbed": [1.5, 0.5, 2.0, 4.0, 2.0, 6.0, 4.0],
            "oov_original": [0, 0, 0, 1, 0, 0, 0],
            "oov_perturbed": [0, 1, 0, 1, 0, 2, 0],
        }
    )
    got = accuracy_table(t, ["replace_bat", "invert_seq", "replace_sup2seq"])
    # replace_bat: higher = [T, F, F (tie), T] -> 2/4; in-vocab rows 0 and 2 -> 1/2
    assert got["replace_bat"] == {
        "accuracy": 0.5,
        "n_perturbed": 4,
        "n_higher": 2,
        "n_captions": 3,
        "n_perturbed_with_oov": 2,
        "accuracy_in_vocab": 0.5,
        "n_in_vocab": 2,
        "n_higher_in_vocab": 1,
    }
    # invert_seq: higher = [T, T, F] -> 2/3; in-vocab rows 0 and 2 -> 1/2
    assert got["invert_seq"]["accuracy"] == pytest.approx(2 / 3)
    assert got["invert_seq"]["n_higher"] == 2
    assert got["invert_seq"]["n_captions"] == 2
    assert got["invert_seq"]["n_perturbed_with_oov"] == 1
    assert got["invert_seq"]["accuracy_in_vocab"] == 0.5
    assert got["replace_sup2seq"]["accuracy"] is None and got["replace_sup2seq"]["n_perturbed"] == 0
    table = format_table({"sets": got, "audio_pos_enc": True})
    assert "audio_pos_enc=True" in table
    assert "0.500" in table and "0.667" in table


# --------------------------------------------------------------------------------------
# The Ray job against direct pair_loss
# --------------------------------------------------------------------------------------

CAPTIONS = [
    ("c1", "a1", "A man speaks, then a dog barks."),
    ("c2", "a1", "a dog barks before a car passes"),
    ("c3", "a2", "rain falls while birds chirp"),
    ("c4", "a2", "a bell rings and then a door slams"),
    ("c5", "a3", "wind blows after a car passes by"),
    ("c6", "a3", "water runs in a sink"),  # no relation
    ("c7", "b1", "a dog barks as rain falls"),  # another subset: not used
]


def write_tiny_inputs(root, audio_pos_enc):
    """An extract_embeddings output (3 + 1 audios, 7 captions) and a tiny checkpoint."""
    from aacray import checkpoint as ckpt_lib
    from aacray import storage
    from aacray.config import TrainConfig, dump_yaml
    from aacray.decoder import CaptionDecoder, DecoderConfig
    from aacray.embeddings import CAPTION_SCHEMA, embedding_table
    from aacray.text import WordTokenizer

    rng = np.random.default_rng(0)
    ids, subsets = ["a1", "a2", "a3", "b1"], ["evaluation"] * 3 + ["development"]
    frames = [rng.standard_normal((n, 768)).astype(np.float32) for n in (5, 3, 7, 4)]
    emb = os.path.join(root, "extract")
    storage.write_table(emb, "embeddings", embedding_table(ids, subsets, frames, ["x"] * 4, [32000] * 4))
    sub = {"a1": "evaluation", "a2": "evaluation", "a3": "evaluation", "b1": "development"}
    caps = pa.table(
        {
            "caption_id": [c[0] for c in CAPTIONS],
            "subset": [sub[c[1]] for c in CAPTIONS],
            "text": [c[2] for c in CAPTIONS],
            "audio_id": [c[1] for c in CAPTIONS],
        },
        schema=CAPTION_SCHEMA,
    )
    storage.write_table(emb, "captions", caps)
    storage.commit_output(emb, "extract_embeddings", {}, ["embeddings", "captions"])
    # "followed" stays out of the vocabulary: the sup2seq "followed by" captions hold an OOV word
    tok = WordTokenizer.build(
        [c[2] for c in CAPTIONS] + ["as after before"], min_freq=1
    )
    assert tok.oov_count("followed by while") == 1  # "by" is in c5, "while" in c3
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32, audio_pos_enc=audio_pos_enc)
    model = CaptionDecoder(cfg, tok.vocab_size, tok.pad_id).eval()
    ckpt = os.path.join(root, "ckpt")
    ckpt_lib.save(ckpt, model, tok, dump_yaml(TrainConfig()), epoch=1)
    return emb, ckpt, dict(zip(ids, frames, strict=True))


def test_job_losses_equal_direct_pair_loss(tmp_path, ray_local, capsys):
    from aacray import checkpoint as ckpt_lib
    from aacray import storage
    from aacray.config import PerturbConfig, from_dict
    from aacray.decoder import pair_loss
    from aacray.perturb import run_perturb

    emb, ckpt, frames = write_tiny_inputs(str(tmp_path), audio_pos_enc=True)
    out = str(tmp_path / "perturb")
    cfg = from_dict(
        PerturbConfig,
        {
            "checkpoint": ckpt, "audio": emb, "audio_subsets": ["evaluation"], "captions": emb,
            "caption_subsets": ["evaluation"], "output": out, "scorer": {"pairs_per_batch": 5},
            "actors": {"num_actors": 1, "num_cpus": 1, "batch_size": 4}, "ray": {"num_cpus": 2},
        },
    )
    res = run_perturb(cfg)
    printed = capsys.readouterr().out
    assert "seq2sup" in printed and "audio_pos_enc=True" in printed

    pairs = storage.read_table(out, "pairs").to_pylist()
    expected = build_perturbations(
        [c[0] for c in CAPTIONS[:6]], [c[2] for c in CAPTIONS[:6]], [c[1] for c in CAPTIONS[:6]]
    )
    assert [(r["caption_id"], r["set"], r["perturbed"]) for r in pairs] == [
        (c, p.set, p.perturbed) for c, _, p in expected
    ]
    assert not any(r["caption_id"] in ("c6", "c7") for r in pairs)

    model, tok, _ = ckpt_lib.load(ckpt)
    with torch.inference_mode():
        def direct(audio_id, text):
            x = torch.as_tensor(frames[audio_id])[None]
            return float(pair_loss(model, x, None, torch.tensor([tok.encode(text)]), tok.pad_id)[0])

        for r in pairs:
            torch.testing.assert_close(r["loss_original"], direct(r["audio_id"], r["original"]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["loss_perturbed"], direct(r["audio_id"], r["perturbed"]), rtol=1e-5, atol=1e-5)
            assert r["higher"] == (r["loss_perturbed"] > r["loss_original"])
            assert r["oov_perturbed"] == tok.oov_count(r["perturbed"])
    assert any(r["oov_perturbed"] > 0 for r in pairs)  # "followed by" is out of vocabulary

    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["audio_pos_enc"] is True
    assert metrics["n_perturbed"] == len(pairs)
    assert storage.read_manifest(out)["tables"]["pairs"]["rows"] == len(pairs)
    for s in SETS:
        rows = [r for r in pairs if r["set"] == s]
        iv = [r for r in rows if r["oov_original"] == 0 and r["oov_perturbed"] == 0]
        m = metrics["sets"][s]
        assert m["n_perturbed"] == len(rows)
        assert m["n_perturbed_with_oov"] == sum(r["oov_perturbed"] > 0 for r in rows)
        if rows:
            assert m["accuracy"] == pytest.approx(np.mean([r["higher"] for r in rows]))
        if iv:
            assert m["accuracy_in_vocab"] == pytest.approx(np.mean([r["higher"] for r in iv]))
    assert res["accuracy"] == {s: metrics["sets"][s]["accuracy"] for s in SETS}


def test_job_refuses_captions_of_unknown_audios(tmp_path):
    from aacray.config import PerturbConfig, from_dict
    from aacray.errors import BadInputError
    from aacray.perturb import run_perturb

    emb, ckpt, _ = write_tiny_inputs(str(tmp_path), audio_pos_enc=False)
    cfg = from_dict(
        PerturbConfig,
        {"checkpoint": ckpt, "audio": emb, "audio_subsets": ["evaluation"], "captions": emb,
         "caption_subsets": None, "output": str(tmp_path / "p")},
    )
    with pytest.raises(BadInputError, match="c7"):
        run_perturb(cfg)
    assert not os.path.exists(tmp_path / "p" / "_MANIFEST.json")


def test_memory_guard_refuses_before_any_actor_starts(tmp_path, monkeypatch):
    from faults import CAPTIONS, write_extract_output, write_random_checkpoint

    from aacray import checkpoint as ckpt_lib
    from aacray import perturb, stage, storage
    from aacray.config import PerturbConfig, from_dict
    from aacray.embeddings import read_embeddings
    from aacray.errors import BadInputError
    from aacray.perturb import actor_memory, run_perturb
    from aacray.scorer import scorer_memory

    # 8 audios x 64 frames: 1.5 MiB of embeddings alone, over actors.memory_gb=0.001
    rng = np.random.default_rng(0)
    ids = [f"a{i}" for i in range(8)]
    frames = [rng.standard_normal((64 - i, 768)).astype(np.float32) for i in range(8)]
    caps = [(f"{a}#0", "evaluation", CAPTIONS[i % 4], a) for i, a in enumerate(ids)]
    emb = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 8, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    out = str(tmp_path / "p")
    storage.commit_output(out, "perturb", {}, [])  # an earlier output: must stay untouched

    def no_actors(*a, **k):
        raise AssertionError("an actor pool was started")

    monkeypatch.setattr(stage, "map_actors", no_actors)
    # actors.memory_gb is the limit: the guard asks Ray nothing, so no Ray needs to start
    monkeypatch.setattr(stage, "start_ray", lambda *a, **k: None)
    cfg = from_dict(PerturbConfig, {
        "checkpoint": ckpt, "audio": emb, "captions": emb, "output": out,
        "actors": {"num_actors": 1, "num_cpus": 1, "batch_size": 16, "memory_gb": 0.001},
    })
    with pytest.raises(BadInputError, match=r"perturb: one actor needs .*actors\.memory_gb") as e:
        run_perturb(cfg)
    assert "Ways out" in str(e.value) and "audio_subsets" in str(e.value)
    assert storage.read_manifest(out)["job"] == "perturb"  # not invalidated
    assert not os.path.exists(os.path.join(out, "config.yaml"))

    # the estimate is scorer_memory's for N = 8 audios of S <= 64 frames, this checkpoint's
    # decoder, parameter count and vocabulary, the configured precision and a CPU forward of
    # pairs_per_batch listed pairs of the plan's longest caption; no N x block loss matrix
    # (a batch of pairs holds B losses)
    model, _, _ = ckpt_lib.load(ckpt)
    pairs = perturb.plan_perturb(cfg).pairs
    need = actor_memory(cfg, read_embeddings(emb, None), model, pairs)
    n_params = sum(p.numel() for p in model.parameters())
    longest = max(len(t) for _, t in pairs.pairs)
    assert need == scorer_memory(8, 64, model.cfg, n_params, "fp32", 0, vocab_size=model.classifier.out_features,
                                 max_tokens=longest, pairs_per_batch=cfg.scorer.pairs_per_batch, gpu=False)
    assert need["forward"] > 0 and need["block"] == 0
    assert need["embeddings"] == 8 * 64 * 768 * 4 and need["total"] > 0.001 * 2**30
