"""Stage: incremental, exact and idempotent update of a score_matrix output (docs/reindex.md).

Given an index (N audios x M captions, every pair scored) and dM new captions and/or dN
new audios, only the new pairs are scored: new captions x all N + dN audios, and new audios
x the M old captions, i.e. (N + dN)(M + dM) - N M pairs. The rest is merging, exact because
retrieval's orders are total (aacray/retrieval.py):
- caption_stats: min and max are associative; old captions merge in the new audios' rows.
- topk_t2a: old captions merge the new audios' candidates; new captions' lists are final.
- topk_a2t_raw: old audios merge the new captions' candidates; new audios get theirs from
  their rows (old captions) and the new-caption blocks.
- topk_a2t (min-max): with captions only, old captions' stats do not move, so lists merge.
  New audios move old captions' min/max, which rescales pairs scored long ago: every list
  is then recomputed from the stored losses (the `scores` table, required in that case)
  with the merged stats. A pass over stored floats, no decoder pass.
A new pair is scored by the same `BlockScorer` with the index's own model, pairs_per_batch
and precision. New captions are scored against the whole audio index, one caption at a
time against the same audio chunks as score_matrix, so adding captions reproduces a full
recompute to the bit (given the same audio order, device and threads). Adding audios
changes batch composition: new audios x old captions run in smaller audio batches, and a
full recompute on the union scores the old pairs in larger ones than the original run
did, so losses may differ in the last bit (seen: up to 7e-7, some runs none). Rankings
then agree unless two candidates tie within that; tests require equal ids and ranks,
losses within 1e-6 and min-max scores within that over the loss span
(`index.compare_outputs`), and print which held.

A run reads as phases: plan (read the index and the new data, check everything, cut the
work into `Unit`s; nothing is written), set up (Ray and the memory guard when actors
score), stage the version's shared rows, score (inline or on an actor pool), merge,
commit (the version's tables, its manifest last, then the pointer). Version n+1 is
written under `versions/<n+1>/` and published by one atomic write of `_CURRENT.json`
(aacray/versions.py); rows later versions share are append-only at the root, named by the
version that added them: `scores_added/` (new pairs), `captions_added/`,
`embeddings_added/` (copies of the added rows, so later runs never depend on a caption
file or an extract output that may be rewritten).

Idempotence. A run is keyed by a digest of its new-data inputs (`submission_id`, also the
`ray job submit --submission-id`: `python jobs/reindex.py --submission-id CONFIG`); a key
already applied to the index is a no-op, and ids already in the index are skipped, so a
rerun changes nothing. One writer at a time: `aacray.lock.Lock`.

Estimated min/max (paper 5, `minmax_sample`): the captions a run adds get min/max over a
fixed, seeded sample of index audios (stored in the manifest, reused by every later run)
instead of every audio; their stats then never move. `jobs/bench_reindex.py --minmax-eval`
measures what it costs in min-max A2T Recall@k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import pickle
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from aacray import stage, storage, versions
from aacray.config import ActorConfig, ReindexConfig
from aacray.decoder import DecoderConfig
from aacray.embeddings import EMB_DIM, check_embeddings, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.index import VERSION_TABLES, Index, as_added, index_info, load_index, source_digest
from aacray.lock import Lock
from aacray.retrieval import (
    CaptionStats,
    TopK,
    caption_stats,
    merge_caption_stats,
    minmax_scale,
    retrieval_metrics,
    topk_a2t_minmax,
    topk_a2t_raw,
    topk_merge,
    topk_select,
    topk_t2a,
)
from aacray.scorer import REFINE_MARGIN, over_long, refine_summary, scorer_memory, tokenize
from aacray.scoring import write_scores_block
from aacray.text import WordTokenizer, normalize

log = logging.getLogger("aacray.reindex")

SHARED = ("scores_added", "captions_added", "embeddings_added")  # append-only, at the root


# --------------------------------------------------------------------------------------
# Run key
# --------------------------------------------------------------------------------------


def submission_id(cfg: ReindexConfig) -> str:
    """`reindex-<16 hex>`: a digest of the output and of the new data (content, subsets,
    min/max settings). The same new data gives the same id, which makes `ray job submit
    --submission-id` refuse a duplicate, and the job a no-op when it was applied already."""
    key = {
        "output": cfg.output.rstrip("/"),
        "new_captions": source_digest(cfg.new_captions) if cfg.new_captions else None,
        "new_caption_subsets": cfg.new_caption_subsets,
        "new_audio": source_digest(cfg.new_audio) if cfg.new_audio else None,
        "new_audio_subsets": cfg.new_audio_subsets,
        "minmax_sample": cfg.minmax_sample,
        "minmax_seed": cfg.minmax_seed if cfg.minmax_sample else None,
    }
    return "reindex-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# New data
# --------------------------------------------------------------------------------------


@dataclass
class NewData:
    """The captions and audios of this run that the index does not hold yet."""

    captions: pa.Table | None
    audio: pa.Table | None
    """Embedding rows (the embeddings table's schema)."""
    skipped_captions: int = 0
    skipped_audios: int = 0

    @property
    def d_m(self) -> int:
        return self.captions.num_rows if self.captions is not None else 0

    @property
    def d_n(self) -> int:
        return self.audio.num_rows if self.audio is not None else 0

    @property
    def caption_ids(self) -> list[str]:
        return self.captions.column("caption_id").to_pylist() if self.d_m else []

    @property
    def audio_ids(self) -> list[str]:
        return self.audio.column("audio_id").to_pylist() if self.d_n else []

    def counts(self) -> dict:
        return {"new_captions": self.d_m, "new_audios": self.d_n,
                "skipped_captions": self.skipped_captions, "skipped_audios": self.skipped_audios}


def _has_caption_ids(uri: str) -> bool:
    if not uri.endswith((".csv", ".parquet")):
        return True
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        return "caption_id" in pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    return "caption_id" in [c.strip().strip('"') for c in header.split(",")]


def text_caption_id(text: str) -> str:
    """Id of a caption given without one: a digest of its normalised text (stable across runs)."""
    return "c-" + hashlib.sha1(normalize(text, version=1).encode()).hexdigest()[:16]  # v1: ids of existing indexes stay


def read_new_captions(cfg: ReindexConfig, index: Index) -> tuple[pa.Table, int]:
    """(captions not yet in the index, how many were skipped as already there)."""
    t = read_captions(cfg.new_captions, cfg.new_caption_subsets)
    if not _has_caption_ids(cfg.new_captions):
        t = t.set_column(0, "caption_id", pa.array([text_caption_id(x or "") for x in t.column("text").to_pylist()], pa.string()))
    known = dict(zip(index.caption_ids, index.captions.column("text").to_pylist(), strict=True))
    keep, seen, skipped, bad = [], {}, 0, []
    for i, (c, x) in enumerate(zip(t.column("caption_id").to_pylist(), t.column("text").to_pylist(), strict=True)):
        if c in known:
            if normalize(known[c] or "", version=1) != normalize(x or "", version=1):
                bad.append(f"caption {c!r} is in the index with another text ({known[c]!r} vs {x!r}): updates are not supported, use a new id")
            skipped += 1
        elif c in seen:
            if normalize(seen[c] or "", version=1) != normalize(x or "", version=1):
                bad.append(f"caption id {c!r} appears twice with different texts")
            skipped += 1
        else:
            seen[c] = x
            keep.append(i)
    empty = [c for c, x in seen.items() if not normalize(x or "", version=1)]
    if empty:
        bad.append(f"captions empty after normalisation: {empty[:10]}")
    if bad:
        raise BadInputError(f"reindex refused {cfg.new_captions}, nothing was changed:\n  " + "\n  ".join(bad[:20]))
    return t.take(pa.array(keep, pa.int64())), skipped


def read_new_audio(cfg: ReindexConfig, index: Index) -> tuple[pa.Table, int]:
    """(embedding rows of audios not yet in the index, how many were skipped)."""
    t = storage.read_table(cfg.new_audio, "embeddings")
    if cfg.new_audio_subsets is not None:
        t = t.filter(pc.is_in(t.column("subset"), pa.array(cfg.new_audio_subsets)))
    ids = t.column("audio_id").to_pylist()
    known = set(index.audio_ids)
    keep = [i for i, a in enumerate(ids) if a not in known]
    t = t.take(pa.array(keep, pa.int64()))
    bad = [f"audio {a}: {why}" for a, why in check_embeddings(_embedding_set(t), "index")]
    if bad:
        raise BadInputError(f"reindex refused {cfg.new_audio}, nothing was changed:\n  " + "\n  ".join(bad[:20]))
    return t, len(ids) - len(keep)


def read_new(cfg: ReindexConfig, index: Index) -> NewData:
    caps, skipped_caps = read_new_captions(cfg, index) if cfg.new_captions else (None, 0)
    aud, skipped_aud = read_new_audio(cfg, index) if cfg.new_audio else (None, 0)
    return NewData(caps, aud, skipped_caps, skipped_aud)


def _embedding_set(table: pa.Table):
    from aacray.embeddings import EmbeddingSet, _chunk_frames

    frames = []
    for chunk in table.column("embedding").chunks:
        frames.extend(_chunk_frames(chunk, EMB_DIM))
    return EmbeddingSet(table.column("audio_id").to_pylist(), table.column("subset").to_pylist(), frames)


def draw_minmax_sample(audio_ids: list[str], size: int, seed: int) -> list[str]:
    """The reference sample: `size` audio ids drawn without replacement by a seeded rng from
    the sorted ids, returned sorted. Deterministic in (ids, size, seed)."""
    pool = sorted(audio_ids)
    if size > len(pool):
        raise BadInputError(f"minmax_sample={size} but the index holds {len(pool)} audios: ask for at most that")
    pick = np.random.default_rng(seed).choice(len(pool), size=size, replace=False)
    return sorted(pool[i] for i in pick)


# --------------------------------------------------------------------------------------
# Units of work (the same code in an actor and inline)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A block of captions to score: kind "cap" = new captions x every audio of the new
    index, "aud" = old captions x the new audios. `file` names its scores shard."""

    kind: str
    caption_ids: list[str]
    tokens: list[list[int]]
    file: str

    def pairs(self, n_all: int, n_new: int) -> int:
        return len(self.caption_ids) * (n_all if self.kind == "cap" else n_new)


@dataclass
class UnitResult:
    """What scoring one unit gives the merge (stats over the new audios only for "aud")."""

    kind: str
    n_pairs: int
    t2a: TopK
    a2t_raw: TopK
    stats: CaptionStats
    a2t_minmax: TopK | None
    rescored: int
    max_rel_err: float
    seconds: float
    started: float
    """When the unit's scoring began (wall clock), and who scored it: metrics.json's `timing`."""
    actor: str
    setup_seconds: float
    """What the scorer's set-up took in that actor (checkpoint, index, key/value caches)."""


@dataclass(frozen=True)
class ScoreJob:
    """What every scorer of a run needs (pickled to each actor)."""

    output: str
    checkpoint: str
    precision: str
    refine_margin: float
    pairs_per_batch: int
    k: int
    base_audio: dict
    """{uri, subsets}: the index's base audio source."""
    added_files: list[str]
    """Root-relative embeddings_added shards (earlier versions' and this run's)."""
    audio_ids: list[str]
    """Every audio of the new index, in index order (a check against the driver's view)."""
    new_audio_ids: list[str]
    has_cap_units: bool
    minmax_sample_ids: list[str] | None
    scores_uri: str | None
    """Where units write their scores shards (None: the index keeps no scores table)."""
    actors: ActorConfig
    task: str = "clotho"
    """The CoNeTTE task token the index was scored with (aacray checkpoints: the default)."""


def _unit_file(prefix: str, kind: str, cids: list[str]) -> str:
    return f"{prefix}-{kind}-{hashlib.sha1(chr(0).join(cids).encode()).hexdigest()[:16]}.parquet"


def plan_units(prefix, new_cids, new_tokens, old_cids, old_tokens, n_all, n_new, block) -> list[Unit]:
    """Blocks of captions sorted by length. "cap" blocks hold `block` new captions (x n_all
    audios); "aud" blocks hold enough old captions for about the same pairs (x n_new audios)."""
    units = []

    def cut(kind, cids, tokens, size):
        order = sorted(range(len(cids)), key=lambda j: (len(tokens[j]), cids[j]))
        for s in range(0, len(order), size):
            sel = order[s : s + size]
            c = [cids[j] for j in sel]
            units.append(Unit(kind, c, [tokens[j] for j in sel], _unit_file(prefix, kind, c)))

    if new_cids:
        cut("cap", new_cids, new_tokens, block)
    if n_new and old_cids:
        cut("aud", old_cids, old_tokens, aud_block(block, n_all, n_new))
    return units


def aud_block(block: int, n_all: int, n_new: int) -> int:
    """Old captions per "aud" unit: about `block` x n_all pairs, like a "cap" unit."""
    return max(block, block * n_all // max(n_new, 1))


def minmax_topk_dense(L: np.ndarray, a_ids: np.ndarray, c_ids: np.ndarray, mn, mx, k: int) -> TopK:
    """Min-max A2T candidates with stats that need not bound L (estimated ones)."""
    S = minmax_scale(L, mn, mx)
    n, m = S.shape
    if k < m:
        kth = np.partition(S, k - 1, axis=1)[:, k - 1 : k]
        rows, cols = np.nonzero(S <= kth)
    else:
        rows, cols = np.divmod(np.arange(n * m), m)
    return topk_select(a_ids[rows], c_ids[cols], S[rows, cols], L.astype(np.float64)[rows, cols], k, "a2t_minmax")


class UnitScorer:
    """Scores units against the run's audio index (pure torch + numpy, no Ray): a scorer
    of every audio for "cap" units, one of the new audios for "aud" units."""

    def __init__(self, job: ScoreJob, model, pad_id: int, device: str, setup_started: float):
        """setup_started: when the set-up began (the checkpoint load before this), for `timing`."""
        from aacray.scorer import BlockScorer

        es = read_embeddings(job.base_audio["uri"], job.base_audio["subsets"])
        ids, frames = list(es.audio_ids), list(es.frames)
        if job.added_files:
            add = _embedding_set(versions.read_files(job.output, job.added_files))
            ids += add.audio_ids
            frames += add.frames
        if ids != job.audio_ids:
            raise RuntimeError("the audio index read by the scorer differs from the driver's (a source changed mid-run?)")
        new = set(job.new_audio_ids)
        self.all_ids = np.array(ids, dtype=str)
        self.new_ids = np.array([a for a in ids if a in new], dtype=str)

        def scorer(fr):
            return BlockScorer(model, pad_id, fr, device, job.precision, job.pairs_per_batch, job.refine_margin)

        self.scorer_all = scorer(frames) if job.has_cap_units else None
        self.scorer_new = scorer([f for a, f in zip(ids, frames, strict=True) if a in new]) if new else None
        pos = {a: i for i, a in enumerate(ids)}
        self.sample_rows = [pos[a] for a in job.minmax_sample_ids] if job.minmax_sample_ids else None
        self.k = job.k
        self.scores_uri = job.scores_uri
        self.actor, self.setup_seconds = stage.actor_name(), time.time() - setup_started

    def __call__(self, unit: Unit) -> UnitResult:
        t0 = time.time()
        cids = np.array(unit.caption_ids, dtype=str)
        if unit.kind == "cap":
            # bf16-refined: the refined pairs include the windows of the (estimated) min/max
            a_ids, (L, refined) = self.all_ids, self.scorer_all.losses(unit.tokens, self.k, self.sample_rows)
            stats, mm = self._minmax(L, a_ids, cids)
        else:
            a_ids, (L, refined) = self.new_ids, self.scorer_new.losses(unit.tokens, self.k)
            stats, mm = caption_stats(L, cids), None  # partial: over the new audios only
        if self.scores_uri:
            write_scores_block(self.scores_uri, unit.file, a_ids, cids, L)
        return UnitResult(unit.kind, int(L.size), topk_t2a(L, a_ids, cids, self.k), topk_a2t_raw(L, a_ids, cids, self.k),
                          stats, mm, refined["rescored"] if refined else 0, refined["max_rel_err"] if refined else 0.0,
                          time.time() - t0, t0, self.actor, self.setup_seconds)

    def _minmax(self, L, a_ids, cids) -> tuple[CaptionStats, TopK]:
        """A new-caption block's stats (exact, or over the reference sample) and min-max lists."""
        if self.sample_rows is None:
            exact = caption_stats(L, cids)
            return exact, topk_a2t_minmax(L, a_ids, cids, self.k, exact.loss_min, exact.loss_max)
        est = caption_stats(L[self.sample_rows], cids)
        return est, minmax_topk_dense(L, a_ids, cids, est.loss_min, est.loss_max, self.k)


def unit_scorer(job: ScoreJob, actors: ActorConfig) -> UnitScorer:
    """An actor's set-up (device, threads, checkpoint), in an actor or in the driver."""
    t0 = time.time()
    device, model, tok, _ = stage.actor_setup(actors, job.checkpoint, job.task)
    return UnitScorer(job, model, tok.pad_id, device, setup_started=t0)


class ReindexActor:
    """Ray Data actor: a pickled `Unit` per row -> its pickled `UnitResult`."""

    def __init__(self, job: ScoreJob):
        self.scorer = unit_scorer(job, job.actors)

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            res = [pickle.dumps(self.scorer(pickle.loads(u))) for u in batch["unit"]]
        return {"result": np.array(res, dtype=object)}


# --------------------------------------------------------------------------------------
# Min-max lists from stored losses
# --------------------------------------------------------------------------------------


def minmax_from_scores(uri: str, files: list[str], stats: CaptionStats, k: int) -> TopK:
    """Min-max A2T lists of every audio from the `scores` shards (flat rows), with `stats`:
    the scores are `retrieval.minmax_scale`'s, elementwise, so lists equal a dense ranking."""
    parts, rows = [], 0
    for f in files:
        t = versions.read_files(uri, [f])
        cids = np.asarray(t.column("caption_id").to_numpy(zero_copy_only=False)).astype(str)
        uniq, inv = np.unique(cids, return_inverse=True)
        mn, mx = stats.aligned(uniq)
        loss = t.column("loss").to_numpy().astype(np.float64)
        score = minmax_scale(loss, mn[inv], mx[inv])  # flat rows: each with its caption's stats
        aids = np.asarray(t.column("audio_id").to_numpy(zero_copy_only=False)).astype(str)
        parts.append(topk_select(aids, cids, score, loss, k, "a2t_minmax"))
        rows += len(parts[-1])
        if rows > 1 << 20:  # bound the driver's memory: fold the candidates so far
            parts, rows = [topk_merge(parts, k, "a2t_minmax")], len(parts[0])
    return topk_merge(parts, k, "a2t_minmax")


# --------------------------------------------------------------------------------------
# The job: plan, set up, stage, score, merge, commit
# --------------------------------------------------------------------------------------


@dataclass
class Model:
    """The index's checkpoint as the driver checked it."""

    info: dict
    sha: str
    tok: WordTokenizer
    cfg: DecoderConfig
    n_params: int

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_tokens


@dataclass
class Plan:
    """Everything a run decided before writing anything."""

    cfg: ReindexConfig
    index: Index
    run_key: str
    base_digest: str
    model: Model
    new: NewData
    all_ids: list[str]
    """The new index's audios: the index's, then the new ones."""
    has_scores: bool
    refine_margin: float
    sample: dict | None
    """The stored min/max reference sample {size, seed, audio_ids}, or None."""
    units: list[Unit]
    n_pairs: int

    @property
    def version(self) -> int:
        return self.index.version + 1

    @property
    def prefix(self) -> str:
        return versions.version_prefix(self.version)

    @property
    def inline(self) -> bool:
        return self.n_pairs <= self.cfg.inline_max_pairs

    @property
    def pool_size(self) -> int:
        """Who scores the units: the driver alone when inline, else an actor per unit up to
        actors.num_actors."""
        return 1 if self.inline else max(1, min(self.cfg.actors.num_actors, len(self.units)))

    @property
    def estimate(self) -> bool:
        return self.cfg.minmax_sample is not None

    @property
    def output(self) -> stage.Output:
        """The version's own folder (its tables, metrics, config, manifest)."""
        return stage.Output(storage.join(self.cfg.output, versions.version_path(self.version)), "reindex", list(VERSION_TABLES))


@dataclass
class Merged:
    """The new version's tables, merged from the index's and the units' results."""

    stats: CaptionStats
    t2a: TopK
    raw: TopK
    mm: TopK
    score_files: list[str]
    minmax_seconds: float


def run_reindex(cfg: ReindexConfig) -> dict:
    """Add cfg.new_captions / cfg.new_audio to the score_matrix output cfg.output: scores the
    new pairs only, commits a new version. Returns a summary (status committed/unchanged)."""
    if not cfg.new_captions and not cfg.new_audio:
        raise BadInputError("nothing to add: set new_captions and/or new_audio")
    t_start = time.time()
    run_key = submission_id(cfg)
    out = cfg.output
    storage.read_manifest(out)  # a missing or incomplete output fails before any lock is taken
    with Lock(out, run_key, cfg.stale_lock_s, job="reindex"):
        base_digest = versions.manifest_digest(out)
        manifest = storage.read_manifest(out)
        summary = {"output": out, "run_key": run_key, "parent_version": int(manifest.get("version", 0))}
        if run_key in index_info(out, manifest).get("applied_runs", []):
            log.info("reindex: run %s was applied already (version %d): nothing to do", run_key, summary["parent_version"])
            return {**summary, "status": "unchanged", "reason": "this run's inputs were applied already",
                    "version": summary["parent_version"]}
        # 1. plan: the index, the new data, every check; nothing is written
        index = load_index(out, manifest)
        model = _check_model(index)
        new = read_new(cfg, index)
        summary.update(new.counts())
        if new.d_m == 0 and new.d_n == 0:
            log.info("reindex: every caption and audio given is in the index already: nothing to do")
            return {**summary, "status": "unchanged", "reason": "nothing new", "version": index.version}
        plan = _plan(cfg, index, model, new, run_key, base_digest)
        # 2. set up: Ray and the memory guard, before any actor starts
        _set_up(plan)
        # 3. the version's folder and its shared rows (added captions and audios)
        tables = _stage_shared(plan)
        # 4. score the new pairs, 5. merge, 6. commit
        t_score = time.time()
        results = _score(plan, tables)
        t_merge = time.time()
        merged = _merge(plan, results)
        timing = _timing(plan, results, t_score, t_merge, time.time() - t_merge)
        return {**summary, **_commit(plan, tables, merged, results, timing, t_start)}


def _plan(cfg: ReindexConfig, index: Index, model: Model, new: NewData, run_key: str, base_digest: str) -> Plan:
    """Check the new data against the index; cut the work into units."""
    all_ids = index.audio_ids + new.audio_ids
    has_scores = "scores" in index.manifest["tables"]
    _check_new(index, new, all_ids, has_scores)
    sample = _minmax_sample(cfg, index, all_ids)
    new_texts = new.captions.column("text").to_pylist() if new.d_m else []
    # new captions are refused when too long, as score_matrix refuses them (never cut)
    too_long = over_long(new.caption_ids, [model.tok.encode(t) for t in new_texts], model.max_tokens)
    if too_long:
        raise BadInputError(f"reindex refused {cfg.new_captions}, nothing was changed:\n  {too_long}")
    new_tokens = tokenize(model.tok, new_texts, model.max_tokens)
    old_cids = index.caption_ids if new.d_n else []
    old_tokens = tokenize(model.tok, index.captions.column("text").to_pylist(), model.max_tokens) if new.d_n else []
    prefix = versions.version_prefix(index.version + 1)
    units = plan_units(prefix, new.caption_ids, new_tokens, old_cids, old_tokens, len(all_ids), new.d_n, cfg.caption_block_size)
    n_pairs = sum(u.pairs(len(all_ids), new.d_n) for u in units)
    # indexes scored before refine_margin existed have none: the default
    return Plan(cfg, index, run_key, base_digest, model, new, all_ids, has_scores,
                index.info.get("refine_margin") or REFINE_MARGIN, sample, units, n_pairs)


def index_task(info: dict) -> str:
    """The task token an index was scored with: a CoNeTTE folder's, recorded by score_matrix."""
    return (info.get("checkpoint_info") or {}).get("task", "clotho")


def _check_model(index: Index) -> Model:
    """The index's checkpoint, refused when it is not the one that scored the index."""
    from aacray import checkpoint as ckpt_lib

    info = index.info
    model, tok, ck_info = ckpt_lib.load(info["checkpoint"], task=index_task(info))
    sha = hashlib.sha256(storage.read_bytes(ckpt_lib.weights_path(info["checkpoint"]))).hexdigest()[:16]
    was = info.get("checkpoint_info") or {}
    same = all(was.get(key) == ck_info.get(key) for key in ("epoch", "tokenizer_sha", "vocab_size"))
    if not same or (info.get("model_sha") and info["model_sha"] != sha):
        raise BadInputError(
            f"the checkpoint at {info['checkpoint']} is not the one that scored {index.uri} ({was} vs {ck_info}): "
            "new pairs would not be comparable. Restore it, or re-run score_matrix."
        )
    return Model(ck_info, sha, tok, model.cfg, sum(p.numel() for p in model.parameters()))


def _check_new(index: Index, new: NewData, all_ids: list[str], has_scores: bool) -> None:
    """Refuse what the index cannot take: a shortlist or pairs-file index, an index ranked by
    the authors' tie rule, audios
    without a scores table or on a bf16-refined index, captions whose ground-truth audio is
    not indexed."""
    if index.info.get("candidates", "exact") != "exact":
        raise BadInputError(
            f"{index.uri} was scored with candidates: {index.info['candidates']}: its lists rank listed pairs "
            "only, and new captions or audios would need a new shortlist over the whole union, which reindex "
            "does not build. Re-run score_matrix with candidates: shortlist over the union (shortlist.descriptions: "
            "this output reuses its audios' descriptions), or reindex an exact index."
        )
    if index.info.get("minmax_ties", "paper") != "paper":
        raise BadInputError(
            f"{index.uri} was scored with minmax_ties: {index.info['minmax_ties']}, whose min-max A2T lists "
            "reindex cannot update (it merges lists by the paper's tie rule). Re-run score_matrix over the "
            "union of captions and audios, or score the index with minmax_ties: paper to reindex it."
        )
    if new.d_n and not has_scores:
        raise BadInputError(
            f"{index.uri} (version {index.version}) has no scores table, and adding audios moves the min/max of "
            f"its {len(index.caption_ids)} captions, so their min-max A2T lists must be recomputed from the "
            "stored losses. Re-run score_matrix with write_scores: true (a full N x M rescore, once), then "
            "reindex. Adding captions alone needs no scores."
        )
    if new.d_n and index.info["precision"] == "bf16-refined":
        raise BadInputError(
            f"{index.uri} was scored with precision bf16-refined: its stored losses are fp32 only for the pairs of its "
            "top-k lists and caption min/max, and adding audios rescales every caption's min-max scores from "
            "those stored losses, which would then rank on bf16 values. Add captions alone, or re-run "
            "score_matrix over the union of audios (precision fp32 to allow adding audios later)."
        )
    if new.d_m:
        gts = [g for g in new.captions.column("audio_id").to_pylist() if g is not None]
        missing = sorted(set(gts) - set(all_ids))
        if missing:
            raise BadInputError(
                f"{len(missing)} new caption(s) name a ground-truth audio that is not in the index, e.g. "
                f"{missing[:5]}: add those audios too (new_audio) or drop the audio_id"
            )


def _minmax_sample(cfg: ReindexConfig, index: Index, all_ids: list[str]) -> dict | None:
    """The stored reference sample, drawn now on the first run that asks for one."""
    sample = index.info.get("minmax_sample")
    if cfg.minmax_sample is None:
        return sample
    if sample and (sample["size"], sample["seed"]) != (cfg.minmax_sample, cfg.minmax_seed):
        raise BadInputError(
            f"{index.uri} estimates min/max over a stored sample of {sample['size']} audios (seed "
            f"{sample['seed']}); this run asks for {cfg.minmax_sample} (seed {cfg.minmax_seed}). Every run "
            "must use the same sample: keep the stored settings."
        )
    return sample or {"size": cfg.minmax_sample, "seed": cfg.minmax_seed,
                      "audio_ids": draw_minmax_sample(all_ids, cfg.minmax_sample, cfg.minmax_seed)}


def actor_need(plan: Plan) -> dict[str, int]:
    """Bytes one scorer process holds (`scorer.scorer_memory`): every audio's frames are
    read at start-up and the model is loaded once; the audio index and its caches are
    held per scorer (all audios for new captions, the new audios for old captions); one
    unit is scored at a time, so the largest block counts."""
    m, cfg, new = plan.model, plan.cfg, plan.new
    precision = plan.index.info["precision"]
    max_frames = max([plan.index.max_frames] + ([int(pc.max(new.audio.column("n_frames")).as_py())] if new.d_n else []))
    n_all = len(plan.all_ids)
    held = [(n_all, cfg.caption_block_size)] if new.d_m else []
    if new.d_n:
        held.append((new.d_n, aud_block(cfg.caption_block_size, n_all, new.d_n)))
    forward = dict(vocab_size=m.tok.vocab_size, max_tokens=max((len(t) for u in plan.units for t in u.tokens), default=2),
                   pairs_per_batch=plan.index.info["pairs_per_batch"], gpu=cfg.actors.num_gpus > 0)
    parts = [scorer_memory(n, max_frames, m.cfg, m.n_params, precision, b, **forward) for n, b in held]
    start = scorer_memory(n_all, max_frames, m.cfg, m.n_params, precision, 0, **forward)
    need = {"embeddings": start["embeddings"], "model": start["model"],
            "index": sum(p["index"] for p in parts), "kv_cache": sum(p["kv_cache"] for p in parts),
            "block": max(p["block"] for p in parts), "forward": max(p["forward"] for p in parts)}
    need["total"] = sum(need.values())
    return need


def _set_up(plan: Plan) -> None:
    """Start Ray and check what an actor will hold, when actors score (inline: nothing)."""
    cfg = plan.cfg
    if plan.inline:
        log.info("reindex: %d new pairs <= inline_max_pairs: scoring in the driver", plan.n_pairs)
        return
    stage.start_ray("reindex", cfg.ray, cfg.actors)
    stage.check_actor_memory(
        "reindex", actor_need(plan), cfg.actors,
        f"every actor holds the whole audio index of {len(plan.all_ids)} audios: give it more memory "
        "(actors.memory_gb; on CPU more actors.num_cpus each, so fewer actors share a node; on GPU a "
        f"larger GPU), or lower caption_block_size (now {cfg.caption_block_size}) if the block part is large; "
        "or score the update inline (inline_max_pairs) on a driver with more memory.",
    )


def _stage_shared(plan: Plan) -> dict[str, dict]:
    """Clear what an unpublished attempt at this version left, start its folder, and write
    the rows later versions share. Returns the manifest entries of the shared tables."""
    out, index, new = plan.cfg.output, plan.index, plan.new
    versions.clear_unpublished(out, plan.version, SHARED)
    plan.output.begin(plan.cfg)
    tables: dict[str, dict] = {}
    for name, rows, added, per_file in (
        ("embeddings_added", new.d_n, new.audio, 256),
        ("captions_added", new.d_m, as_added(new.captions, plan.estimate) if new.d_m else None, 1 << 20),
    ):
        if rows:
            files = index.files(name) + versions.write_shards(out, name, plan.prefix, added, per_file)
            tables[name] = {"files": files, "rows": index.rows(name) + rows}
        elif index.files(name):
            tables[name] = index.manifest["tables"][name]
    return tables


def _score(plan: Plan, tables: dict[str, dict]) -> list[UnitResult]:
    """Every unit scored, inline or one unit at a time per actor of a pool."""
    cfg, info = plan.cfg, plan.index.info
    job = ScoreJob(
        output=cfg.output, checkpoint=info["checkpoint"], precision=info["precision"],
        refine_margin=plan.refine_margin, pairs_per_batch=info["pairs_per_batch"], k=info["k"],
        base_audio=info["base_audio"], added_files=tables.get("embeddings_added", {}).get("files", []),
        audio_ids=plan.all_ids, new_audio_ids=plan.new.audio_ids, has_cap_units=bool(plan.new.d_m),
        minmax_sample_ids=plan.sample["audio_ids"] if (plan.estimate and plan.new.d_m) else None,
        scores_uri=storage.join(cfg.output, "scores_added") if plan.has_scores else None, actors=cfg.actors,
        task=index_task(info),
    )
    if plan.inline:
        results = _score_inline(plan.units, job)
    else:
        import ray.data

        # 1. one row per unit, 2. scored on the actor pool, 3. collected
        ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in plan.units], override_num_blocks=len(plan.units))
        ds = stage.map_actors(ds, ReindexActor, {"job": job}, cfg.actors, batch_size=1, one_task_per_actor=True,
                              pool_size=plan.pool_size)
        results = [pickle.loads(r["result"]) for r in ds.iter_rows()]
    n_pairs = sum(r.n_pairs for r in results)
    if n_pairs != plan.n_pairs or len(results) != len(plan.units):
        raise RuntimeError(f"scored {n_pairs} pairs in {len(results)} units, expected {plan.n_pairs} in {len(plan.units)}")
    return results


