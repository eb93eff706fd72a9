"""Stage: audio -> sharded embedding Parquet + captions Parquet, on Ray Data.

Pipeline (each numbered stage is one Ray Data operator):
 1. list the audio items in the driver (aac-datasets roots or a manifest),
 2. read, decode, mono, resample to 32 kHz and log-mel in CPU tasks,
 3. encode on an actor pool (the model is loaded once per actor; GPU when configured),
 4. write embedding Parquet shards; bad items leave the stream here as quarantine records.

Nothing is dropped silently: every item ends in the embeddings table or in
`quarantine.json` with its reason, and the job checks items in = written + quarantined.
The output commits with its manifest written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aacray import audio, stage, storage
from aacray.config import ActorConfig, ExtractConfig
from aacray.corpora import AudioItem, list_items
from aacray.embeddings import CAPTION_SCHEMA, embedding_schema, embedding_table
from aacray.encoder import build_encoder, encode_logmels

log = logging.getLogger("aacray.extract")

QUARANTINE_DIR = "_quarantine"


class TooManyBadItems(RuntimeError):
    """More items were quarantined than `max_bad_fraction` allows."""


def logmel_row(row: dict, max_seconds: float) -> dict:
    """Stage 2 (CPU task): one item -> its log-mel (T, 224), or the reason it is unusable."""
    out = {
        "audio_id": row["audio_id"],
        "subset": row["subset"],
        "uri": row["uri"],
        "sample_rate": 0,
        "error": "",
        "logmel": np.zeros((0, audio.N_MELS), np.float32),
    }
    try:
        data = storage.read_bytes(row["uri"])
        wav, sr = audio.load_clip(data, row["uri"], max_seconds)
        out["logmel"] = audio.log_mel(wav).numpy()
        out["sample_rate"] = sr
    except FileNotFoundError:
        out["error"] = f"{row['uri']}: file not found"
    except (audio.AudioError, storage.StorageError) as e:
        out["error"] = str(e)
    return out


class EncodeActor:
    """Stage 3 (actor): log-mel batches -> frame embeddings; bad rows go to quarantine."""

    def __init__(self, encoder: str, checkpoint: str | None, output: str, dtype: str, use_gpu: bool, num_cpus: float = 1.0):
        # the pool's resources as stage.actor_device reads them (cuda, or torch's threads
        # sized to the reserved CPUs)
        self.device = stage.actor_device(ActorConfig(num_gpus=1.0 if use_gpu else 0.0, num_cpus=num_cpus))
        self.model, self.provenance = build_encoder(encoder, checkpoint)
        self.model.to(self.device).eval()
        self.output = output
        self.dtype = dtype

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["audio_id"])
        good = [i for i in range(n) if not batch["error"][i]]
        bad = [i for i in range(n) if batch["error"][i]]
        if bad:
            records = [
                {"audio_id": str(batch["audio_id"][i]), "uri": str(batch["uri"][i]), "reason": str(batch["error"][i])}
                for i in bad
            ]
            key = hashlib.sha1("|".join(r["audio_id"] for r in records).encode()).hexdigest()[:16]
            storage.write_json(storage.join(self.output, QUARANTINE_DIR, f"{key}.json"), records)
        frames = encode_logmels(self.model, [batch["logmel"][i] for i in good], self.device)
        return embedding_table(
            [str(batch["audio_id"][i]) for i in good],
            [str(batch["subset"][i]) for i in good],
            frames,
            [str(batch["uri"][i]) for i in good],
            [int(batch["sample_rate"][i]) for i in good],
            self.dtype,
        )


# --------------------------------------------------------------------------------------
# The job: plan, set up, run, reduce, commit
# --------------------------------------------------------------------------------------


@dataclass
class ExtractPlan:
    """What the driver resolved before anything runs."""

    items: list[AudioItem]
    provenance: dict
    """The encoder's provenance, resolved once here (it warns loudly about a random init)."""


@dataclass
class Reduced:
    """The run's results gathered by the driver."""

    quarantine: list[dict]
    """One record (audio_id, uri, reason) per item that left the stream, sorted by audio_id."""
    captions: pa.Table
    """The captions of the audios that were written."""
    seconds: float
    """The pipeline's time, Ray's start-up excluded."""


def plan_extract(cfg: ExtractConfig) -> ExtractPlan:
    items = list_items(cfg.input.kind, cfg.input.root, cfg.input.subsets, cfg.input.manifest)
    if not items:
        raise ValueError(f"no audio items found in {cfg.input}")
    log.info("extract_embeddings: %d items -> %s", len(items), cfg.output)
    _, provenance = build_encoder(cfg.encoder.name, cfg.encoder.checkpoint)
    return ExtractPlan(items, provenance)


