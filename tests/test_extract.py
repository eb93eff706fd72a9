"""Extraction: audio front-end facts, input kinds (Clotho, AudioCaps, manifest, s3://) and the
quarantine of bad items through the Ray Data pipeline."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from aacray import audio, storage
from aacray.config import ExtractConfig, from_dict
from aacray.corpora import list_audiocaps, list_clotho, list_manifest
from aacray.embeddings import read_embeddings
from aacray.encoder import n_frames_out

# ---------------------------------------------------------------------- front-end (no Ray)


def test_logmel_frames_and_a_tone_lands_in_its_mel_band():
    sr = audio.SAMPLE_RATE
    t = np.arange(10 * sr) / sr
    x = 0.5 * np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    lm = audio.log_mel(x)
    assert lm.shape == (1001, 224)
    # independent check of the band: centre frequencies of torchaudio's slaney filters
    import torchaudio

    filters = torchaudio.functional.melscale_fbanks(513, 50.0, 14000.0, 224, sr, norm="slaney", mel_scale="slaney")
    peak_bin = int(np.argmax(filters[int(round(1000 / (sr / 1024)))].numpy()))
    assert abs(int(lm[500].argmax()) - peak_bin) <= 1
    # dB of a power spectrum: halving the amplitude lowers every bin by ~6.02 dB
    lm_half = audio.log_mel(x / 2)
    assert abs(float((lm - lm_half)[100:900, peak_bin].mean()) - 6.0206) < 0.01


def test_resample_keeps_duration_and_pitch():
    sr = 44100
    t = np.arange(3 * sr) / sr
    y = audio.resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), sr)
    assert len(y) == 3 * audio.SAMPLE_RATE
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * audio.SAMPLE_RATE / len(y) - 440) < 1.0


def test_decode_mono_and_errors(tmp_path):
    st = np.stack([np.ones(1000), -np.ones(1000) * 0.5], axis=1).astype(np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, st, 16000, subtype="FLOAT")
    wav, sr = audio.decode(p.read_bytes())
    assert sr == 16000 and wav.shape == (1000,) and np.allclose(wav, 0.25)
    with pytest.raises(audio.AudioError, match="empty file"):
        audio.decode(b"", "e.wav")
    with pytest.raises(audio.AudioError, match="not a decodable audio file"):
        audio.decode(b"this is text, not audio", "t.wav")
    z = tmp_path / "z.wav"
    sf.write(z, np.zeros((0,), np.float32), 16000)
    with pytest.raises(audio.AudioError, match="zero-length"):
        audio.decode(z.read_bytes(), "z.wav")


# ---------------------------------------------------------------------- input kinds


def test_clotho_layout_read_through_aac_datasets(tiny_corpus):
    items = list_clotho(tiny_corpus, ["dev", "val", "eval"])
    assert [sum(i.subset == s for i in items) for s in ("development", "validation", "evaluation")] == [12, 4, 4]
    assert all(len(i.captions) == 5 and os.path.exists(i.uri) for i in items)
    rel = {"then", "and then", "followed by", "before", "after", "while", "as"}
    assert any(any(f" {w} " in c for w in rel) for i in items for c in i.captions)


def test_audiocaps_layout_read_through_aac_datasets(tmp_path):
    root = tmp_path / "ac"
    audio_dir = root / "AUDIOCAPS" / "audio_32000Hz" / "val"
    csv_dir = root / "AUDIOCAPS" / "csv_files_v1"
    audio_dir.mkdir(parents=True)
    csv_dir.mkdir(parents=True)
    rows = []
    for i, ytid in enumerate(["abcDEF12345", "xyzXYZ98765"]):
        sf.write(audio_dir / f"{ytid}_30.flac", np.zeros(32000, np.float32) + 0.01 * i, 32000)
        rows += [(100 * i + j, ytid, 30, f"caption {j} of clip {i}") for j in range(5)]
    with open(csv_dir / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    items = list_audiocaps(str(root), ["val"])
    assert sorted(i.audio_id for i in items) == ["abcDEF12345_30.flac", "xyzXYZ98765_30.flac"]
    assert all(len(i.captions) == 5 for i in items)


def _bad_manifest(folder, n_good=3) -> tuple[str, dict]:
    os.makedirs(folder, exist_ok=True)
    rows, expected = [], {}
    for i in range(n_good):
        p = os.path.join(folder, f"good{i}.wav")
        sf.write(p, 0.1 * np.random.default_rng(i).standard_normal(16000 * 2).astype(np.float32), 16000)
        rows.append((f"good{i}.wav", f"a dog barks {i}"))
    with open(os.path.join(folder, "empty.wav"), "wb"):
        pass
    expected["empty.wav"] = "empty file"
    sf.write(os.path.join(folder, "zero.wav"), np.zeros((0,), np.float32), 16000)
    expected["zero.wav"] = "zero-length"
    with open(os.path.join(folder, "good0.wav"), "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "corrupt.wav"), "wb") as f:
        f.write(data[:30])  # header cut short
    expected["corrupt.wav"] = "not a decodable audio file"
    with open(os.path.join(folder, "notes.wav"), "w") as f:
        f.write("not audio at all")
    expected["notes.wav"] = "not a decodable audio file"
    expected["missing.wav"] = "file not found"
    rows += [(name, "rain falls") for name in expected]
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audio", "caption"])
        w.writerows(rows)
    return manifest, expected


def _extract_cfg(manifest: str, out: str, **kw) -> ExtractConfig:
    d = {"input": {"kind": "manifest", "manifest": manifest}, "output": out, "encoder": {"name": "logmel_pool"},
         "actors": {"num_actors": 1, "batch_size": 4}}
    d.update(kw)
    return from_dict(ExtractConfig, d)


def test_bad_items_quarantined_and_threshold(tmp_path, ray_local):
    from aacray.extract import TooManyBadItems, run_extract

    manifest, expected = _bad_manifest(str(tmp_path / "audio"))
    out = str(tmp_path / "out")
    with pytest.raises(TooManyBadItems, match="5 of 8 items quarantined"):
        run_extract(_extract_cfg(manifest, out))
    # the good items were still processed and the report lists every bad one with its reason
    q = {r["audio_id"]: r["reason"] for r in json.loads(open(os.path.join(out, "quarantine.json")).read())}
    assert set(q) == set(expected)
    for name, why in expected.items():
        assert why in q[name], (name, q[name])
    es = read_embeddings(out)
    assert sorted(es.audio_ids) == ["good0.wav", "good1.wav", "good2.wav"]
    m = storage.read_manifest(out)
    assert m["extra"]["items_in"] == m["extra"]["written"] + m["extra"]["quarantined"] == 8
    # with a threshold that accepts it, the job succeeds
    s = run_extract(_extract_cfg(manifest, out, max_bad_fraction=0.7))
    assert s["written"] == 3 and s["quarantined"] == 5


def test_s3_manifest_and_output(tmp_path, s3_bucket, ray_local):
    """Audio, manifest and output all on s3:// (moto server)."""
    from aacray.extract import run_extract

    folder = tmp_path / "a"
    folder.mkdir()
    lines = ["audio,audio_id,subset,caption_1,caption_2"]
    for i in range(3):
        p = folder / f"c{i}.wav"
        sf.write(p, 0.2 * np.sin(np.arange(32000 * 2) * (0.05 + 0.01 * i)).astype(np.float32), 32000)
        storage.write_bytes(f"{s3_bucket}/audio/c{i}.wav", p.read_bytes())
        lines.append(f"c{i}.wav,clip{i},evaluation,a bell rings {i},a tone sounds")
    storage.write_text(f"{s3_bucket}/audio/manifest.csv", "\n".join(lines) + "\n")
    out = f"{s3_bucket}/runs/extract"
    s = run_extract(_extract_cfg(f"{s3_bucket}/audio/manifest.csv", out))
    assert s["written"] == 3
    es = read_embeddings(out, ["evaluation"])
    assert sorted(es.audio_ids) == ["clip0", "clip1", "clip2"] and es.frames[0].shape == (n_frames_out(audio.n_frames(64000)), 768)
    caps = storage.read_table(out, "captions")
    assert caps.num_rows == 6 and set(caps.column("audio_id").to_pylist()) == {"clip0", "clip1", "clip2"}


