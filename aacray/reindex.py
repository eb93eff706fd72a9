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
A new pair is scored by the same `PairScorer` with the index's own model, pairs_per_batch
and precision. New captions are scored against the whole audio index, one caption at a
time against the same audio chunks as score_matrix, so adding captions reproduces a full
recompute to the bit (given the same audio order, device and threads). Adding audios
changes batch composition: new audios x old captions run in smaller audio batches, and a
full recompute on the union scores the old pairs in larger ones than the original run
did, so losses may differ in the last bit (seen: up to 7e-7, some runs none). Rankings
then agree unless two candidates tie within that; tests require equal ids and ranks,
losses within 1e-6 and min-max scores within that over the loss span, and print which held.

Versions. Version 0 is the score_matrix output at the folder root. A run writes version
n+1 under `versions/<n+1>/` (stats, top-k, metrics, its manifest last) and then replaces
`_CURRENT.json` (one atomic write); `storage.read_manifest` follows it, so readers see one
complete version and an interrupted run leaves the previous one current. Data a version
shares with its successors is append-only at the root, named by the version that added
it: `scores_added/vNNNN-*.parquet` (new pairs; the `scores` table of a version lists
version 0's `scores/` shards and these), `captions_added/`, `embeddings_added/` (copies of
the added rows, so later runs never depend on a caption file or an extract output that may
be rewritten). Manifests list files relative to the root, so nothing is copied twice.
`keep_versions` bounds the version folders kept; shared files no kept version lists are
collected.

Idempotence. A run is keyed by a digest of its new-data inputs (`submission_id`, also the
`ray job submit --submission-id`); a key already applied to the index is a no-op, and ids
already in the index are skipped, so a rerun changes nothing. One writer at a time: a lock
file `_LOCK.json` created atomically (O_CREAT|O_EXCL locally, a conditional PUT with
If-None-Match on S3). A lock whose pid is dead on this host, or older than `stale_lock_s`,
is broken; anything else is refused with the owner's name, pid and start time.

Estimated min/max (paper 5, `minmax_sample`): the captions a run adds get min/max over a
fixed, seeded sample of index audios (stored in the manifest, reused by every later run)
instead of every audio; their stats then never move. `--minmax-eval` measures what it
costs in min-max A2T Recall@k.

CLI: `python -m aacray.reindex --submission-id CONFIG [k=v ...]`, `--bench`,
`--minmax-eval SCORE_OUTPUT`.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import logging
import os
import pickle
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from aacray import storage
from aacray.embeddings import EMB_DIM, check_embeddings, read_captions, read_embeddings
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
from aacray.scorer import REFINE_MARGIN, refine_summary, tokenize
from aacray.text import normalize

log = logging.getLogger("aacray.reindex")

LOCK = "_LOCK.json"
SHARED = ("scores_added", "captions_added", "embeddings_added")  # append-only, at the root
VERSION_TABLES = ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw")
ADDED_CAPTION_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("subset", pa.string()),
        ("text", pa.string()),
        ("audio_id", pa.string()),
        ("minmax_estimated", pa.bool_()),
    ]
)


class ReindexError(ValueError):
    """A reindex refused before changing anything; the message says why and what to do."""


class LockError(ReindexError):
    """Another reindex holds the output's lock."""


# --------------------------------------------------------------------------------------
# Run key
# --------------------------------------------------------------------------------------


def source_digest(uri: str) -> str:
    """Digest of a data source: a caption file's bytes, or an output folder's manifest
    (which names every file and is rewritten by every run of the job that made it)."""
    if uri.endswith((".csv", ".parquet")):
        data = storage.read_bytes(uri)
    else:
        try:
            data = storage.read_bytes(storage.join(uri, storage.MANIFEST))
        except FileNotFoundError:
            raise ReindexError(f"{uri}: not a caption file (.csv/.parquet) nor a complete output ({storage.MANIFEST} missing)") from None
    return hashlib.sha256(data).hexdigest()


def submission_id(cfg) -> str:
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
# The lock
# --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_stale(lock: dict, stale_s: float | None) -> str | None:
    """Why a lock may be broken, or None."""
    if lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", -1))):
        return f"its process {lock.get('pid')} is gone from this host"
    age = time.time() - float(lock.get("created_unix", 0))
    if stale_s is not None and age > stale_s:
        return f"it is {age:.0f} s old (stale_lock_s={stale_s:g})"
    return None


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create a file only if absent; False when it exists."""
    fs, path = storage.get_fs(uri)
    if not storage.is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:  # S3: PUT with If-None-Match: * (s3fs mode="create"); AWS S3, MinIO, moto honour it
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _break_lock(uri: str, seen: dict) -> None:
    """Remove a stale lock, but only the one judged stale (another run may replace it)."""
    fs, path = storage.get_fs(uri)
    if storage.is_remote(uri):
        # no compare-and-delete on S3: re-read and delete (a race of two breakers within
        # that window is possible; see docs/reindex.md)
        if storage.read_json(uri).get("token") == seen.get("token"):
            storage.remove(uri)
        return
    tomb = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return
    with open(tomb, "rb") as f:
        moved = json.loads(f.read() or b"{}")
    if moved.get("token") != seen.get("token"):  # not the one we judged: put it back
        try:
            os.link(tomb, path)
        finally:
            os.remove(tomb)
        raise LockError(f"{uri}: the lock changed hands while it was being broken; try again")
    os.remove(tomb)


class Lock:
    """`with Lock(output, run_key, stale_s):` one writer per output (module docstring)."""

    def __init__(self, output: str, run_key: str, stale_s: float | None = None):
        self.uri = storage.join(output, LOCK)
        self.stale_s = stale_s
        self.info = {
            "owner": f"{_user()}@{socket.gethostname()}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created_unix": time.time(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_key": run_key,
            "token": uuid.uuid4().hex,
        }

    def __enter__(self) -> Lock:
        data = json.dumps(self.info, indent=2).encode()
        for _ in range(2):
            if _create_exclusive(self.uri, data):
                if storage.is_remote(self.uri) and storage.read_json(self.uri).get("token") != self.info["token"]:
                    raise LockError(f"{self.uri}: lost a race for the lock (the store may ignore If-None-Match)")
                return self
            try:
                held = storage.read_json(self.uri)
            except FileNotFoundError:
                continue  # released meanwhile
            except json.JSONDecodeError:
                held = {}
            why = _lock_stale(held, self.stale_s)
            if why is None:
                raise LockError(
                    f"{self.uri}: another reindex holds this output: owner {held.get('owner')}, pid "
                    f"{held.get('pid')}, since {held.get('created')} (run {held.get('run_key')}). Wait for it, "
                    f"or if it died elsewhere delete {self.uri} (or set stale_lock_s)."
                )
            log.warning("breaking the stale lock %s: %s", self.uri, why)
            _break_lock(self.uri, held)
        raise LockError(f"{self.uri}: could not take the lock (another run took it meanwhile)")

    def __exit__(self, *exc) -> None:
        try:
            if storage.read_json(self.uri).get("token") == self.info["token"]:
                storage.remove(self.uri)
        except FileNotFoundError:
            pass


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------
# The index as it stands
# --------------------------------------------------------------------------------------


@dataclass
class Index:
    """What a run needs to know of the current version of an output."""

    uri: str
    version: int
    manifest: dict
    info: dict
    """manifest extra "index": checkpoint, model_sha, k, pairs_per_batch, precision,
    base_audio / base_captions {uri, subsets}, applied_runs, minmax_sample."""
    audio_ids: list[str] = field(default_factory=list)
    """Index order: the base source's, then added audios in the order they came."""
    caption_ids: list[str] = field(default_factory=list)
    captions: pa.Table | None = None
    """Every caption of the index (caption_id, subset, text, audio_id, minmax_estimated)."""

    def files(self, table: str) -> list[str]:
        t = self.manifest["tables"].get(table)
        return list(t["files"]) if t else []

    def rows(self, table: str) -> int:
        t = self.manifest["tables"].get(table)
        return int(t["rows"]) if t else 0

    def read(self, table: str) -> pa.Table:
        return storage.read_table(self.uri, table, manifest=self.manifest)


