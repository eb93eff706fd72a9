"""Bad inputs the jobs refuse before any work, as the user sees them (docs/bad_inputs.md).

Each case runs the job the way `jobs/NAME.py` does (`aacray.cli.run_job` with the shipped
config and key=value overrides) on small data the test writes itself, with Ray's start
replaced by a failure: a refusal that came after Ray started would fail the test. Checked
per case: the exit code (2: nothing ran) or the exception, the message's key parts (the
item and the fix), and that the job wrote nothing to its output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from faults import CAPTIONS, write_extract_output, write_random_checkpoint

from aacray import extract, runtime, scoring, storage, train
from aacray.cli import EXIT_BAD_INPUT, run_job
from aacray.config import ExtractConfig, ScoreConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCORE_YAML = str(ROOT / "configs" / "score_demo.yaml")
EXTRACT_YAML = str(ROOT / "configs" / "extract_demo.yaml")
TRAIN_YAML = str(ROOT / "configs" / "train_demo.yaml")


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started: the job should have refused its inputs before any Ray work")


@pytest.fixture
def job(monkeypatch, capsys):
    """run(cfg_cls, argv) -> (exit code, what the job printed on stderr), Ray forbidden.

    Every job starts Ray through `stage.start_ray` (train_decoder: `train._start_ray`), which
    looks `init_ray` up in aacray.runtime when called: the patch replaces it there, and is
    undone after the test.
    """
    monkeypatch.setattr(runtime, "init_ray", _no_ray)

    def run(cfg_cls, argv):
        fn = {ScoreConfig: scoring.run_score_matrix, ExtractConfig: extract.run_extract, TrainConfig: train.run_train}[cfg_cls]
        capsys.readouterr()
        rc = run_job(cfg_cls, fn, argv)
        return rc, capsys.readouterr().err

    return run


@pytest.fixture
def index(tmp_path):
    """An extract output (3 audios, 2 captions each) and a random tiny checkpoint."""
    rng = np.random.default_rng(0)
    ids = [f"clip{i}" for i in range(3)]
    frames = [rng.standard_normal((4 + i, 768)).astype(np.float32) for i in range(3)]
    caps = [(f"{a}#{j}", "evaluation", CAPTIONS[(i + j) % 4], a) for i, a in enumerate(ids) for j in range(2)]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 3, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    return ext, ckpt


def _score_argv(tmp_path, ext, ckpt, *extra):
    return [SCORE_YAML, f"checkpoint={ckpt}", f"audio={ext}", f"captions={ext}", f"output={tmp_path / 'out'}", *extra]


def _fake_output(uri: str, job_name: str, tables: list[str]) -> str:
    """A committed output of another job: its manifest records that job's name."""
    storage.begin_output(uri, tables)
    for t in tables:
        storage.write_table(uri, t, pa.table({"caption_id": ["c0"], "loss": [1.0]}))
    storage.commit_output(uri, job_name, {}, tables)
    return uri


def _embeddings_output(uri: str, embedding: pa.Array | None) -> str:
    """An 'extract_embeddings' output whose embeddings table has this embedding column."""
    cols = {"audio_id": ["a0"], "subset": ["evaluation"], "n_frames": pa.array([1], pa.int32())}
    if embedding is not None:
        cols["embedding"] = embedding
    storage.begin_output(uri, ["embeddings", "captions"])
    storage.write_table(uri, "embeddings", pa.table(cols))
    storage.commit_output(uri, "extract_embeddings", {}, ["embeddings"])
    return uri


# ----------------------------------------------------------------------- extract_embeddings


