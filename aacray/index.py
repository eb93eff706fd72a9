"""A score_matrix output read as an index: its current version, ids, captions and model;
its scores as a dense matrix; two outputs compared table by table.

The audios of an index are not copied into it: they are its base source's (the
extract_embeddings output score_matrix read) followed by the rows reindex copied to
`embeddings_added/`; its captions are the base caption source's followed by
`captions_added/`. `load_index` checks that these sources still hold exactly what the
lists rank, and that no base source was rewritten since (its digest is kept from the first
reindex on), so a run never mixes embeddings or texts of two different sources.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aacray import storage, versions
from aacray.embeddings import read_captions
from aacray.errors import BadInputError

VERSION_TABLES = ("caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw")
"""The tables every version writes anew (the `scores` table is shared, append-only)."""
ADDED_CAPTION_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("subset", pa.string()),
        ("text", pa.string()),
        ("audio_id", pa.string()),
        ("minmax_estimated", pa.bool_()),
    ]
)


@dataclass
class Index:
    """What a run needs to know of the current version of an output."""

    uri: str
    version: int
    manifest: dict
    info: dict
    """manifest extra "index": checkpoint, model_sha, k, pairs_per_batch, precision,
    base_audio / base_captions {uri, subsets}, applied_runs, minmax_sample, minmax_ties."""
    audio_ids: list[str] = field(default_factory=list)
    """Index order: the base source's, then added audios in the order they came."""
    max_frames: int = 0
    """S: the most frames of any indexed audio (what an actor's audio index is padded to)."""
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


def source_digest(uri: str) -> str:
    """Digest of a data source: a caption file's bytes, or an output folder's manifest
    (which names every file and is rewritten by every run of the job that made it)."""
    if uri.endswith((".csv", ".parquet")):
        data = storage.read_bytes(uri)
    else:
        try:
            data = storage.read_bytes(storage.join(uri, storage.MANIFEST))
        except FileNotFoundError:
            raise BadInputError(f"{uri}: not a caption file (.csv/.parquet) nor a complete output ({storage.MANIFEST} missing)") from None
    return hashlib.sha256(data).hexdigest()


def index_info(uri: str, manifest: dict) -> dict:
    """The index settings of a version: a reindex version keeps them in its manifest; for
    version 0 they come from score_matrix's saved config and metrics."""
    if manifest.get("job") == "reindex":
        return dict(manifest["extra"]["index"])
    if manifest.get("job") != "score_matrix":
        raise BadInputError(f"{uri} is a {manifest.get('job')!r} output; reindex updates score_matrix outputs")
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
        "minmax_ties": cfg.minmax_ties,
        "candidates": cfg.candidates,
    }


def base_audio(src: dict) -> pa.Table:
    """(audio_id, n_frames) of the base audio source {uri, subsets}, in its order."""
    t = storage.read_table(src["uri"], "embeddings", columns=["audio_id", "subset", "n_frames"])
    if src["subsets"] is not None:
        t = t.filter(pc.is_in(t.column("subset"), pa.array(src["subsets"])))
    return t.select(["audio_id", "n_frames"])


def as_added(t: pa.Table, estimated: bool | None) -> pa.Table:
    """A caption table in the captions_added schema (estimated None: keep the column)."""
    names = ["caption_id", "subset", "text", "audio_id"]
    flags = t.column("minmax_estimated") if estimated is None else pa.array([estimated] * t.num_rows, pa.bool_())
    return pa.table([t.column(n) for n in names] + [flags], names=[*names, "minmax_estimated"]).cast(ADDED_CAPTION_SCHEMA)


def load_index(uri: str, manifest: dict | None = None) -> Index:
    """The current version of a score_matrix output, checked against its sources."""
    manifest = manifest or storage.read_manifest(uri)
    info = index_info(uri, manifest)
    idx = Index(uri, int(manifest.get("version", 0)), manifest, info)
    _read_audios(idx)
    _read_captions(idx)
    _check_sources(idx)
    return idx


def _read_audios(idx: Index) -> None:
    """Audio ids and S: base source + added rows; they must be the audios the lists rank."""
    added = versions.read_files(idx.uri, idx.files("embeddings_added"), ["audio_id", "n_frames"])
    audios = pa.concat_tables([base_audio(idx.info["base_audio"])] + ([added.select(["audio_id", "n_frames"])] if added else []))
    idx.audio_ids = audios.column("audio_id").to_pylist()
    idx.max_frames = int(pc.max(audios.column("n_frames")).as_py() or 0)
    listed = set(pc.unique(idx.read("topk_a2t_raw").column("audio_id")).to_pylist())
    if set(idx.audio_ids) != listed or len(listed) != len(idx.audio_ids):
        extra, missing = set(idx.audio_ids) - listed, listed - set(idx.audio_ids)
        raise BadInputError(
            f"{idx.uri} (version {idx.version}): its audio source {idx.info['base_audio']} no longer holds the "
            f"audios it indexed ({len(extra)} unknown, e.g. {sorted(extra)[:3]}; {len(missing)} gone, e.g. "
            f"{sorted(missing)[:3]}). Re-run score_matrix, or give added audios as new_audio."
        )