def _score_inline(units: list[Unit], job: ScoreJob) -> list[UnitResult]:
    """The units scored in the driver on CPU, with an actor's thread count (same numerics)."""
    threads = torch.get_num_threads()
    try:
        scorer = unit_scorer(job, dataclasses.replace(job.actors, num_gpus=0))
        with torch.inference_mode():
            return [scorer(u) for u in units]
    finally:
        torch.set_num_threads(threads)


def _merge(plan: Plan, results: list[UnitResult]) -> Merged:
    """The version's stats and lists: the index's merged with the units' (module docstring)."""
    index, k = plan.index, plan.index.info["k"]
    stats = _merge_stats(plan, results)
    t2a = topk_merge([TopK.from_columns(index.read("topk_t2a"), "t2a")] + [r.t2a for r in results], k, "t2a")
    raw = topk_merge([TopK.from_columns(index.read("topk_a2t_raw"), "a2t_raw")] + [r.a2t_raw for r in results], k, "a2t_raw")
    score_files = index.files("scores")
    if plan.has_scores:
        score_files = score_files + [f"scores_added/{u.file}" for u in plan.units]
        missing = [f for f in score_files[-len(plan.units):] if not storage.exists(storage.join(plan.cfg.output, f))]
        if missing:
            raise RuntimeError(f"score shards missing after scoring: {missing[:3]}")
    t_mm = time.time()
    if plan.new.d_n:  # old captions' min/max moved: every min-max list from the stored losses
        mm = minmax_from_scores(plan.cfg.output, score_files, stats, k)
    else:
        prev = TopK.from_columns(index.read("topk_a2t"), "a2t_minmax")
        mm = topk_merge([prev] + [r.a2t_minmax for r in results if r.kind == "cap"], k, "a2t_minmax")
    minmax_seconds = time.time() - t_mm if plan.new.d_n else 0.0
    return Merged(stats, t2a, raw, mm, score_files, minmax_seconds)