def _index_info(uri: str, manifest: dict) -> dict:
    if manifest.get("job") == "reindex":
        return dict(manifest["extra"]["index"])
    if manifest.get("job") != "score_matrix":
        raise ReindexError(f"{uri} is a {manifest.get('job')!r} output; reindex updates score_matrix outputs")
    import yaml

    from aacray.config import saved_score_config

    cfg = saved_score_config(yaml.safe_load(storage.read_bytes(storage.join(uri, "config.yaml"))))
    sc = cfg.scorer
    metrics = storage.read_json(storage.join(uri, manifest["extra"].get("metrics", "metrics.json")))
    return {
        "checkpoint": cfg.checkpoint,
        "checkpoint_info": metrics.get("checkpoint"),
        "model_sha": None,
        "k": cfg.k,
        "pairs_per_batch": sc.pairs_per_batch,
        "precision": sc.precision,
        "refine_margin": sc.refine_margin if sc.precision == "bf16-refined" else None,
        "base_audio": {"uri": cfg.audio, "subsets": cfg.audio_subsets},
        "base_captions": {"uri": cfg.captions, "subsets": cfg.caption_subsets},
        "base_digests": None,
        "applied_runs": [],
        "minmax_sample": None,
    }


def _read_files(uri: str, files: list[str], columns: list[str] | None = None) -> pa.Table | None:
    parts = []
    for f in files:
        fs, path = storage.get_fs(storage.join(uri, f))
        with fs.open(path, "rb") as fh:
            parts.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _base_audio_ids(src: dict) -> list[str]:
    t = storage.read_table(src["uri"], "embeddings", columns=["audio_id", "subset"])
    if src["subsets"] is not None:
        t = t.filter(pc.is_in(t.column("subset"), pa.array(src["subsets"])))
    return t.column("audio_id").to_pylist()


def _as_added(t: pa.Table, estimated: bool | None) -> pa.Table:
    """A caption table in the captions_added schema (estimated None: keep the column)."""
    names = ["caption_id", "subset", "text", "audio_id"]
    flags = t.column("minmax_estimated") if estimated is None else pa.array([estimated] * t.num_rows, pa.bool_())
    return pa.table([t.column(n) for n in names] + [flags], names=[*names, "minmax_estimated"]).cast(ADDED_CAPTION_SCHEMA)


def load_index(uri: str, manifest: dict | None = None) -> Index:
    """The current version of a score_matrix output, checked against its sources."""
    manifest = manifest or storage.read_manifest(uri)
    info = _index_info(uri, manifest)
    idx = Index(uri, int(manifest.get("version", 0)), manifest, info)
    # audios: base source + added rows; they must be the audios the lists rank
    added = _read_files(uri, idx.files("embeddings_added"), ["audio_id"])
    idx.audio_ids = _base_audio_ids(info["base_audio"]) + (added.column("audio_id").to_pylist() if added else [])
    listed = set(pc.unique(idx.read("topk_a2t_raw").column("audio_id")).to_pylist())
    if set(idx.audio_ids) != listed or len(listed) != len(idx.audio_ids):
        extra, missing = set(idx.audio_ids) - listed, listed - set(idx.audio_ids)
        raise ReindexError(
            f"{uri} (version {idx.version}): its audio source {info['base_audio']} no longer holds the "
            f"audios it indexed ({len(extra)} unknown, e.g. {sorted(extra)[:3]}; {len(missing)} gone, e.g. "
            f"{sorted(missing)[:3]}). Re-run score_matrix, or give added audios as new_audio."
        )
    base = _as_added(read_captions(info["base_captions"]["uri"], info["base_captions"]["subsets"]), False)
    added_caps = _read_files(uri, idx.files("captions_added"))
    caps = pa.concat_tables([base] + ([_as_added(added_caps, None)] if added_caps else []))
    stats_ids = set(idx.read("caption_stats").column("caption_id").to_pylist())
    ids = caps.column("caption_id").to_pylist()
    if set(ids) != stats_ids or len(ids) != len(stats_ids):
        raise ReindexError(
            f"{uri} (version {idx.version}): its caption source {info['base_captions']} no longer holds "
            f"the captions it indexed ({len(set(ids) - stats_ids)} unknown, {len(stats_ids - set(ids))} gone). "
            "Re-run score_matrix, or give added captions as new_captions."
        )
    digests = {"audio": source_digest(info["base_audio"]["uri"]), "captions": source_digest(info["base_captions"]["uri"])}
    if not info.get("base_digests"):  # first reindex: a source output newer than the index was rewritten
        built = storage.read_json(storage.join(uri, storage.MANIFEST)).get("created_unix", 0)
        for src in (info["base_audio"], info["base_captions"]):
            if not src["uri"].endswith((".csv", ".parquet")):
                made = storage.read_json(storage.join(src["uri"], storage.MANIFEST)).get("created_unix", 0)
                if made > built:
                    raise ReindexError(
                        f"{uri}: its source {src['uri']} was rewritten after the index was built; ids match "
                        "but embeddings or texts may not. Re-run score_matrix on the new source."
                    )
    elif info["base_digests"] != digests:
        raise ReindexError(
            f"{uri}: a base source was rewritten since version 1 was built ({info['base_digests']} -> {digests}); "
            "ids still match but embeddings or texts may not. Re-run score_matrix on the new sources."
        )
    info["base_digests"] = digests
    idx.caption_ids, idx.captions = ids, caps
    return idx