def test_manifest_without_an_audio_column(job, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,caption\nclip.wav,a dog barks\n")
    out = tmp_path / "out"
    rc, err = job(ExtractConfig, [EXTRACT_YAML, "input.kind=manifest", f"input.manifest={m}", f"output={out}"])
    assert rc == EXIT_BAD_INPUT
    assert f"error: ValueError: {m}: a manifest needs a column 'audio' (got ['path', 'caption'])" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, subset, message",
    [
        ("clotho", "train", r"unknown Clotho subset 'train' in input\.subsets; use one of \['dev', 'eval', 'val'\] "
                            r"\(dev = development, val = validation, eval = evaluation\)"),
        ("clotho", "dev", r"Clotho subset 'dev' is not prepared under input\.root='{root}': expected "
                          r"{root}/CLOTHO_v2\.1/clotho_audio_files/development/ and "
                          r"{root}/CLOTHO_v2\.1/clotho_csv_files/clotho_captions_development\.csv; fix input\.root, "
                          r"or download Clotho there \(`aac-datasets-download --root {root} clotho`\)"),
        ("audiocaps", "dev", r"unknown AudioCaps subset 'dev' in input\.subsets; use one of \['test', 'train', 'val'\]"),
        ("audiocaps", "val", r"AudioCaps subset 'val' is not prepared under input\.root='{root}': expected "
                             r"{root}/AUDIOCAPS/audio_32000Hz/val/ and {root}/AUDIOCAPS/csv_files_v1/val\.csv"),
    ],
)
def test_unknown_or_unprepared_subset(job, tmp_path, kind, subset, message):
    root = tmp_path / "empty_root"
    root.mkdir()
    out = tmp_path / "out"
    rc, err = job(ExtractConfig, [EXTRACT_YAML, f"input.kind={kind}", f"input.root={root}",
                                  f"input.subsets=[{subset}]", f"output={out}"])
    assert rc == EXIT_BAD_INPUT, err
    assert re.search(message.format(root=re.escape(str(root))), err), err
    assert not out.exists()


# ----------------------------------------------------------------------------- score_matrix


def test_caption_file_without_a_text_column(job, tmp_path, index):
    ext, ckpt = index
    c = tmp_path / "db.csv"
    c.write_text("caption_id,caption\nx1,a dog barks\n")
    rc, err = job(ScoreConfig, _score_argv(tmp_path, ext, ckpt, f"captions={c}", "caption_subsets=null"))
    assert rc == EXIT_BAD_INPUT
    assert f"error: ValueError: {c}: a caption file needs a column 'text' (got ['caption_id', 'caption'])" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "embedding, shown",
    [
        (pa.array([[[0.5] * 768]], pa.list_(pa.list_(pa.float32()))), "list<element: list<element: float>>"),
        (pa.array([[["x"] * 768]], pa.list_(pa.list_(pa.string(), 768))), "list<element: fixed_size_list<element: string>[768]>"),
        (pa.array([b"\x00" * 8]), "binary"),
    ],
    ids=["variable_length_frames", "strings", "binary"],
)
def test_wrong_embedding_column_type(job, tmp_path, index, embedding, shown):
    bad = _embeddings_output(str(tmp_path / "bad"), embedding)
    ext, ckpt = index
    rc, err = job(ScoreConfig, _score_argv(tmp_path, ext, ckpt, f"audio={bad}"))
    assert rc == EXIT_BAD_INPUT
    assert (
        f"error: BadEmbeddingError: {bad}: column 'embedding' has type {shown}, expected "
        "list<fixed_size_list<float, 768>> (frames x 768, float32 or float16); write the table with "
        "aacray.embeddings.embedding_table, or re-run extract_embeddings"
    ) in err
    assert not (tmp_path / "out").exists()


def test_embeddings_table_without_an_embedding_column(job, tmp_path, index):
    ext, ckpt = index
    bad = _embeddings_output(str(tmp_path / "bad"), None)
    rc, err = job(ScoreConfig, _score_argv(tmp_path, ext, ckpt, f"audio={bad}"))
    assert rc == EXIT_BAD_INPUT
    assert (
        f"error: BadEmbeddingError: {bad}: the embeddings table has no column 'embedding' (it has "
        "['audio_id', 'subset', 'n_frames']); write the table with aacray.embeddings.embedding_table"
    ) in err


def test_empty_audio_index(job, tmp_path, index):
    """Two ways: subsets that select nothing, and an index with no rows at all."""
    ext, ckpt = index
    db = tmp_path / "db.csv"
    db.write_text("caption_id,text\nx1,a dog barks\n")
    rc, err = job(ScoreConfig, _score_argv(tmp_path, ext, ckpt, f"captions={db}", "caption_subsets=null",
                                           "audio_subsets=[development]"))
    assert rc == EXIT_BAD_INPUT
    assert "error: BadInputError: score_matrix refused its inputs, nothing was scored:" in err
    assert f"the audio index {ext} (subsets ['development']) is empty" in err
    empty = write_extract_output(str(tmp_path / "empty"), [], [], [], [])
    rc, err = job(ScoreConfig, _score_argv(tmp_path, empty, ckpt, f"captions={db}", "caption_subsets=null",
                                           "audio_subsets=null"))
    assert rc == EXIT_BAD_INPUT
    assert f"the audio index {empty} (subsets None) is empty" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table", ["embeddings", "captions"])
