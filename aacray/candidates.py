"""score_matrix's candidate stage: which pairs its blocks score when `candidates` is not
`exact` (phase 2 of aacray/scoring.py, after the memory check, once Ray is up).

- shortlist: every audio of the index is described once on the actor pool (its n-best
  beams, `captioning.map_audios`), then the retriever of `shortlist.method` proposes each
  audio's K captions and each caption's K audios (aacray/shortlist.py);
- a pairs file: a Parquet (or CSV) of (audio_id, caption_id) made by any other retriever;
  every id must be in the index (refused, naming them, otherwise); repeated pairs are
  scored once and counted in metrics.json.
Both add every caption x a fixed seeded sample of audios (`shortlist.minmax_sample`, plus
the loss-curve figure's audios) for the captions' min/max, and the heatmap corner's pairs.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aacray import storage
from aacray.captioning import map_audios
from aacray.config import CaptionConfig, ScoreConfig
from aacray.errors import BadInputError
from aacray.shortlist import (
    bm25_top_k,
    candidate_pairs,
    profile_top_k,
    sample_audios,
    shortlist_figures,
)
from aacray.text import words

log = logging.getLogger("aacray.candidates")


def describe_config(cfg: ScoreConfig) -> CaptionConfig:
    """The caption job's settings for describing the index: the shortlist's beams."""
    sl = cfg.shortlist
    return CaptionConfig(
        checkpoint=cfg.checkpoint, task=cfg.task, audio=cfg.audio, subsets=cfg.audio_subsets, references=None,
        beam_size=sl.beams, max_len=sl.max_len, actors=cfg.actors, ray=cfg.ray,
    )


DESCRIPTIONS = "descriptions"  # the table of each audio's beams and word profile


def describe(cfg: ScoreConfig, audio_ids: list[str], n_frames: dict[str, int], checkpoint: dict):
    """Each audio's description -> (the `descriptions` table, its info). Rows of
    `shortlist.descriptions` are reused where it holds the audio; the rest are decoded on the
    actor pool (beams and, always, the word profile, so that either method can reuse them)."""
    sl = cfg.shortlist
    reused = _reusable(sl.descriptions, checkpoint, sl, set(audio_ids)) if sl.descriptions else {}
    todo = [a for a in audio_ids if a not in reused]
    t0 = time.time()
    rows = map_audios(describe_config(cfg), todo, n_frames, describe="profile")[0] if todo else {}
    beams = [reused[a][0] if a in reused else list(rows[a]["beams"]) for a in audio_ids]
    profile = [reused[a][1] if a in reused else np.asarray(rows[a]["profile"], np.float32) for a in audio_ids]
    table = pa.table({
        "audio_id": pa.array(audio_ids, pa.string()),
        "beams": pa.array(beams, pa.list_(pa.string())),
        "profile": pa.array([p.tolist() for p in profile], pa.list_(pa.float32())),
    })
    info = {"described": len(todo), "reused_descriptions": len(reused), "describe_seconds": round(time.time() - t0, 2),
            "beams": sl.beams, "max_len": sl.max_len, "checkpoint": checkpoint}
    return table, info


def _reusable(uri: str, checkpoint: dict, sl, wanted: set[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """audio_id -> (beams, profile) from a previous run's descriptions, for the wanted audios."""
    manifest = storage.read_manifest(uri)
    if DESCRIPTIONS not in manifest.get("tables", {}):
        raise BadInputError(f"shortlist.descriptions: {uri} has no {DESCRIPTIONS} table (not a shortlist run)")
    was = storage.read_json(storage.join(uri, "metrics.json")).get("candidates", {})
    same = {"checkpoint": checkpoint, "beams": sl.beams, "max_len": sl.max_len}
    differ = {key: (was.get(key), v) for key, v in same.items() if was.get(key) != v}
    if differ:
        raise BadInputError(
            f"shortlist.descriptions: {uri} was described with other settings {differ} (was, now): its "
            "descriptions would not be this model's. Drop shortlist.descriptions, or use that run's settings."
        )
    t = storage.read_table(uri, DESCRIPTIONS)
    ids = t.column("audio_id").to_pylist()
    beams, prof = t.column("beams").to_pylist(), t.column("profile").to_pylist()
    return {a: (b, np.asarray(p, np.float32)) for a, b, p in zip(ids, beams, prof, strict=True) if a in wanted}


