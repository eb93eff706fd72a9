"""Bad inputs (docs/bad_inputs.md lists every one with the test that backs it): odd audio
formats, NaN or over-long audio, broken indexes and caption files, foreign checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch
from faults import (
    CAPTIONS,
    TINY,
    write_extract_output,
    write_random_checkpoint,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _embed_files(paths: list[str], tmp: str) -> tuple[pa.Table, list[dict]]:
    """The extraction stages 2 and 3 in-process (the functions the Ray job maps):
    logmel_row per file, then one EncodeActor batch (weight-free logmel_pool encoder)."""
    from aacray.extract import EncodeActor, logmel_row

    rows = [
        logmel_row({"audio_id": os.path.basename(p), "subset": "s", "uri": p}, max_seconds=30.0)
        for p in paths
    ]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    actor = EncodeActor("logmel_pool", None, tmp, "float32", False)
    return actor(batch), rows


@pytest.mark.parametrize("sr, channels", [(8000, 2), (96000, 6), (44100, 1)])
def test_unusual_sample_rate_and_channels_are_mixed_down_and_resampled(tmp_path, sr, channels):
    """8 kHz stereo and 96 kHz 6-channel files are accepted: mixed down to mono (mean of
    the channels) and resampled to 32 kHz. Their embedding equals that of the same audio
    converted beforehand to a 32 kHz mono file, within 1e-4, and the original rate is
    recorded as provenance."""
    import torchaudio

    t = np.arange(int(2.0 * sr)) / sr
    freqs = [300.0 * (c + 1) for c in range(channels)]  # every channel different, below 4 kHz
    x = np.stack(
        [0.3 * np.sin(2 * np.pi * f * t) * (1 + c) / channels for c, f in enumerate(freqs)], axis=1
    )
    src = str(tmp_path / f"src_{sr}_{channels}.wav")
    sf.write(src, x.astype(np.float32), sr, subtype="PCM_16")
    # the user's own conversion: decode, mean of the channels, resample, 32 kHz mono float WAV
    data, _ = sf.read(src, dtype="float32", always_2d=True)
    mono = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)), sr, 32000).numpy()
    conv = str(tmp_path / "converted.wav")
    sf.write(conv, mono, 32000, subtype="FLOAT")
    first = str(tmp_path / "first_channel_only.wav")  # what a buggy mix-down would see
    sf.write(
        first,
        torchaudio.functional.resample(torch.from_numpy(data[:, 0].copy()), sr, 32000).numpy(),
        32000,
        subtype="FLOAT",
    )

    table, rows = _embed_files([src, conv, first], str(tmp_path))
    assert all(r["error"] == "" for r in rows)
    from aacray.embeddings import _chunk_frames

    e_src, e_conv, e_first = _chunk_frames(table.column("embedding").chunk(0), 768)
    assert table.column("sample_rate").to_pylist() == [sr, 32000, 32000]
    assert e_src.shape == e_conv.shape and e_src.shape[0] == table.column("n_frames")[0].as_py()
    np.testing.assert_allclose(e_src, e_conv, rtol=0, atol=1e-4)
    if channels > 1:
        assert np.abs(e_src - e_first).max() > 1.0  # the test would see a first-channel-only bug


def test_audio_with_nan_samples_or_too_long_is_quarantined(tmp_path):
    """Two more audio files the extraction quarantines (the stage function's reason)."""
    from aacray.extract import logmel_row

    nan = str(tmp_path / "nan.wav")
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    long = str(tmp_path / "long.wav")
    sf.write(long, np.zeros(16000 * 4, np.float32), 16000)
    r = logmel_row({"audio_id": "nan.wav", "subset": "s", "uri": nan}, max_seconds=30.0)
    assert r["error"] == f"{nan}: samples contain NaN or inf"
    r = logmel_row({"audio_id": "long.wav", "subset": "s", "uri": long}, max_seconds=3.0)
    assert (
        r["error"]
        == f"{long}: 4.0 s is longer than max_seconds=3.0; cut it or raise max_seconds in the config"
    )


def _score_inputs(
    tmp_path, frames: list[np.ndarray], caps: list[tuple], ids: list[str] | None = None
):
    from aacray.scoring import load_inputs
    from aacray.text import WordTokenizer

    ids = ids or [f"clip{i}" for i in range(len(frames))]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * len(ids), frames, caps)
    tok = WordTokenizer.build(CAPTIONS)
    return load_inputs(ext, None, ext, None, tok, 65), tok