# --------------------------------------------------------------------------------------
# New data
# --------------------------------------------------------------------------------------


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
    return "c-" + hashlib.sha1(normalize(text).encode()).hexdigest()[:16]


def read_new_captions(cfg, index: Index) -> tuple[pa.Table, int]:
    """(captions not yet in the index, how many were skipped as already there)."""
    t = read_captions(cfg.new_captions, cfg.new_caption_subsets)
    if not _has_caption_ids(cfg.new_captions):
        t = t.set_column(0, "caption_id", pa.array([text_caption_id(x or "") for x in t.column("text").to_pylist()], pa.string()))
    known = dict(zip(index.caption_ids, index.captions.column("text").to_pylist(), strict=True))
    keep, seen, skipped, bad = [], {}, 0, []
    for i, (c, x) in enumerate(zip(t.column("caption_id").to_pylist(), t.column("text").to_pylist(), strict=True)):
        if c in known:
            if normalize(known[c] or "") != normalize(x or ""):
                bad.append(f"caption {c!r} is in the index with another text ({known[c]!r} vs {x!r}): updates are not supported, use a new id")
            skipped += 1
        elif c in seen:
            if normalize(seen[c] or "") != normalize(x or ""):
                bad.append(f"caption id {c!r} appears twice with different texts")
            skipped += 1
        else:
            seen[c] = x
            keep.append(i)
    empty = [c for c, x in seen.items() if not normalize(x or "")]
    if empty:
        bad.append(f"captions empty after normalisation: {empty[:10]}")
    if bad:
        raise ReindexError(f"reindex refused {cfg.new_captions}, nothing was changed:\n  " + "\n  ".join(bad[:20]))
    return t.take(pa.array(keep, pa.int64())), skipped


def read_new_audio(cfg, index: Index) -> tuple[pa.Table, int]:
    """(embedding rows of audios not yet in the index, how many were skipped)."""
    t = storage.read_table(cfg.new_audio, "embeddings")
    if cfg.new_audio_subsets is not None:
        t = t.filter(pc.is_in(t.column("subset"), pa.array(cfg.new_audio_subsets)))
    ids = t.column("audio_id").to_pylist()
    known = set(index.audio_ids)
    keep = [i for i, a in enumerate(ids) if a not in known]
    t = t.take(pa.array(keep, pa.int64()))
    es = _embedding_set(t)
    bad = [f"audio {a}: {why}" for a, why in check_embeddings(es, "index")]
    if bad:
        raise ReindexError(f"reindex refused {cfg.new_audio}, nothing was changed:\n  " + "\n  ".join(bad[:20]))
    return t, len(ids) - len(keep)


def _embedding_set(table: pa.Table):
    from aacray.embeddings import EmbeddingSet, _chunk_frames

    col = table.column("embedding")
    frames = []
    for chunk in col.chunks:
        frames.extend(_chunk_frames(chunk, EMB_DIM))
    return EmbeddingSet(table.column("audio_id").to_pylist(), table.column("subset").to_pylist(), frames)


def draw_minmax_sample(audio_ids: list[str], size: int, seed: int) -> list[str]:
    """The reference sample: `size` audio ids drawn without replacement by a seeded rng from
    the sorted ids, returned sorted. Deterministic in (ids, size, seed)."""
    pool = sorted(audio_ids)
    if size > len(pool):
        raise ReindexError(f"minmax_sample={size} but the index holds {len(pool)} audios")
    pick = np.random.default_rng(seed).choice(len(pool), size=size, replace=False)
    return sorted(pool[i] for i in pick)


# --------------------------------------------------------------------------------------
# Scoring units (the same code in an actor and inline)
# --------------------------------------------------------------------------------------


def _minmax_topk_dense(L: np.ndarray, a_ids: np.ndarray, c_ids: np.ndarray, mn, mx, k: int) -> TopK:
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
    """Scores one unit: kind "cap" = new captions x every audio of the new index, kind "aud"
    = the new audios x a block of old captions. Pure torch + numpy (no Ray)."""

    def __init__(self, job: dict, device: str = "cpu"):
        from aacray import checkpoint as ckpt_lib
        from aacray.scorer import BlockScorer

        model, tok, _ = ckpt_lib.load(job["checkpoint"], device)
        es = read_embeddings(job["base_audio"]["uri"], job["base_audio"]["subsets"])
        ids, frames = list(es.audio_ids), list(es.frames)
        if job["added_files"]:
            add = _embedding_set(_read_files(job["output"], job["added_files"]))
            ids += add.audio_ids
            frames += add.frames
        if ids != job["audio_ids"]:
            raise RuntimeError("the audio index read by the scorer differs from the driver's (a source changed mid-run?)")
        new = set(job["new_audio_ids"])
        self.all_ids = np.array(ids, dtype=str)
        self.new_ids = np.array([a for a in ids if a in new], dtype=str)
        mk = lambda fr: BlockScorer(  # noqa: E731
            model, tok.pad_id, fr, device, job["precision"], job["pairs_per_batch"], job["refine_margin"]
        )
        self.scorer_all = mk(frames) if job["has_cap_units"] else None
        self.scorer_new = mk([f for a, f in zip(ids, frames, strict=True) if a in new]) if new else None
        pos = {a: i for i, a in enumerate(ids)}
        self.sample_rows = [pos[a] for a in job["minmax_sample_ids"]] if job["minmax_sample_ids"] else None
        self.k = job["k"]
        self.scores_uri = job["scores_uri"]
        self.prefix = job["prefix"]

    def __call__(self, unit: dict) -> dict:
        t0 = time.time()
        cids = np.array(unit["caption_ids"], dtype=str)
        if unit["kind"] == "cap":
            # bf16-refined: the refined pairs include the windows of the (estimated) min/max
            a_ids, (L, refined) = self.all_ids, self.scorer_all.losses(unit["tokens"], self.k, self.sample_rows)
        else:
            a_ids, (L, refined) = self.new_ids, self.scorer_new.losses(unit["tokens"], self.k)
        out = {
            "rescored": refined["rescored"] if refined else 0,
            "max_rel_err": refined["max_rel_err"] if refined else 0.0,
            "kind": unit["kind"],
            "t2a": topk_t2a(L, a_ids, cids, self.k),
            "a2t_raw": topk_a2t_raw(L, a_ids, cids, self.k),
            "n_pairs": int(L.size),
        }
        if unit["kind"] == "cap":
            exact = caption_stats(L, cids)
            if self.sample_rows is None:
                out["stats"] = exact
                out["a2t_minmax"] = topk_a2t_minmax(L, a_ids, cids, self.k, exact.loss_min, exact.loss_max)
            else:
                est = caption_stats(L[self.sample_rows], cids)
                out["stats"] = est
                out["a2t_minmax"] = _minmax_topk_dense(L, a_ids, cids, est.loss_min, est.loss_max, self.k)
        else:
            out["stats"] = caption_stats(L, cids)  # partial: over the new audios only
        if self.scores_uri:
            n, m = L.shape
            t = pa.table(
                {
                    "audio_id": pa.array(np.repeat(a_ids.astype(object), m), pa.string()),
                    "caption_id": pa.array(np.tile(cids.astype(object), n), pa.string()),
                    "loss": pa.array(L.reshape(-1), pa.float32()),
                }
            )
            buf = io.BytesIO()
            pq.write_table(t, buf)
            storage.write_bytes(storage.join(self.scores_uri, unit["file"]), buf.getvalue())
        out["seconds"] = time.time() - t0
        return out