def encode(cfg: ExtractConfig, plan: ExtractPlan, out: stage.Output) -> float:
    """The Ray Data pipeline; embedding shards land in `embeddings/`, bad items in
    `_quarantine/`. Returns its seconds."""
    import ray.data  # here only: the CPU-task steps above import no Ray

    t0 = time.time()  # throughput counts the pipeline, not Ray's start-up
    # 1. items
    ds = ray.data.from_items(
        [{"audio_id": it.audio_id, "subset": it.subset, "uri": it.uri} for it in plan.items],
        override_num_blocks=max(1, min(len(plan.items), 4 * cfg.actors.num_actors * 4)),
    )
    # 2. decode + log-mel in CPU tasks
    ds = ds.map(logmel_row, fn_kwargs={"max_seconds": cfg.max_seconds}, num_cpus=1)
    # 3. encode on an actor pool
    kwargs = {
        "encoder": cfg.encoder.name, "checkpoint": cfg.encoder.checkpoint, "output": out.uri,
        "dtype": cfg.dtype, "use_gpu": cfg.actors.num_gpus > 0, "num_cpus": cfg.actors.num_cpus,
    }
    ds = stage.map_actors(ds, EncodeActor, kwargs, cfg.actors)
    # 4. write the shards
    fs, path = storage.arrow_fs(out.path("embeddings"))
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=cfg.rows_per_file)
    return time.time() - t0


def reduce_extract(plan: ExtractPlan, out: stage.Output, seconds: float) -> Reduced:
    """The quarantine records of every batch, merged; the captions of the audios kept."""
    quarantine = _collect_quarantine(out.uri)
    bad_ids = {q["audio_id"] for q in quarantine}
    cap_rows = [
        (f"{it.audio_id}#{j}", it.subset, text, it.audio_id)
        for it in plan.items
        if it.audio_id not in bad_ids
        for j, text in enumerate(it.captions)
    ]
    captions = pa.table(
        [pa.array([r[k] for r in cap_rows], pa.string()) for k in range(4)], schema=CAPTION_SCHEMA
    )
    return Reduced(quarantine, captions, seconds)


def commit_extract(cfg: ExtractConfig, plan: ExtractPlan, out: stage.Output, red: Reduced) -> dict:
    """Captions, quarantine.json, the manifest; then items in = written + quarantined, or no
    manifest. Returns the stats the manifest holds."""
    out.table("captions", red.captions)
    out.json("quarantine.json", red.quarantine)
    storage.remove(out.path(QUARANTINE_DIR))
    bad_ids = {q["audio_id"] for q in red.quarantine}
    stats = {
        "items_in": len(plan.items),
        "written": None,
        "quarantined": len(red.quarantine),
        "captions_written": red.captions.num_rows,
        "captions_of_quarantined_audio": sum(len(it.captions) for it in plan.items if it.audio_id in bad_ids),
        "seconds": round(red.seconds, 2),
        "encoder": plan.provenance,
        "dtype": cfg.dtype,
        "schema": str(embedding_schema(cfg.dtype)),
    }
    # the manifest is what counts the rows Ray wrote: commit, check, then complete it
    manifest = out.commit(stats)
    written = manifest["tables"]["embeddings"]["rows"]
    if written + len(red.quarantine) != len(plan.items):
        storage.remove(out.path(storage.MANIFEST))
        raise RuntimeError(
            f"item accounting failed: {len(plan.items)} in, {written} written, {len(red.quarantine)} quarantined"
        )
    stats["written"] = written
    stats["clips_per_s"] = round(written / max(red.seconds, 1e-9), 2)
    manifest["extra"].update(stats)
    out.json(storage.MANIFEST, manifest)
    return stats


def run_extract(cfg: ExtractConfig) -> dict:
    plan = plan_extract(cfg)
    stage.start_ray("extract_embeddings", cfg.ray, cfg.actors)  # before the old output is invalidated
    out = stage.Output(cfg.output, "extract_embeddings", ["embeddings", "captions"]).begin(cfg, clear=[QUARANTINE_DIR])
    red = reduce_extract(plan, out, encode(cfg, plan, out))
    stats = commit_extract(cfg, plan, out, red)
    for q in red.quarantine:
        log.warning("quarantined %s: %s", q["audio_id"], q["reason"])
    summary = {k: stats[k] for k in ("items_in", "written", "quarantined", "seconds", "clips_per_s")}
    summary["random_init_encoder"] = plan.provenance.get("random_init")
    summary["output"] = cfg.output
    share = len(red.quarantine) / len(plan.items)
    if share > cfg.max_bad_fraction:
        raise TooManyBadItems(
            f"{len(red.quarantine)} of {len(plan.items)} items quarantined ({share:.1%} > max_bad_fraction="
            f"{cfg.max_bad_fraction}); see {out.path('quarantine.json')}. Fix or remove them, "
            "or raise max_bad_fraction to accept."
        )
    return summary


def _collect_quarantine(out: str) -> list[dict]:
    folder = storage.join(out, QUARANTINE_DIR)
    fs, path = storage.get_fs(folder)
    records: dict[str, dict] = {}
    if fs.exists(path):
        for p in sorted(fs.find(path)):
            if p.endswith(".json"):
                with fs.open(p, "rb") as f:
                    for r in json.loads(f.read()):
                        records[r["audio_id"]] = r  # a retried task rewrites the same records
    return sorted(records.values(), key=lambda r: r["audio_id"])