def _ok_frames(n: int = 3) -> list[np.ndarray]:
    return [np.ones((4, 768), np.float32) * (i + 1) for i in range(n)]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("inf", "audio clip1: embedding holds NaN or inf"),
        ("nan", "audio clip1: embedding holds NaN or inf"),
        ("no_frames", "audio clip1: no frames"),
        ("duplicate_audio", "audio clip0: duplicate audio_id"),
        ("empty_caption", "captions empty after normalisation: ['clip1#0']"),
        ("null_caption", "captions empty after normalisation: ['clip1#0']"),
    ],
)
def test_score_matrix_refuses_bad_index_or_captions(tmp_path, damage, message):
    """score_matrix's input check (it runs before any actor starts) names the bad item."""
    from aacray.errors import BadInputError

    frames = _ok_frames()
    ids = [f"clip{i}" for i in range(3)]
    caps = [(f"{a}#0", "evaluation", "a dog barks", a) for a in ids]
    if damage in ("inf", "nan"):
        frames[1][2, 5] = np.inf if damage == "inf" else np.nan
    elif damage == "no_frames":
        frames[1] = np.zeros((0, 768), np.float32)
    elif damage == "duplicate_audio":
        ids[2] = "clip0"
        caps = caps[:2]
    elif damage in ("empty_caption", "null_caption"):
        caps[1] = ("clip1#0", "evaluation", "" if damage == "empty_caption" else None, "clip1")
    with pytest.raises(
        BadInputError, match="score_matrix refused its inputs, nothing was scored"
    ) as e:
        _score_inputs(tmp_path, frames, caps, ids)
    assert message in str(e.value)


def test_out_of_vocabulary_only_caption_is_scored_and_counted(tmp_path):
    """score_matrix keeps a caption made only of unknown words (a query is a query): it
    becomes [bos, unk, unk, eos] and the job counts it (captions_with_unknown_words in
    metrics.json, checked in test_s3_endpoint_lost_while_score_matrix_commits)."""
    caps = [
        ("c0", "evaluation", "a dog barks", "clip0"),
        ("c1", "evaluation", "zyzzyva quux!", "clip1"),
    ]
    (audio, cids, tokens, gts, texts), tok = _score_inputs(tmp_path, _ok_frames(2), caps)
    assert tokens[1] == [tok.bos_id, tok.unk_id, tok.unk_id, tok.eos_id]
    assert tok.unk_id not in tokens[0]


def test_training_refuses_empty_caption_and_inf_embedding():
    """The train_decoder input check for two rows not covered by test_train.py."""
    from aacray.config import TrainConfig, from_dict
    from aacray.embeddings import CAPTION_SCHEMA, EmbeddingSet
    from aacray.errors import BadInputError
    from aacray.train import prepare

    ok = np.ones((3, 768), np.float32)
    bad = ok.copy()
    bad[0, 0] = -np.inf
    train = EmbeddingSet(["a1", "inf"], ["development"] * 2, [ok, bad])
    val = EmbeddingSet(["v1"], ["validation"], [ok])
    rows = [
        ("a1#0", "development", "a dog barks", "a1"),
        ("a1#1", "development", "", "a1"),
        ("inf#0", "development", "a bell rings", "inf"),
        ("v1#0", "validation", "a dog barks", "v1"),
    ]
    caps = pa.table(
        [pa.array([r[k] for r in rows], pa.string()) for k in range(4)], schema=CAPTION_SCHEMA
    )
    with pytest.raises(BadInputError) as e:
        prepare(from_dict(TrainConfig, {"model": TINY}), train, val, caps)
    assert "audio inf: embedding holds NaN or inf" in str(e.value)
    assert "caption a1#1: empty after normalisation: ''" in str(e.value)