class ReindexActor:
    """Ray Data actor: a pickled unit per row -> its pickled result."""

    def __init__(self, job: dict):
        use_gpu = job["num_gpus"] > 0 and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, int(job["num_cpus"])))
        self.scorer = UnitScorer(job, "cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            res = [pickle.dumps(self.scorer(pickle.loads(u))) for u in batch["unit"]]
        return {"result": np.array(res, dtype=object)}


def _unit_file(prefix: str, kind: str, cids: list[str]) -> str:
    return f"{prefix}-{kind}-{hashlib.sha1(chr(0).join(cids).encode()).hexdigest()[:16]}.parquet"


def plan_units(prefix, new_cids, new_tokens, old_cids, old_tokens, n_all, n_new, block) -> list[dict]:
    """Blocks of captions sorted by length. "cap" blocks hold `block` new captions (x n_all
    audios); "aud" blocks hold enough old captions for about the same pairs (x n_new audios)."""
    units = []

    def cut(kind, cids, tokens, size):
        order = sorted(range(len(cids)), key=lambda j: (len(tokens[j]), cids[j]))
        for s in range(0, len(order), size):
            sel = order[s : s + size]
            c = [cids[j] for j in sel]
            units.append({"kind": kind, "caption_ids": c, "tokens": [tokens[j] for j in sel], "file": _unit_file(prefix, kind, c)})

    if new_cids:
        cut("cap", new_cids, new_tokens, block)
    if n_new and old_cids:
        cut("aud", old_cids, old_tokens, max(block, block * n_all // max(n_new, 1)))
    return units


def _run_units(units: list[dict], job: dict, cfg) -> list[dict]:
    n_pairs = sum(len(u["caption_ids"]) * (len(job["audio_ids"]) if u["kind"] == "cap" else len(job["new_audio_ids"])) for u in units)
    if n_pairs <= cfg.inline_max_pairs:
        log.info("reindex: %d new pairs <= inline_max_pairs: scoring in the driver", n_pairs)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(cfg.actors.num_cpus)))  # as in an actor: same numerics
        try:
            scorer = UnitScorer(job)
            with torch.inference_mode():
                return [scorer(u) for u in units]
        finally:
            torch.set_num_threads(threads)
    import ray.data

    from aacray.runtime import init_ray

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    # 1. one row per unit (blocks of captions), 2. scored on the actor pool, 3. collected
    ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        ReindexActor,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.actors.num_actors, len(units))), max_tasks_in_flight_per_actor=1),
        num_gpus=cfg.actors.num_gpus,
        num_cpus=cfg.actors.num_cpus,
    )
    return [pickle.loads(r["result"]) for r in ds.iter_rows()]


# --------------------------------------------------------------------------------------
# Min-max lists from stored losses
# --------------------------------------------------------------------------------------


def minmax_from_scores(uri: str, files: list[str], stats: CaptionStats, k: int) -> TopK:
    """Min-max A2T lists of every audio from the `scores` shards (flat rows), with `stats`:
    the scores are `retrieval.minmax_scale`'s, elementwise, so lists equal a dense ranking."""
    parts, rows = [], 0
    for f in files:
        t = _read_files(uri, [f])
        cids = np.asarray(t.column("caption_id").to_numpy(zero_copy_only=False)).astype(str)
        uniq, inv = np.unique(cids, return_inverse=True)
        mn, mx = stats.aligned(uniq)
        mn, mx = mn[inv], mx[inv]
        loss = t.column("loss").to_numpy().astype(np.float64)
        span = mx - mn
        score = np.zeros(loss.shape, dtype=np.float64)
        np.divide(loss - mn, span, out=score, where=span > 0)
        aids = np.asarray(t.column("audio_id").to_numpy(zero_copy_only=False)).astype(str)
        parts.append(topk_select(aids, cids, score, loss, k, "a2t_minmax"))
        rows += len(parts[-1])
        if rows > 1 << 20:
            parts, rows = [topk_merge(parts, k, "a2t_minmax")], len(parts[0])
    return topk_merge(parts, k, "a2t_minmax")


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def _write_shards(uri: str, folder: str, prefix: str, table: pa.Table, rows_per_file: int = 256) -> list[str]:
    """Write a table as `uri/folder/<prefix>-part-i.parquet`; root-relative paths back."""
    out = []
    for i, s in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        buf = io.BytesIO()
        pq.write_table(table.slice(s, rows_per_file), buf)
        rel = f"{folder}/{prefix}-part-{i:05d}.parquet"
        storage.write_bytes(storage.join(uri, rel), buf.getvalue())
        out.append(rel)
    return out


def _rel(uri: str, full: list[str]) -> list[str]:
    prefix = storage.join(uri, "")
    return [f[len(prefix) :] for f in full]


def _model_sha(checkpoint: str) -> str:
    from aacray import checkpoint as ckpt_lib

    return hashlib.sha256(storage.read_bytes(storage.join(ckpt_lib.resolve(checkpoint), "model.pt"))).hexdigest()[:16]


