"""Audio-caption corpora: Clotho / AudioCaps roots through aac-datasets, user manifests,
and the built-in demo corpus.

- Clotho and AudioCaps are listed through aac-datasets' own classes with download=False,
  so the demo corpus and real Clotho take the same code path. aac-datasets reads local
  roots only; for audio on s3:// use a manifest.
- A manifest is a CSV or Parquet with a column `audio` (a URI, relative paths resolved
  against the manifest's folder), optional `audio_id` (default: the file name), `subset`
  (default "manifest") and captions in `caption` or `caption_1`..`caption_5`.
- The demo corpus is synthetic but not trivial: seven sound-event kinds, each drawn with
  random pitch/rate, one or two events per clip, in sequence or overlapping, described with
  the relation words of the paper's Table 4 (then, and then, followed by, before, after,
  while, as). It is written in the real Clotho v2.1 on-disk layout, deterministic from a
  seed.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

from aacray import storage

# Clotho subset names in aac-datasets -> folder / CSV suffix names
CLOTHO_SUBSETS = {"dev": "development", "val": "validation", "eval": "evaluation"}
AUDIOCAPS_SUBSETS = {"train": "train", "val": "val", "test": "test"}


@dataclass
class AudioItem:
    audio_id: str
    subset: str
    uri: str
    captions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def list_clotho(root: str, subsets: list[str]) -> list[AudioItem]:
    """Clotho v2.1 items through aac_datasets.Clotho(download=False)."""
    from aac_datasets import Clotho

    items = []
    for s in subsets:
        if s not in CLOTHO_SUBSETS:
            raise ValueError(
                f"unknown Clotho subset {s!r} in input.subsets; use one of {sorted(CLOTHO_SUBSETS)} "
                f"({', '.join(f'{k} = {v}' for k, v in CLOTHO_SUBSETS.items())})"
            )
        try:
            ds = Clotho(root, subset=s, download=False)
        except (RuntimeError, FileNotFoundError):
            sub = CLOTHO_SUBSETS[s]
            raise FileNotFoundError(
                f"Clotho subset {s!r} is not prepared under input.root={root!r}: expected "
                f"{root}/CLOTHO_v2.1/clotho_audio_files/{sub}/ and "
                f"{root}/CLOTHO_v2.1/clotho_csv_files/clotho_captions_{sub}.csv; fix input.root, or "
                f"download Clotho there (`aac-datasets-download --root {root} clotho`)"
            ) from None
        cols = ds.get_item(None, ["fname", "fpath", "captions"])
        for fname, fpath, caps in zip(cols["fname"], cols["fpath"], cols["captions"], strict=True):
            items.append(AudioItem(fname, CLOTHO_SUBSETS[s], fpath, list(caps)))
    return items


def list_audiocaps(root: str, subsets: list[str]) -> list[AudioItem]:
    """AudioCaps items (audio_32000Hz/{subset}/*.flac + csv_files_v1) via aac-datasets."""
    from aac_datasets import AudioCaps

    items = []
    for s in subsets:
        if s not in AUDIOCAPS_SUBSETS:
            raise ValueError(f"unknown AudioCaps subset {s!r} in input.subsets; use one of {sorted(AUDIOCAPS_SUBSETS)}")
        try:
            ds = AudioCaps(root, subset=s, download=False)
        except (RuntimeError, FileNotFoundError):
            raise FileNotFoundError(
                f"AudioCaps subset {s!r} is not prepared under input.root={root!r}: expected "
                f"{root}/AUDIOCAPS/audio_32000Hz/{s}/ and {root}/AUDIOCAPS/csv_files_v1/{s}.csv; fix "
                f"input.root, or download AudioCaps there (`aac-datasets-download --root {root} audiocaps`)"
            ) from None
        cols = ds.get_item(None, ["fname", "fpath", "captions"])
        for fname, fpath, caps in zip(cols["fname"], cols["fpath"], cols["captions"], strict=True):
            items.append(AudioItem(fname, s, fpath, list(caps)))
    return items


def list_manifest(uri: str) -> list[AudioItem]:
    """Items of a CSV or Parquet manifest (see the module docstring for columns)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{uri}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                "save the manifest as UTF-8"
            ) from None
        table = pacsv.read_csv(io.BytesIO(data))
    cols = table.column_names
    if "audio" not in cols:
        raise ValueError(f"{uri}: a manifest needs a column 'audio' (got {cols})")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    rows = table.to_pylist()
    cap_cols = sorted(c for c in cols if c == "caption" or c.startswith("caption_"))
    items = []
    for r in rows:
        a = str(r["audio"])
        if not (os.path.isabs(a) or "://" in a):
            a = storage.join(base, a)
        aid = str(r.get("audio_id") or os.path.basename(a))
        caps = [str(r[c]) for c in cap_cols if r.get(c) not in (None, "")]
        items.append(AudioItem(aid, str(r.get("subset") or "manifest"), a, caps))
    return items


def list_items(kind: str, root: str, subsets: list[str], manifest: str) -> list[AudioItem]:
    if kind == "clotho":
        items = list_clotho(root, subsets)
    elif kind == "audiocaps":
        items = list_audiocaps(root, subsets)
    elif kind == "manifest":
        items = list_manifest(manifest)
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    seen: dict[str, int] = {}
    for it in items:
        seen[it.audio_id] = seen.get(it.audio_id, 0) + 1
    dups = sorted(a for a, n in seen.items() if n > 1)
    if dups:
        raise ValueError(f"duplicate audio ids in the input: {dups[:10]}; audio ids must be unique")
    return items


# --------------------------------------------------------------------------------------
# Demo corpus
# --------------------------------------------------------------------------------------

# Each kind: (noun phrases describing it as a clause, synthesiser name)
EVENTS: dict[str, list[str]] = {
    "dog": ["a dog barks", "a dog is barking", "a dog barks loudly", "a small dog barks"],
    "bell": ["a bell rings", "a bell is ringing", "a church bell chimes", "a bell tolls"],
    "rain": ["rain falls", "rain is falling", "heavy rain pours down", "rain patters"],
    "engine": ["an engine hums", "a car engine is running", "an engine idles", "a motor rumbles"],
    "birds": ["birds chirp", "a bird is chirping", "birds are singing", "a bird tweets"],
    "speech": ["a man speaks", "a man is talking", "a person talks", "someone speaks"],
    "siren": ["a siren wails", "a siren is blaring", "an alarm sounds", "a siren howls"],
}
SEQ_TEMPLATES = ["{a} then {b}", "{a} and then {b}", "{a} followed by {b}", "{a} before {b}", "{b} after {a}"]
SUP_TEMPLATES = ["{a} while {b}", "{a} as {b}", "{b} while {a}", "{b} as {a}"]
SINGLE_TEMPLATES = ["{a}", "{a} in the distance", "{a} nearby", "{a} for a while", "{a} again and again"]


def _envelope(n: int, sr: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    env = np.ones(n, dtype=np.float64)
    a, r = max(1, int(attack * sr)), max(1, int(release * sr))
    env[:a] = np.linspace(0, 1, a)
    env[-r:] = np.minimum(env[-r:], np.linspace(1, 0, r))
    return env


def synth_event(kind: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic sound event of a kind, with random parameters."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = np.zeros(n)
    if kind == "dog":  # harmonic bursts with noise, 2-4 per second
        f0 = rng.uniform(350, 700)
        rate = rng.uniform(2, 4)
        start = rng.uniform(0, 0.2)
        while start < seconds - 0.2:
            s, L = int(start * sr), int(rng.uniform(0.1, 0.2) * sr)
            tt = np.arange(L) / sr
            burst = sum(np.sin(2 * np.pi * f0 * k * tt * (1 - 0.3 * tt)) / k for k in range(1, 6))
            burst += 0.3 * rng.standard_normal(L)
            x[s : s + L] += burst[: n - s] * np.hanning(L)[: n - s]
            start += 1 / rate * rng.uniform(0.7, 1.3)
    elif kind == "bell":  # inharmonic partials decaying, struck every 1-2 s
        f0 = rng.uniform(300, 900)
        period = rng.uniform(1.0, 2.0)
        for s0 in np.arange(rng.uniform(0, 0.3), seconds, period):
            s = int(s0 * sr)
            tt = np.arange(n - s) / sr
            for ratio, amp in [(1, 1.0), (2.76, 0.5), (5.4, 0.25), (8.9, 0.12)]:
                x[s:] += amp * np.sin(2 * np.pi * f0 * ratio * tt) * np.exp(-tt * rng.uniform(2, 4))
    elif kind == "rain":  # broadband noise, high-passed by differencing, with drops
        noise = rng.standard_normal(n)
        x = np.diff(noise, prepend=0.0) * 0.4
        drops = rng.random(n) < rng.uniform(20, 60) / sr
        x += np.convolve(drops.astype(float), np.exp(-np.arange(200) / 30.0), mode="same") * 0.8
    elif kind == "engine":  # low harmonic drone with slow amplitude modulation
        f0 = rng.uniform(40, 90)
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 9))
        x *= 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(4, 12) * t)
        x += 0.05 * rng.standard_normal(n)
    elif kind == "birds":  # fast rising chirps 2-6 kHz
        start = rng.uniform(0, 0.3)
        while start < seconds - 0.1:
            s, L = int(start * sr), int(rng.uniform(0.05, 0.12) * sr)
            tt = np.arange(L) / sr
            f_a, f_b = rng.uniform(2000, 3500), rng.uniform(4000, 6000)
            phase = 2 * np.pi * (f_a * tt + (f_b - f_a) * tt**2 / (2 * tt[-1]))
            x[s : s + L] += np.sin(phase)[: n - s] * np.hanning(L)[: n - s]
            start += rng.uniform(0.1, 0.4)
    elif kind == "speech":  # voiced source with moving formants and syllable rhythm
        f0 = rng.uniform(95, 150) * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        src = sum(np.sin(k * phase) * (1.0 / k) for k in range(1, 25))
        formant = 1 + np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
        syll = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None)
        x = src * formant * syll
    elif kind == "siren":  # sine sweeping slowly between two pitches
        lo, hi = rng.uniform(500, 800), rng.uniform(1000, 1500)
        f = lo + (hi - lo) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.3 * np.sin(4 * np.pi * np.cumsum(f) / sr)
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    x = x * _envelope(n, sr)
    return x / (np.abs(x).max() + 1e-9)


def demo_clip(rng: np.random.Generator, seconds: float, sr: int) -> tuple[np.ndarray, list[str], dict]:
    """One clip and its five captions. Returns (samples, captions, description)."""
    kinds = sorted(EVENTS)
    mode = rng.choice(["single", "seq", "sup"], p=[0.2, 0.45, 0.35])
    n = int(seconds * sr)
    if mode == "single":
        a = kinds[rng.integers(len(kinds))]
        x = synth_event(a, seconds, sr, rng)
        templates, fill = SINGLE_TEMPLATES, {"a": a}
    else:
        a, b = rng.choice(kinds, size=2, replace=False)
        if mode == "seq":
            split = rng.uniform(0.4, 0.6) * seconds
            x = np.zeros(n)
            xa = synth_event(a, split, sr, rng)
            xb = synth_event(b, seconds - split, sr, rng)
            x[: len(xa)] = xa
            x[n - len(xb) :] += xb
            templates = SEQ_TEMPLATES
        else:
            x = synth_event(a, seconds, sr, rng) + rng.uniform(0.5, 0.9) * synth_event(b, seconds, sr, rng)
            templates = SUP_TEMPLATES
        fill = {"a": a, "b": b}
    order = rng.permutation(len(templates))
    captions = []
    for i in range(5):
        tpl = templates[order[i % len(templates)]]
        phrases = {k: EVENTS[v][rng.integers(len(EVENTS[v]))] for k, v in fill.items()}
        captions.append(tpl.format(**phrases))
    gain = rng.uniform(0.3, 0.8)
    x = gain * x / (np.abs(x).max() + 1e-9) + 0.003 * rng.standard_normal(n)
    return x.astype(np.float32), captions, {"mode": str(mode), **{k: str(v) for k, v in fill.items()}}


def write_demo_corpus(
    root: str,
    seed: int = 0,
    n_dev: int = 300,
    n_val: int = 40,
    n_eval: int = 80,
    min_seconds: float = 6.0,
    max_seconds: float = 10.0,
    sample_rate: int = 44100,
) -> dict[str, int]:
    """Write a synthetic corpus in the Clotho v2.1 layout under `root` (a local folder).

    Layout: root/CLOTHO_v2.1/clotho_audio_files/{development,validation,evaluation}/*.wav and
    root/CLOTHO_v2.1/clotho_csv_files/clotho_{captions,metadata}_{subset}.csv.
    """
    base = os.path.join(root, "CLOTHO_v2.1")
    csv_dir = os.path.join(base, "clotho_csv_files")
    os.makedirs(csv_dir, exist_ok=True)
    counts = {}
    for subset, n_clips, offset in [
        ("development", n_dev, 0),
        ("validation", n_val, 1),
        ("evaluation", n_eval, 2),
    ]:
        rng = np.random.default_rng([seed, offset])
        audio_dir = os.path.join(base, "clotho_audio_files", subset)
        os.makedirs(audio_dir, exist_ok=True)
        cap_rows, meta_rows = [], []
        for i in range(n_clips):
            seconds = float(rng.uniform(min_seconds, max_seconds))
            x, caps, desc = demo_clip(rng, seconds, sample_rate)
            fname = f"demo_{subset[:3]}_{i:05d}.wav"
            sf.write(os.path.join(audio_dir, fname), x, sample_rate, subtype="PCM_16")
            cap_rows.append([fname, *caps])
            keywords = ";".join(v for k, v in desc.items() if k != "mode")
            meta_rows.append([fname, keywords, str(i), "", f"0, {len(x)}", "aacray-demo", "CC0"])
        with open(os.path.join(csv_dir, f"clotho_captions_{subset}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", *[f"caption_{k}" for k in range(1, 6)]])
            w.writerows(cap_rows)
        with open(
            os.path.join(csv_dir, f"clotho_metadata_{subset}.csv"), "w", newline="", encoding="ISO-8859-1"
        ) as f:
            w = csv.writer(f)
            w.writerow(["file_name", "keywords", "sound_id", "sound_link", "start_end_samples", "manufacturer", "license"])
            w.writerows(meta_rows)
        counts[subset] = n_clips
    return counts


def run_make_demo_corpus(cfg) -> dict:
    """Job body of jobs/make_demo_corpus.py (a local folder: aac-datasets reads local roots)."""
    if storage.is_remote(cfg.output):
        raise ValueError(f"output {cfg.output!r}: the demo corpus is written to a local folder")
    counts = write_demo_corpus(
        cfg.output, cfg.seed, cfg.n_dev, cfg.n_val, cfg.n_eval, cfg.min_seconds, cfg.max_seconds, cfg.sample_rate
    )
    from aacray.config import dump_yaml

    storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
    return {"output": cfg.output, "clips": counts, "root_for_aac_datasets": cfg.output}