def test_shard_listed_in_the_manifest_but_deleted(job, tmp_path, index, table):
    """IncompleteOutputError is not a bad-input error to run_job: it reaches the user as a
    traceback whose last line is this message."""
    from aacray.storage import IncompleteOutputError

    ext, ckpt = index
    shard = storage.table_files(ext, table)[0]
    os.remove(shard)
    with pytest.raises(IncompleteOutputError) as e:
        job(ScoreConfig, _score_argv(tmp_path, ext, ckpt))
    assert str(e.value) == (
        f"{ext}: table {table!r} lists {shard} in its _MANIFEST.json, but that file is missing "
        "(deleted or moved after the job committed): restore it, or re-run the job that made this output"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arg, other_job, tables",
    [
        ("audio", "score_matrix", ["caption_stats", "topk_a2t", "topk_a2t_raw", "topk_t2a"]),
        ("captions", "score_matrix", ["caption_stats", "topk_a2t", "topk_a2t_raw", "topk_t2a"]),
        ("audio", "caption", ["captions"]),
        ("audio", "train_decoder", []),
    ],
)
def test_another_jobs_output_given_as_input(job, tmp_path, index, arg, other_job, tables):
    ext, ckpt = index
    other = _fake_output(str(tmp_path / other_job), other_job, tables)
    rc, err = job(ScoreConfig, _score_argv(tmp_path, ext, ckpt, f"{arg}={other}"))
    assert rc == EXIT_BAD_INPUT
    name = "embeddings" if arg == "audio" else "captions"
    alt = " or a CSV/Parquet caption file with a 'text' column" if arg == "captions" else ""
    assert (
        f"error: BadInputError: {other} is a {other_job} output, not an extract_embeddings output: it has no "
        f"{name!r} table (its _MANIFEST.json lists {sorted(tables)}); give an extract_embeddings output{alt}"
    ) in err
    assert not (tmp_path / "out").exists()


def test_score_matrix_output_given_to_train_decoder(job, tmp_path):
    other = _fake_output(str(tmp_path / "score"), "score_matrix", ["topk_t2a"])
    rc, err = job(TrainConfig, [TRAIN_YAML, f"embeddings={other}", f"output={tmp_path / 'out'}"])
    assert rc == EXIT_BAD_INPUT
    assert f"{other} is a score_matrix output, not an extract_embeddings output" in err
    assert not (tmp_path / "out").exists()


def test_missing_table_named_by_storage_with_the_job():
    """storage.table_files, under every reader: the job that made the output is named."""
    from aacray.errors import BadInputError

    manifest = {"job": "train_decoder", "tables": {}, "extra": {}}
    with pytest.raises(BadInputError) as e:
        storage.table_files("/x/model", "embeddings", manifest)
    assert str(e.value) == (
        "/x/model has no table 'embeddings': it is a train_decoder output (its _MANIFEST.json says so "
        "and lists []); give the output of the job that writes 'embeddings'"
    )


# ---------------------------------------------------------------------------------- configs


def _bad_value_named(err: str, key: str, value: int) -> bool:
    return bool(re.search(rf"\b{re.escape(key)}\b", err)) and bool(
        re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", err)
    )


@pytest.mark.parametrize(
    "cfg_cls, yaml_path, key, value",
    [
        (ScoreConfig, SCORE_YAML, "k", 0),
        (ScoreConfig, SCORE_YAML, "k", -1),
        (ScoreConfig, SCORE_YAML, "caption_block_size", 0),
        (ScoreConfig, SCORE_YAML, "caption_block_size", -64),
        (ScoreConfig, SCORE_YAML, "actors.num_actors", 0),
        (ScoreConfig, SCORE_YAML, "actors.num_actors", -2),
        (ExtractConfig, EXTRACT_YAML, "actors.num_actors", 0),
    ],
)
def test_config_values_of_zero_or_below(job, tmp_path, cfg_cls, yaml_path, key, value):
    out = tmp_path / "out"
    rc, err = job(cfg_cls, [yaml_path, f"{key}={value}", f"output={out}"])
    assert rc == EXIT_BAD_INPUT
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"config error: {yaml_path}: "), line
    assert ">= 1" in line, line
    assert _bad_value_named(line, key.split(".")[-1], value), f"{key}={value} not named: {line}"
    assert not out.exists()


def test_bad_value_check_has_teeth():
    assert _bad_value_named("k must be >= 1, got k=0", "k", 0)
    assert not _bad_value_named("k must be >= 1, got k=10", "k", 0)
    assert not _bad_value_named("caption_block_size must be >= 1, got 0", "k", 0)