def test_wrong_embedding_width_refused(tmp_path):
    """Embeddings made by another encoder (width 512): every reader refuses them by name."""
    from aacray.embeddings import BadEmbeddingError, read_embeddings

    frames = [np.ones((4, 512), np.float32)] * 2
    ext = write_extract_output(
        str(tmp_path / "ext"),
        ["x0", "x1"],
        ["evaluation"] * 2,
        frames,
        [("x0#0", "evaluation", "a dog barks", "x0")],
        width=512,
    )
    with pytest.raises(
        BadEmbeddingError,
        match=r"embedding width is 512, expected 768 \(was it made by another encoder\?\)",
    ):
        read_embeddings(ext)


def test_non_utf8_caption_csv_named(tmp_path):
    from aacray.embeddings import read_captions

    p = tmp_path / "db.csv"
    p.write_bytes("caption_id,text\nx1,un caf\xe9 bruyant\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"db\.csv: not UTF-8 \(byte 25\); save the caption file as UTF-8"
    ):
        read_captions(str(p))


def test_duplicate_audio_ids_in_manifest_refused(tmp_path):
    from aacray.corpora import list_items

    p = tmp_path / "m.csv"
    p.write_text(
        "audio,audio_id,caption\na.wav,clip,a dog barks\nb.wav,clip,rain falls\nc.wav,other,a bell\n"
    )
    with pytest.raises(
        ValueError, match=r"duplicate audio ids in the input: \['clip'\]; audio ids must be unique"
    ):
        list_items("manifest", "", [], str(p))


class Smuggled:
    """Unpickling this runs code (here: it would create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_decoder_checkpoint_with_pickled_code_refused(tmp_path):
    """model.pt holding an object whose unpickling runs code: refused (weights_only=True),
    and the code never runs."""
    from aacray import checkpoint as ckpt_lib

    folder = str(tmp_path / "ckpt")
    write_random_checkpoint(folder, CAPTIONS)
    state = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    marker = str(tmp_path / "pwned")
    state["extra"] = Smuggled(marker)
    torch.save(state, os.path.join(folder, "model.pt"))
    with pytest.raises(
        ckpt_lib.CheckpointError,
        match=r"model\.pt: refused: only plain tensors and numbers are loaded \(weights_only=True\)",
    ):
        ckpt_lib.load(folder)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("same_size", [False, True])
def test_tokenizer_of_another_vocabulary_refused(tmp_path, same_size):
    """tokenizer.json from another vocabulary next to model.pt: CheckpointError, whether or
    not the two vocabularies happen to have the same size (before this test, a same-size
    foreign vocabulary was accepted and silently mapped words to the wrong embeddings)."""
    from aacray import checkpoint as ckpt_lib
    from aacray.text import WordTokenizer

    folder = str(tmp_path / "ckpt")
    write_random_checkpoint(folder, CAPTIONS)
    n_words = ckpt_lib.load(folder)[1].vocab_size - 4  # pad/bos/eos/unk
    other = [f"w{i}" for i in range(n_words if same_size else n_words + 3)]
    WordTokenizer.build([" ".join(other)]).save(os.path.join(folder, "tokenizer.json"))
    assert (
        WordTokenizer.load(os.path.join(folder, "tokenizer.json")).vocab_size == n_words + 4
    ) == same_size
    with pytest.raises(
        ckpt_lib.CheckpointError, match="the tokenizer does not belong to this checkpoint"
    ):
        ckpt_lib.load(folder)