def _merge_stats(plan: Plan, results: list[UnitResult]) -> CaptionStats:
    """Old captions: min of mins, max of maxes with the new audios' rows (estimated ones
    keep theirs); new captions: their blocks' stats."""
    index = plan.index
    stats = CaptionStats.from_columns(index.read("caption_stats"))
    aud = [r.stats for r in results if r.kind == "aud"]
    if aud:
        partial = aud[0]
        for s in aud[1:]:
            partial = merge_caption_stats(partial, s)
        flags = index.captions.column("minmax_estimated").to_pylist()
        est_ids = {c for c, e in zip(index.caption_ids, flags, strict=True) if e}
        if est_ids:  # estimated captions keep their stats: drop their partial rows
            keep = np.array([c not in est_ids for c in partial.caption_id.tolist()])
            partial = CaptionStats(partial.caption_id[keep], partial.loss_min[keep], partial.loss_max[keep], partial.n_audios[keep])
        stats = merge_caption_stats(stats, partial)
    for r in results:
        if r.kind == "cap":
            stats = merge_caption_stats(stats, r.stats)
    assert stats.caption_id.size == len(index.caption_ids) + plan.new.d_m, f"{stats.caption_id.size=}"
    return stats


def _timing(plan: Plan, results: list[UnitResult], t_start: float, t_end: float, merge_seconds: float) -> dict:
    """Where the scoring phase went (`stage.PoolWork.timing`): the units timed where they ran,
    on the actor pool or inline in the driver (then the one "actor" is the driver)."""
    work = stage.PoolWork()
    for r in results:
        work.add(r.actor, r.setup_seconds, r.started, r.seconds)
    return work.timing("reindex", plan.pool_size, t_start, t_end, merge_seconds)