def test_non_utf8_manifest_is_named(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes("audio,caption\nx.wav,caf\xe9 noise\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        list_manifest(str(p))


def test_convnext_path_end_to_end(tiny_corpus, tmp_path, ray_local):
    """The default (ConvNeXt) encoder through Ray Data, then a tiny decoder and scoring."""
    from aacray.config import ScoreConfig, TrainConfig
    from aacray.extract import run_extract
    from aacray.scoring import run_score_matrix
    from aacray.train import run_train

    ext = str(tmp_path / "ext")
    s = run_extract(from_dict(ExtractConfig, {"input": {"kind": "clotho", "root": tiny_corpus, "subsets": ["dev", "val", "eval"]},
                                              "output": ext, "actors": {"num_actors": 1, "batch_size": 4}}))
    assert s["written"] == 20 and s["random_init_encoder"] is True
    prov = storage.read_manifest(ext)["extra"]["encoder"]
    assert prov["encoder"] == "convnext_tiny" and prov["random_init"] is True
    es = read_embeddings(ext)
    n_frames = {a: f.shape[0] for a, f in zip(es.audio_ids, es.frames, strict=True)}
    assert all(1 <= v <= 15 for v in n_frames.values())  # 2-4 s clips -> (T + 8) // 32 frames
    tr = str(tmp_path / "train")
    run_train(from_dict(TrainConfig, {"embeddings": ext, "output": tr, "epochs": 1, "batch_size": 4, "num_workers": 1,
                                      "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}}))
    sc = run_score_matrix(from_dict(ScoreConfig, {"checkpoint": tr, "audio": ext, "audio_subsets": ["evaluation"], "captions": ext,
                                                  "caption_subsets": ["evaluation"], "output": str(tmp_path / "score"), "plots": False}))
    assert sc["n_pairs"] == 4 * 20