def run_reindex(cfg) -> dict:
    """Add cfg.new_captions / cfg.new_audio to the score_matrix output cfg.output: scores the
    new pairs only, commits a new version. Returns a summary (status committed/unchanged)."""
    if not cfg.new_captions and not cfg.new_audio:
        raise ReindexError("nothing to add: set new_captions and/or new_audio")
    t_start = time.time()
    run_key = submission_id(cfg)
    out = cfg.output
    storage.read_manifest(out)  # a missing or incomplete output fails before any lock is taken
    with Lock(out, run_key, cfg.stale_lock_s):
        base_digest = storage.manifest_digest(out)
        manifest = storage.read_manifest(out)
        version = int(manifest.get("version", 0))
        summary = {"output": out, "run_key": run_key, "parent_version": version}
        if run_key in _index_info(out, manifest).get("applied_runs", []):
            log.info("reindex: run %s was applied already (version %d): nothing to do", run_key, version)
            return {**summary, "status": "unchanged", "reason": "this run's inputs were applied already", "version": version}
        index = load_index(out, manifest)
        info = index.info

        # 1. model and numerics: the index's own
        from aacray import checkpoint as ckpt_lib

        model, tok, ck_info = ckpt_lib.load(info["checkpoint"])
        max_tokens = model.cfg.max_len + 1
        del model
        model_sha = _model_sha(info["checkpoint"])
        was = info.get("checkpoint_info") or {}
        same = all(was.get(key) == ck_info.get(key) for key in ("epoch", "tokenizer_sha", "vocab_size"))
        if not same or (info.get("model_sha") and info["model_sha"] != model_sha):
            raise ReindexError(
                f"the checkpoint at {info['checkpoint']} is not the one that scored {out} ({was} vs {ck_info}): "
                "new pairs would not be comparable. Restore it, or re-run score_matrix."
            )

        # 2. new data, minus what the index holds
        new_caps, skipped_caps = (read_new_captions(cfg, index) if cfg.new_captions else (None, 0))
        new_aud, skipped_aud = (read_new_audio(cfg, index) if cfg.new_audio else (None, 0))
        d_m = new_caps.num_rows if new_caps is not None else 0
        d_n = new_aud.num_rows if new_aud is not None else 0
        summary.update(new_captions=d_m, new_audios=d_n, skipped_captions=skipped_caps, skipped_audios=skipped_aud)
        if d_m == 0 and d_n == 0:
            log.info("reindex: every caption and audio given is in the index already: nothing to do")
            return {**summary, "status": "unchanged", "reason": "nothing new", "version": index.version}
        new_audio_ids = new_aud.column("audio_id").to_pylist() if d_n else []
        all_ids = index.audio_ids + new_audio_ids
        has_scores = "scores" in index.manifest["tables"]
        if d_n and not has_scores:
            raise ReindexError(
                f"{out} (version {index.version}) has no scores table, and adding audios moves the min/max of "
                f"its {len(index.caption_ids)} captions, so their min-max A2T lists must be recomputed from the "
                "stored losses. Re-run score_matrix with write_scores: true (a full N x M rescore, once), then "
                "reindex. Adding captions alone needs no scores."
            )
        # indexes scored before refine_margin existed have none: the default
        refine_margin = info.get("refine_margin") or REFINE_MARGIN
        if d_n and info["precision"] == "bf16-refined":
            raise ReindexError(
                f"{out} was scored with precision bf16-refined: its stored losses are fp32 only for the pairs of its "
                "top-k lists and caption min/max, and adding audios rescales every caption's min-max scores from "
                "those stored losses, which would then rank on bf16 values. Add captions alone, or re-run "
                "score_matrix over the union of audios (precision fp32 to allow adding audios later)."
            )
        if d_m:
            gts = [g for g in new_caps.column("audio_id").to_pylist() if g is not None]
            missing = sorted(set(gts) - set(all_ids))
            if missing:
                raise ReindexError(
                    f"{len(missing)} new caption(s) name a ground-truth audio that is not in the index, e.g. "
                    f"{missing[:5]}: add those audios too (new_audio) or drop the audio_id"
                )
        sample = info.get("minmax_sample")
        if cfg.minmax_sample is not None:
            if sample and (sample["size"], sample["seed"]) != (cfg.minmax_sample, cfg.minmax_seed):
                raise ReindexError(
                    f"{out} estimates min/max over a stored sample of {sample['size']} audios (seed "
                    f"{sample['seed']}); this run asks for {cfg.minmax_sample} (seed {cfg.minmax_seed}). Every run "
                    "must use the same sample: keep the stored settings."
                )
            if not sample:
                sample = {"size": cfg.minmax_sample, "seed": cfg.minmax_seed,
                          "audio_ids": draw_minmax_sample(all_ids, cfg.minmax_sample, cfg.minmax_seed)}
        estimate = cfg.minmax_sample is not None

        # 3. the new version's number and its shared rows (added captions, added audios)
        # A folder numbered above the current version was never published (a crashed run)
        # or belongs to versions voided by a rewrite of the root: dead, so n is reused.
        n = index.version + 1
        vdir = storage.version_path(n)
        prefix = f"v{n:04d}"
        storage.remove(storage.join(out, vdir))
        for folder in SHARED:
            for f in storage.list_files(storage.join(out, folder), ".parquet"):
                if os.path.basename(f).startswith(prefix + "-"):
                    storage.remove(f)
        tables: dict[str, dict] = {}
        added_files = index.files("embeddings_added")
        if d_n:
            added_files = added_files + _write_shards(out, "embeddings_added", prefix, new_aud)
            tables["embeddings_added"] = {"files": added_files, "rows": index.rows("embeddings_added") + d_n}
        elif added_files:
            tables["embeddings_added"] = index.manifest["tables"]["embeddings_added"]
        cap_files = index.files("captions_added")
        if d_m:
            cap_files = cap_files + _write_shards(out, "captions_added", prefix, _as_added(new_caps, estimate), 1 << 20)
            tables["captions_added"] = {"files": cap_files, "rows": index.rows("captions_added") + d_m}
        elif cap_files:
            tables["captions_added"] = index.manifest["tables"]["captions_added"]

        # 4. score the new pairs
        new_cids = new_caps.column("caption_id").to_pylist() if d_m else []
        new_tokens = tokenize(tok, new_caps.column("text").to_pylist(), max_tokens) if d_m else []
        old_cids = index.caption_ids if d_n else []
        old_tokens = tokenize(tok, index.captions.column("text").to_pylist(), max_tokens) if d_n else []
        units = plan_units(prefix, new_cids, new_tokens, old_cids, old_tokens, len(all_ids), d_n, cfg.caption_block_size)
        job = {
            "output": out,
            "checkpoint": info["checkpoint"],
            "precision": info["precision"],
            "refine_margin": refine_margin,
            "pairs_per_batch": info["pairs_per_batch"],
            "k": info["k"],
            "base_audio": info["base_audio"],
            "added_files": added_files,
            "audio_ids": all_ids,
            "new_audio_ids": new_audio_ids,
            "has_cap_units": bool(d_m),
            "minmax_sample_ids": sample["audio_ids"] if (estimate and d_m) else None,
            "scores_uri": storage.join(out, "scores_added") if has_scores else None,
            "prefix": prefix,
            "num_gpus": cfg.actors.num_gpus,
            "num_cpus": cfg.actors.num_cpus,
        }
        t_score = time.time()
        results = _run_units(units, job, cfg)
        score_seconds = time.time() - t_score
        n_pairs = sum(r["n_pairs"] for r in results)
        expected = len(all_ids) * d_m + d_n * len(index.caption_ids)
        if n_pairs != expected or len(results) != len(units):
            raise RuntimeError(f"scored {n_pairs} pairs in {len(results)} units, expected {expected} in {len(units)}")

        # 5. merge
        k = info["k"]
        prev_stats = CaptionStats.from_columns(index.read("caption_stats"))
        cap_res = [r for r in results if r["kind"] == "cap"]
        aud_res = [r for r in results if r["kind"] == "aud"]
        stats = prev_stats
        if aud_res:
            partial = aud_res[0]["stats"]
            for r in aud_res[1:]:
                partial = merge_caption_stats(partial, r["stats"])
            est_ids = set(c for c, e in zip(index.caption_ids, index.captions.column("minmax_estimated").to_pylist(), strict=True) if e)
            if est_ids:  # estimated captions keep their stats: drop their partial rows
                keep = np.array([c not in est_ids for c in partial.caption_id.tolist()])
                partial = CaptionStats(partial.caption_id[keep], partial.loss_min[keep], partial.loss_max[keep], partial.n_audios[keep])
            stats = merge_caption_stats(prev_stats, partial)
        for r in cap_res:
            stats = merge_caption_stats(stats, r["stats"])
        assert stats.caption_id.size == len(index.caption_ids) + d_m, f"{stats.caption_id.size=}"
        t2a = topk_merge([TopK.from_columns(index.read("topk_t2a"), "t2a")] + [r["t2a"] for r in results], k, "t2a")
        raw = topk_merge([TopK.from_columns(index.read("topk_a2t_raw"), "a2t_raw")] + [r["a2t_raw"] for r in results], k, "a2t_raw")
        score_files = index.files("scores")
        if has_scores:
            score_files = score_files + [f"scores_added/{u['file']}" for u in units]
            missing = [f for f in score_files[-len(units):] if not storage.exists(storage.join(out, f))]
            if missing:
                raise RuntimeError(f"score shards missing after scoring: {missing[:3]}")
        if d_n:  # old captions' min/max moved: every min-max list from the stored losses
            t_mm = time.time()
            mm = minmax_from_scores(out, score_files, stats, k)
            minmax_seconds = time.time() - t_mm
        else:
            mm = topk_merge([TopK.from_columns(index.read("topk_a2t"), "a2t_minmax")] + [r["a2t_minmax"] for r in cap_res], k, "a2t_minmax")
            minmax_seconds = 0.0

        # 6. the version: tables, metrics, config, manifest last; then the pointer
        for name, data in (
            ("caption_stats", pa.table(stats.columns())),
            ("topk_t2a", pa.table(t2a.columns())),
            ("topk_a2t", pa.table(mm.columns())),
            ("topk_a2t_raw", pa.table(raw.columns())),
        ):
            files = storage.write_table(storage.join(out, vdir), name, data)
            tables[name] = {"files": _rel(out, files), "rows": data.num_rows}
        if has_scores:
            tables["scores"] = {"files": score_files, "rows": index.rows("scores") + n_pairs}
        gt_of = dict(zip(index.caption_ids, index.captions.column("audio_id").to_pylist(), strict=True))
        if d_m:
            gt_of.update(zip(new_cids, new_caps.column("audio_id").to_pylist(), strict=True))
        n_total, m_total = len(all_ids), len(gt_of)
        metrics: dict = {}
        if any(g is not None for g in gt_of.values()) and k >= 10:
            metrics = retrieval_metrics(t2a, raw, mm, gt_of)
        re_info = {
            "version": n,
            "parent_version": index.version,
            "run_key": run_key,
            "new_captions": d_m,
            "new_audios": d_n,
            "skipped_captions": skipped_caps,
            "skipped_audios": skipped_aud,
            "pairs_scored": n_pairs,
            "pairs_full": n_total * m_total,
            "scored_share": round(n_pairs / (n_total * m_total), 6),
            "units": len(units),
            "inline": n_pairs <= cfg.inline_max_pairs,
            "score_seconds": round(score_seconds, 2),
            "minmax_recompute_seconds": round(minmax_seconds, 2),
            "minmax_estimated_captions": d_m if estimate else 0,
        }
        if info["precision"] == "bf16-refined":
            re_info["refine"] = refine_summary(
                refine_margin, n_pairs, sum(r["rescored"] for r in results), max(r["max_rel_err"] for r in results)
            )
        metrics.update({"n_audios": n_total, "n_captions": m_total, "n_pairs": n_total * m_total,
                        "checkpoint": ck_info, "reindex": re_info})
        storage.write_json(storage.join(out, vdir, "metrics.json"), metrics)
        from aacray.config import dump_yaml

        storage.write_text(storage.join(out, vdir, "config.yaml"), dump_yaml(cfg))
        new_info = {**info, "checkpoint_info": ck_info, "model_sha": model_sha,
                    "applied_runs": list(info.get("applied_runs", [])) + [run_key], "minmax_sample": sample}
        new_manifest = {
            "job": "reindex",
            "version": n,
            "parent_version": index.version,
            "base": base_digest,
            "created_unix": time.time(),
            "tables": tables,
            "extra": {"metrics": f"{vdir}/metrics.json", "config": f"{vdir}/config.yaml", "plots": [],
                      "run_key": run_key, "pairs_scored": n_pairs, "index": new_info},
        }
        if storage.manifest_digest(out) != base_digest:
            raise ReindexError(f"{out}: the root output was rewritten during this run (score_matrix?); version {n} not committed")
        storage.write_json(storage.join(out, vdir, storage.MANIFEST), new_manifest)
        storage.set_current(out, n, base_digest, run_key=run_key)
        _retain(out, cfg.keep_versions, n)
        log.info("reindex: committed version %d of %s: +%d captions, +%d audios, %d pairs scored (%.2f%% of %d)",
                 n, out, d_m, d_n, n_pairs, 100 * re_info["scored_share"], n_total * m_total)
    return {**summary, "status": "committed", "version": n, **re_info,
            "wall_seconds": round(time.time() - t_start, 2),
            **{key: metrics[key] for key in ("t2a", "a2t_raw", "a2t_minmax") if key in metrics}}