def _run_info(plan: Plan, merged: Merged, results: list[UnitResult], timing: dict) -> dict:
    """The `reindex` entry of metrics.json (and of the summary)."""
    n_total, m_total = len(plan.all_ids), len(plan.index.caption_ids) + plan.new.d_m
    info = {
        "version": plan.version,
        "parent_version": plan.index.version,
        "run_key": plan.run_key,
        **plan.new.counts(),
        "pairs_scored": plan.n_pairs,
        "pairs_full": n_total * m_total,
        "scored_share": round(plan.n_pairs / (n_total * m_total), 6),
        "units": len(plan.units),
        "inline": plan.inline,
        "score_seconds": timing["ray_data_seconds"],
        "timing": timing,
        "minmax_recompute_seconds": round(merged.minmax_seconds, 2),
        "minmax_estimated_captions": plan.new.d_m if plan.estimate else 0,
    }
    if plan.index.info["precision"] == "bf16-refined":
        info["refine"] = refine_summary(plan.refine_margin, plan.n_pairs, sum(r.rescored for r in results),
                                        max(r.max_rel_err for r in results))
    return info


def _metrics(plan: Plan, merged: Merged, run_info: dict) -> dict:
    """metrics.json of the version: retrieval metrics from the merged lists, sizes, run info."""
    index, k = plan.index, plan.index.info["k"]
    gt_of = dict(zip(index.caption_ids, index.captions.column("audio_id").to_pylist(), strict=True))
    if plan.new.d_m:
        gt_of.update(zip(plan.new.caption_ids, plan.new.captions.column("audio_id").to_pylist(), strict=True))
    metrics: dict = {}
    if any(g is not None for g in gt_of.values()) and k >= 10:
        metrics = retrieval_metrics(merged.t2a, merged.raw, merged.mm, gt_of)
    n_total, m_total = len(plan.all_ids), len(gt_of)
    metrics.update({"n_audios": n_total, "n_captions": m_total, "n_pairs": n_total * m_total,
                    "checkpoint": plan.model.info, "reindex": run_info})
    return metrics