def _read_captions(idx: Index) -> None:
    """Captions: base source + added rows; they must be the captions caption_stats holds."""
    src = idx.info["base_captions"]
    base = as_added(read_captions(src["uri"], src["subsets"]), False)
    added = versions.read_files(idx.uri, idx.files("captions_added"))
    caps = pa.concat_tables([base] + ([as_added(added, None)] if added else []))
    stats_ids = set(idx.read("caption_stats").column("caption_id").to_pylist())
    ids = caps.column("caption_id").to_pylist()
    if set(ids) != stats_ids or len(ids) != len(stats_ids):
        raise BadInputError(
            f"{idx.uri} (version {idx.version}): its caption source {src} no longer holds "
            f"the captions it indexed ({len(set(ids) - stats_ids)} unknown, {len(stats_ids - set(ids))} gone). "
            "Re-run score_matrix, or give added captions as new_captions."
        )
    idx.caption_ids, idx.captions = ids, caps


def _check_sources(idx: Index) -> None:
    """Refuse base sources rewritten since the index was built (ids may match, data not);
    records their digests in `idx.info` for the version this run writes."""
    info = idx.info
    digests = {"audio": source_digest(info["base_audio"]["uri"]), "captions": source_digest(info["base_captions"]["uri"])}
    if not info.get("base_digests"):  # first reindex: a source output newer than the index was rewritten
        built = storage.read_json(storage.join(idx.uri, storage.MANIFEST)).get("created_unix", 0)
        for src in (info["base_audio"], info["base_captions"]):
            if not src["uri"].endswith((".csv", ".parquet")):
                made = storage.read_json(storage.join(src["uri"], storage.MANIFEST)).get("created_unix", 0)
                if made > built:
                    raise BadInputError(
                        f"{idx.uri}: its source {src['uri']} was rewritten after the index was built; ids match "
                        "but embeddings or texts may not. Re-run score_matrix on the new source."
                    )
    elif info["base_digests"] != digests:
        raise BadInputError(
            f"{idx.uri}: a base source was rewritten since version 1 was built ({info['base_digests']} -> {digests}); "
            "ids still match but embeddings or texts may not. Re-run score_matrix on the new sources."
        )
    info["base_digests"] = digests


# --------------------------------------------------------------------------------------
# Reading scores, comparing outputs
# --------------------------------------------------------------------------------------


def load_score_matrix(uri: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(L (N, M) float32, audio ids, caption ids, both sorted) from the `scores` table of an
    output (its current version)."""
    t = storage.read_table(uri, "scores")
    a = t.column("audio_id").to_numpy(zero_copy_only=False).astype(str)
    c = t.column("caption_id").to_numpy(zero_copy_only=False).astype(str)
    ua, ai = np.unique(a, return_inverse=True)
    uc, ci = np.unique(c, return_inverse=True)
    L = np.full((ua.size, uc.size), np.nan, dtype=np.float32)
    L[ai, ci] = t.column("loss").to_numpy()
    if np.isnan(L).any():
        raise BadInputError(f"{uri}: the scores table does not cover every pair (was it written with write_scores: true?)")
    return L, ua.tolist(), uc.tolist()


def compare_outputs(a: str, b: str, atol: float = 1e-6) -> dict:
    """Per table of two score_matrix(-like) outputs: "identical", "allclose", "differs", or
    "shape ..." when row counts or columns differ.

    allclose: every id and rank equal, losses (and stats) within `atol`, min-max scores
    within what `atol` on the losses allows once divided by the caption's loss span:
    (2 atol + 2 atol |s|) / (max - min)."""
    span = storage.read_table(a, "caption_stats").to_pandas().set_index("caption_id")
    span = span["loss_max"] - span["loss_min"]
    return {name: _compare_table(storage.read_table(a, name).to_pandas(), storage.read_table(b, name).to_pandas(),
                                 atol, span if name == "topk_a2t" else None)
            for name in VERSION_TABLES + ("scores",)}


def _compare_table(ta, tb, atol: float, span) -> str:
    """One table of `compare_outputs`; span (per caption) scales the tolerance of "score"."""
    key = [c for c in ta.columns if c.endswith("_id")] + (["rank"] if "rank" in ta.columns else [])
    ta = ta.sort_values(key).reset_index(drop=True)
    tb = tb.sort_values(key).reset_index(drop=True)
    if len(ta) != len(tb) or list(ta.columns) != list(tb.columns):
        return f"shape {ta.shape} vs {tb.shape}"
    ids_same = all((ta[c] == tb[c]).all() for c in ta.columns if ta[c].dtype.kind not in "f")
    floats = [c for c in ta.columns if ta[c].dtype.kind == "f"]
    if ids_same and all((ta[c].to_numpy() == tb[c].to_numpy()).all() for c in floats):
        return "identical"
    close = ids_same
    for c in floats:
        tol = np.full(len(ta), atol)
        if span is not None and c == "score":
            sp = span.reindex(ta["caption_id"]).to_numpy()
            tol = np.where(sp > 0, (2 * atol + 2 * atol * np.abs(ta[c].to_numpy())) / np.where(sp > 0, sp, 1), atol)
        close = close and bool((np.abs(ta[c].to_numpy() - tb[c].to_numpy()) <= tol).all())
    return "allclose" if close else "differs"