def _retain(out: str, keep: int, current: int) -> None:
    """Keep the `keep` newest committed versions (the current one among them); delete older
    and unfinished version folders, and shared files that no kept version lists."""
    versions = storage.list_versions(out)
    committed = [v for v in versions if storage.exists(storage.join(out, storage.version_path(v), storage.MANIFEST))]
    kept = [v for v in committed if v <= current][-keep:]
    if current not in kept:
        kept.append(current)
    for v in versions:
        if v not in kept:
            storage.remove(storage.join(out, storage.version_path(v)))
    listed = set()
    for v in kept:
        m = storage.read_json(storage.join(out, storage.version_path(v), storage.MANIFEST))
        for t in m["tables"].values():
            listed.update(t["files"])
    for folder in SHARED:
        for f in _rel(out, storage.list_files(storage.join(out, folder), ".parquet")):
            name = f.rsplit("/", 1)[-1]
            if name[:1] == "v" and name[1:5].isdigit() and f not in listed:
                storage.remove(storage.join(out, f))


# --------------------------------------------------------------------------------------
# Estimated min/max: what it costs (paper 5)
# --------------------------------------------------------------------------------------


def minmax_estimate_eval(L: np.ndarray, audio_ids, caption_ids, gt_of: dict, sizes=(5, 10, 20, 40), draws: int = 5, seed: int = 0) -> list[dict]:
    """Min-max A2T Recall@1/5/10 with per-caption min/max over the whole index ("exact")
    and over seeded samples of `size` audios (mean and std over `draws` samples).

    L (N, M) losses of every audio x caption; gt_of caption id -> audio id (or None)."""
    from aacray.retrieval import hit_ranks, recall_at_k

    a_ids, c_ids = np.asarray(audio_ids, dtype=str), np.asarray(caption_ids, dtype=str)
    rel: dict[str, set[str]] = {}
    for c, a in gt_of.items():
        if a is not None:
            rel.setdefault(a, set()).add(c)

    def recalls(mn, mx):
        ranks = hit_ranks(_minmax_topk_dense(L, a_ids, c_ids, mn, mx, 10), rel)
        return [recall_at_k(ranks, k) for k in (1, 5, 10)]

    pos = {a: i for i, a in enumerate(a_ids.tolist())}
    raw = hit_ranks(topk_a2t_raw(L, a_ids, c_ids, 10), rel)
    rows = [{"sample": "raw", "n": 0, "R": [recall_at_k(raw, k) for k in (1, 5, 10)], "std": [0.0, 0.0, 0.0]},
            {"sample": "all", "n": len(a_ids), "R": recalls(L.min(0), L.max(0)), "std": [0.0, 0.0, 0.0]}]
    for size in sizes:
        if size > len(a_ids):
            continue
        got = []
        for d in range(draws):
            sub = L[[pos[a] for a in draw_minmax_sample(list(a_ids), size, seed + d)]]
            got.append(recalls(sub.min(0), sub.max(0)))
        g = np.array(got)
        rows.append({"sample": str(size), "n": size, "R": g.mean(0).tolist(), "std": g.std(0).tolist()})
    return rows