def _commit(plan: Plan, tables: dict[str, dict], merged: Merged, results: list[UnitResult],
            timing: dict, t_start: float) -> dict:
    """Write the version (tables, metrics, manifest last), point `_CURRENT.json` at it,
    apply retention. Returns the run's summary fields."""
    out, vout, n = plan.cfg.output, plan.output, plan.version
    for name, topk in (("caption_stats", merged.stats), ("topk_t2a", merged.t2a), ("topk_a2t", merged.mm),
                       ("topk_a2t_raw", merged.raw)):
        data = pa.table(topk.columns())
        tables[name] = {"files": versions.relative(out, vout.table(name, data)), "rows": data.num_rows}
    if plan.has_scores:
        tables["scores"] = {"files": merged.score_files, "rows": plan.index.rows("scores") + plan.n_pairs}
    run_info = _run_info(plan, merged, results, timing)
    metrics = _metrics(plan, merged, run_info)
    vout.json("metrics.json", metrics)
    vdir = versions.version_path(n)
    new_info = {**plan.index.info, "checkpoint_info": plan.model.info, "model_sha": plan.model.sha,
                "applied_runs": list(plan.index.info.get("applied_runs", [])) + [plan.run_key], "minmax_sample": plan.sample}
    manifest = {
        "job": "reindex", "version": n, "parent_version": plan.index.version, "base": plan.base_digest,
        "created_unix": time.time(), "tables": tables,
        "extra": {"metrics": f"{vdir}/metrics.json", "config": f"{vdir}/config.yaml", "plots": [],
                  "run_key": plan.run_key, "pairs_scored": plan.n_pairs, "index": new_info},
    }
    if versions.manifest_digest(out) != plan.base_digest:
        raise BadInputError(f"{out}: the root output was rewritten during this run (score_matrix?); version {n} not committed")
    storage.write_json(vout.path(storage.MANIFEST), manifest)
    versions.set_current(out, n, plan.base_digest, run_key=plan.run_key)
    versions.retain(out, plan.cfg.keep_versions, n, SHARED)
    log.info("reindex: committed version %d of %s: +%d captions, +%d audios, %d pairs scored (%.2f%% of %d)",
             n, out, plan.new.d_m, plan.new.d_n, plan.n_pairs, 100 * run_info["scored_share"], run_info["pairs_full"])
    return {"status": "committed", "version": n, **run_info, "wall_seconds": round(time.time() - t_start, 2),
            **{key: metrics[key] for key in ("t2a", "a2t_raw", "a2t_minmax") if key in metrics}}