def retrieve(method: str, k: int, described: pa.Table, texts: list[str], tokens: list[list[int]],
             skip: set[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """The built-in shortlist over described audios -> (a2t (N, K) caption positions, t2a
    (M, K) audio positions, seconds)."""
    t0 = time.time()
    if method == "bm25":
        audio_words = [words(" ".join(b)) for b in described.column("beams").to_pylist()]
        caption_words = [words(t) for t in texts]
        a2t, t2a = bm25_top_k(audio_words, caption_words, k), bm25_top_k(caption_words, audio_words, k)
    else:
        log_p = np.asarray(described.column("profile").to_pylist(), dtype=np.float32)
        a2t, t2a = profile_top_k(log_p, tokens, skip, k)
    return a2t, t2a, time.time() - t0


def read_pairs(uri: str, audio_ids: list[str], caption_ids: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """A pairs file -> (audio positions, caption positions, repeated rows). Refuses, naming
    them, ids outside the scored index or caption set."""
    table = storage.read_tabular(uri, "candidates file")
    missing = [c for c in ("audio_id", "caption_id") if c not in table.column_names]
    if missing:
        raise BadInputError(f"candidates file {uri} lacks column(s) {missing}: it needs audio_id and caption_id")
    a_of = {a: i for i, a in enumerate(audio_ids)}
    c_of = {c: j for j, c in enumerate(caption_ids)}
    a_col = [str(x) for x in pc.cast(table.column("audio_id"), "string").to_pylist()]
    c_col = [str(x) for x in pc.cast(table.column("caption_id"), "string").to_pylist()]
    bad_a = sorted({a for a in a_col if a not in a_of})
    bad_c = sorted({c for c in c_col if c not in c_of})
    if bad_a or bad_c:
        raise BadInputError(
            f"candidates file {uri} names {len(bad_a)} audio(s) outside the index (e.g. {bad_a[:5]}) and "
            f"{len(bad_c)} caption(s) outside the caption set (e.g. {bad_c[:5]}): fix the file, or the "
            "audio_subsets / caption_subsets it was made for"
        )
    a_pos = np.array([a_of[a] for a in a_col], dtype=np.int64)
    c_pos = np.array([c_of[c] for c in c_col], dtype=np.int64)
    repeated = len(a_pos) - np.unique(c_pos * len(audio_ids) + a_pos).size
    return a_pos, c_pos, int(repeated)


def build_candidates(cfg: ScoreConfig, audio_ids: list[str], n_frames: dict[str, int], caption_ids: list[str],
                     texts: list[str], tokens: list[list[int]], gt_audio: np.ndarray, skip: set[int],
                     probe: list[int], corner: tuple[np.ndarray, np.ndarray], checkpoint: dict):
    """The pairs to score, metrics.json's "candidates" entry and the descriptions table (None
    for a pairs file). probe: audio positions put in the sample (the loss curves need every
    caption); corner: the heatmap's pairs."""
    sl = cfg.shortlist
    n, m = len(audio_ids), len(caption_ids)
    sample = sample_audios(n, sl.minmax_sample, sl.seed, probe)
    info: dict = {"mode": "shortlist" if cfg.candidates == "shortlist" else "pairs_file"}
    described = None
    if cfg.candidates == "shortlist":
        described, d_info = describe(cfg, audio_ids, n_frames, checkpoint)
        a2t, t2a, seconds = retrieve(sl.method, sl.k, described, texts, tokens, skip)
        cands = candidate_pairs(n, m, corner, sample, a2t, t2a)
        info.update(method=sl.method, k=sl.k, **d_info, retrieve_seconds=round(seconds, 2))
    else:
        a_pos, c_pos, repeated = read_pairs(cfg.candidates, audio_ids, caption_ids)
        cands = candidate_pairs(n, m, (np.concatenate([a_pos, corner[0]]), np.concatenate([c_pos, corner[1]])), sample)
        info.update(file=cfg.candidates, listed_pairs=int(a_pos.size), repeated_pairs_scored_once=repeated)
    info.update(shortlist_figures(cands, gt_audio, n))
    info["minmax"] = (
        "exact: every caption scored against every audio" if info["minmax_exact"] else
        f"estimated: each caption's min/max over a seeded sample of {sample.size} audios (seed {sl.seed}) and its candidates"
    )
    log.info("score_matrix: %d candidate pairs, %.2f%% of %d x %d", cands.n_pairs, 100 * cands.n_pairs / (n * m), n, m)
    return cands, info, described