def format_minmax_eval(rows: list[dict], n_audios: int, n_captions: int, draws: int) -> str:
    lines = [
        f"Min-max A2T with estimated caption min/max ({n_audios} audios x {n_captions} captions; "
        f"samples: mean +- std over {draws} seeded draws)",
        "min/max over           R@1             R@5             R@10",
    ]
    for r in rows:
        label = {"raw": "(raw loss, no scaling)", "all": "all audios (exact)"}.get(r["sample"], f"{r['n']} audios")
        fixed = r["sample"] in ("raw", "all")
        cells = [f"{m:.3f}" + ("         " if fixed else f" +- {s:.3f}") for m, s in zip(r["R"], r["std"], strict=True)]
        lines.append(f"{label:22s} " + "  ".join(f"{c:14s}" for c in cells))
    return "\n".join(lines)


def load_score_matrix(uri: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(L (N, M) float32, audio ids, caption ids) from the `scores` table of an output."""
    t = storage.read_table(uri, "scores")
    a = t.column("audio_id").to_numpy(zero_copy_only=False).astype(str)
    c = t.column("caption_id").to_numpy(zero_copy_only=False).astype(str)
    ua, ai = np.unique(a, return_inverse=True)
    uc, ci = np.unique(c, return_inverse=True)
    L = np.full((ua.size, uc.size), np.nan, dtype=np.float32)
    L[ai, ci] = t.column("loss").to_numpy()
    if np.isnan(L).any():
        raise ReindexError(f"{uri}: the scores table does not cover every pair")
    return L, ua.tolist(), uc.tolist()


# --------------------------------------------------------------------------------------
# Benchmark: a 1% update against a full recompute (demo data, or a tiny generated set)
# --------------------------------------------------------------------------------------


def _subset_extract(src: str, dst: str, audio_ids: list[str], captions: pa.Table) -> None:
    """An extract_embeddings-shaped output holding some audios of `src` and given captions."""
    emb = storage.read_table(src, "embeddings")
    emb = emb.filter(pc.is_in(emb.column("audio_id"), pa.array(audio_ids)))
    storage.begin_output(dst, ["embeddings", "captions"])
    storage.write_table(dst, "embeddings", emb, rows_per_file=256)
    storage.write_table(dst, "captions", captions.select(["caption_id", "subset", "text", "audio_id"]))
    storage.commit_output(dst, "extract_embeddings", {"derived_from": src}, ["embeddings", "captions"])


def _copy_tree(src: str, dst: str) -> None:
    storage.remove(dst)
    if storage.is_remote(dst):
        fs, path = storage.get_fs(dst)
        fs.copy(storage.get_fs(src)[1] + "/", path + "/", recursive=True)
    else:
        import shutil

        shutil.copytree(src, dst)


def bench(work: str, base: str = "runs/demo/score_matrix", fraction: float = 0.01, new_subset: str = "validation",
          inline_max_pairs: int = 100_000) -> dict:
    """Time reindex runs against score_matrix on the same union, and check they agree.

    `base` is a complete score_matrix output with a scores table (version 0; copied, never
    changed). Case "captions": `fraction` of its caption count added, texts taken from the
    `new_subset` captions of its audio source (no ground truth: those audios are not in the
    index), scored inline and on actors. Case "audio": one `new_subset` audio and its
    captions added. Each case's full recompute is score_matrix on the union with the base's
    own settings. Returns the report (seconds, ratios, pairs, table equality)."""
    import yaml

    from aacray.config import ReindexConfig, ScoreConfig, from_dict, to_dict
    from aacray.scoring import run_score_matrix

    manifest = storage.read_manifest(base)
    if manifest.get("job") != "score_matrix" or "scores" not in manifest["tables"]:
        raise ReindexError(f"{base}: the benchmark needs a version-0 score_matrix output with write_scores: true")
    score_cfg = from_dict(ScoreConfig, yaml.safe_load(storage.read_bytes(storage.join(base, "config.yaml"))))
    info = _index_info(base, manifest)
    src = score_cfg.audio
    caps = read_captions(score_cfg.captions, score_cfg.caption_subsets)
    n_base, m_base = len(_base_audio_ids(info["base_audio"])), caps.num_rows
    extra = read_captions(src, [new_subset])
    # case captions: texts of other captions under new ids, no ground truth
    d_m = max(1, round(fraction * m_base))
    new_caps = extra.slice(0, d_m)
    new_caps = pa.table({"caption_id": [f"bench-{c}" for c in new_caps.column("caption_id").to_pylist()],
                         "subset": ["external"] * d_m, "text": new_caps.column("text"),
                         "audio_id": pa.nulls(d_m, pa.string())})
    new_caps_file = storage.join(work, "new_captions.parquet")
    union_caps_file = storage.join(work, "union_captions.parquet")
    for f, t in ((new_caps_file, new_caps), (union_caps_file, pa.concat_tables([caps.select(new_caps.column_names), new_caps]))):
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(f, buf.getvalue())
    # case audio: one audio of new_subset and its captions
    a_new = extra.column("audio_id").to_pylist()[0]
    a_caps = extra.filter(pc.equal(extra.column("audio_id"), a_new))
    new_aud = storage.join(work, "new_audio_extract")
    _subset_extract(src, new_aud, [a_new], a_caps)
    union_aud = storage.join(work, "union_audio_extract")
    _subset_extract(src, union_aud, _base_audio_ids(info["base_audio"]) + [a_new], pa.concat_tables([caps, a_caps]))

    def full(out: str, **kw) -> float:
        cfg = {**to_dict(score_cfg), "output": out, "plots": False, **kw}
        t = time.time()
        run_score_matrix(from_dict(ScoreConfig, cfg))
        return time.time() - t

    report: dict = {"base": base, "n_audios": n_base, "n_captions": m_base}
    cases = (
        ("captions_inline", {"new_captions": new_caps_file}, inline_max_pairs, "full_captions"),
        ("captions_actors", {"new_captions": new_caps_file}, 0, "full_captions"),
        ("audio_inline", {"new_audio": new_aud, "new_captions": new_aud}, inline_max_pairs, "full_audio"),
    )
    fulls = {
        "full_captions": lambda out: full(out, captions=union_caps_file, caption_subsets=None),
        "full_audio": lambda out: full(out, audio=union_aud, audio_subsets=None, captions=union_aud, caption_subsets=None),
    }
    for case, new, inline, ref in cases:
        ref_out = storage.join(work, ref)
        if ref not in report:
            t_full = fulls[ref](ref_out)
            m = storage.read_json(storage.join(ref_out, "metrics.json"))
            report[ref] = {"seconds": round(t_full, 2), "score_seconds": m["score_seconds"], "pairs": m["n_pairs"]}
        out = storage.join(work, f"index_{case}")
        _copy_tree(base, out)
        t = time.time()
        res = run_reindex(from_dict(ReindexConfig, {"output": out, **new, "inline_max_pairs": inline,
                                                    "caption_block_size": score_cfg.caption_block_size,
                                                    "actors": to_dict(score_cfg.actors), "ray": to_dict(score_cfg.ray)}))
        dt = time.time() - t
        report[case] = {"reindex_seconds": round(dt, 2), "ratio": round(dt / report[ref]["seconds"], 4),
                        "score_seconds": res["score_seconds"],
                        "score_ratio": round(res["score_seconds"] / max(report[ref]["score_seconds"], 1e-9), 4),
                        "pairs_scored": res["pairs_scored"], "pairs_full": res["pairs_full"],
                        "scored_share": res["scored_share"], "inline": res["inline"],
                        "minmax_recompute_seconds": res["minmax_recompute_seconds"],
                        "equal_to_full": compare_outputs(out, ref_out)}
        log.info("bench %s: %s", case, report[case])
    return report


def compare_outputs(a: str, b: str, atol: float = 1e-6) -> dict:
    """Per table of two score_matrix(-like) outputs: "identical", "allclose" or "differs".

    allclose: every id and rank equal, losses (and stats) within `atol`, min-max scores
    within what `atol` on the losses allows once divided by the caption's loss span:
    (2 atol + 2 atol |s|) / (max - min)."""
    span = storage.read_table(a, "caption_stats").to_pandas().set_index("caption_id")
    span = span["loss_max"] - span["loss_min"]
    out = {}
    for name in VERSION_TABLES + ("scores",):
        ta, tb = storage.read_table(a, name).to_pandas(), storage.read_table(b, name).to_pandas()
        key = [c for c in ta.columns if c.endswith("_id")] + (["rank"] if "rank" in ta.columns else [])
        ta = ta.sort_values(key).reset_index(drop=True)
        tb = tb.sort_values(key).reset_index(drop=True)
        if len(ta) != len(tb) or list(ta.columns) != list(tb.columns):
            out[name] = f"shape {ta.shape} vs {tb.shape}"
            continue
        ids_same = all((ta[c] == tb[c]).all() for c in ta.columns if ta[c].dtype.kind not in "f")
        floats = [c for c in ta.columns if ta[c].dtype.kind == "f"]
        if ids_same and all((ta[c].to_numpy() == tb[c].to_numpy()).all() for c in floats):
            out[name] = "identical"
            continue
        close = ids_same
        for c in floats:
            tol = np.full(len(ta), atol)
            if name == "topk_a2t" and c == "score":
                sp = span.reindex(ta["caption_id"]).to_numpy()
                tol = np.where(sp > 0, (2 * atol + 2 * atol * np.abs(ta[c].to_numpy())) / np.where(sp > 0, sp, 1), atol)
            close = close and bool((np.abs(ta[c].to_numpy() - tb[c].to_numpy()) <= tol).all())
        out[name] = "allclose" if close else "differs"
    return out


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m aacray.reindex", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--submission-id", nargs=argparse.REMAINDER, metavar="CONFIG [k=v ...]",
                   help="print the run key of a reindex config (for ray job submit --submission-id)")
    g.add_argument("--bench", metavar="WORKDIR", help="time 1%% updates of --base against full recomputes")
    g.add_argument("--minmax-eval", metavar="SCORE_OUTPUT", help="estimated vs exact min/max on an output with scores")
    p.add_argument("--base", default="runs/demo/score_matrix", help="--bench: the score_matrix output to start from")
    p.add_argument("--sizes", default="5,10,20,40")
    p.add_argument("--draws", type=int, default=5)
    a = p.parse_args(argv)
    if a.submission_id is not None:
        from aacray.config import ReindexConfig, load_config

        print(submission_id(load_config(ReindexConfig, a.submission_id)))
        return 0
    from aacray.runtime import setup_logging

    setup_logging()
    if a.bench:
        print(json.dumps(bench(a.bench, a.base), indent=2))
        return 0
    L, aids, cids = load_score_matrix(a.minmax_eval)
    caps = load_index(a.minmax_eval).captions
    gt = dict(zip(caps.column("caption_id").to_pylist(), caps.column("audio_id").to_pylist(), strict=True))
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = minmax_estimate_eval(L, aids, cids, gt, sizes, a.draws)
    print(format_minmax_eval(rows, len(aids), len(cids), a.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
