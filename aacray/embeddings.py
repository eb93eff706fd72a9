"""The embedding and caption tables (DESIGN.md, data contracts): schemas, builders, readers.

embeddings: audio_id string, subset string, n_frames int32, embedding list<fixed_size_list<
float, 768>> (frames x 768; float32 or float16), source string, sample_rate int32.
captions: caption_id string, subset string, text string, audio_id string (null for an
external caption database).

Readers validate what every later stage relies on, and name the offending items: unique
ids, finite values, the 768 width, n_frames matching the stored frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aacray import storage
from aacray.errors import BadInputError

EMB_DIM = 768


def embedding_schema(dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("audio_id", pa.string()),
            ("subset", pa.string()),
            ("n_frames", pa.int32()),
            ("embedding", pa.list_(pa.list_(value, EMB_DIM))),
            ("source", pa.string()),
            ("sample_rate", pa.int32()),
        ]
    )


CAPTION_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("subset", pa.string()),
        ("text", pa.string()),
        ("audio_id", pa.string()),
    ]
)


def embedding_table(
    audio_ids: list[str],
    subsets: list[str],
    frames: list[np.ndarray],
    sources: list[str],
    sample_rates: list[int],
    dtype: str = "float32",
) -> pa.Table:
    """Rows of the embeddings table; frames[i] is (S_i, 768)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    lens = np.array([f.shape[0] for f in frames], dtype=np.int32)
    for aid, f in zip(audio_ids, frames, strict=True):
        assert f.ndim == 2 and f.shape[1] == EMB_DIM, f"{aid}: {f.shape=}"
    flat = (
        np.concatenate([f.reshape(-1) for f in frames]).astype(np_dtype)
        if frames
        else np.zeros(0, np_dtype)
    )
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(flat), EMB_DIM)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    emb = pa.ListArray.from_arrays(pa.array(offsets), fsl)
    return pa.Table.from_arrays(
        [
            pa.array(audio_ids, pa.string()),
            pa.array(subsets, pa.string()),
            pa.array(lens, pa.int32()),
            emb,
            pa.array(sources, pa.string()),
            pa.array(sample_rates, pa.int32()),
        ],
        schema=embedding_schema(dtype),
    )


@dataclass
class EmbeddingSet:
    audio_ids: list[str]
    subsets: list[str]
    frames: list[np.ndarray]  # each (S_i, 768) float32
    sources: list[str | None] | None = None  # each audio's file URI (the table's `source`)

    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.audio_ids)}

    def select(self, keep: list[int]) -> EmbeddingSet:
        return EmbeddingSet(
            [self.audio_ids[i] for i in keep],
            [self.subsets[i] for i in keep],
            [self.frames[i] for i in keep],
            None if self.sources is None else [self.sources[i] for i in keep],
        )


def duplicate_ids(ids) -> list[str]:
    """The ids that occur more than once, sorted."""
    seen, dups = set(), set()
    for i in ids:
        (dups if i in seen else seen).add(i)
    return sorted(dups)


class BadEmbeddingError(ValueError):
    """Embeddings that no stage should train on or score; the message lists the items."""


def check_embeddings(es: EmbeddingSet, where: str) -> list[tuple[str, str]]:
    """(audio_id, reason) for every bad row: wrong width, no frames, NaN/inf, duplicate id."""
    bad = []
    seen = set()
    for aid, f in zip(es.audio_ids, es.frames, strict=True):
        if aid in seen:
            bad.append((aid, "duplicate audio_id"))
        seen.add(aid)
        if f.ndim != 2 or f.shape[1] != EMB_DIM:
            bad.append((aid, f"embedding width {f.shape[-1] if f.ndim else '?'} != {EMB_DIM}"))
        elif f.shape[0] == 0:
            bad.append((aid, "no frames"))
        elif not np.isfinite(f).all():
            bad.append((aid, "embedding holds NaN or inf"))
    return bad


def read_embeddings(uri: str, subsets: list[str] | None = None) -> EmbeddingSet:
    """Read the embeddings table of an extract_embeddings output (or a bare table folder)."""
    table = _read(uri, "embeddings")
    if subsets is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("subset"), pa.array(subsets)))
    fix = "write the table with aacray.embeddings.embedding_table, or re-run extract_embeddings"
    if "embedding" not in table.column_names:
        raise BadEmbeddingError(f"{uri}: the embeddings table has no column 'embedding' (it has {table.column_names}); {fix}")
    col = table.column("embedding")
    if not (
        pa.types.is_list(col.type)
        and pa.types.is_fixed_size_list(col.type.value_type)
        and pa.types.is_floating(col.type.value_type.value_type)
    ):
        raise BadEmbeddingError(
            f"{uri}: column 'embedding' has type {col.type}, expected list<fixed_size_list<float, {EMB_DIM}>> "
            f"(frames x {EMB_DIM}, float32 or float16); {fix}"
        )
    width = col.type.value_type.list_size
    if width != EMB_DIM:
        raise BadEmbeddingError(f"{uri}: embedding width is {width}, expected {EMB_DIM} (was it made by another encoder?)")
    frames = []
    for chunk in col.chunks:
        frames.extend(_chunk_frames(chunk, width))
    sources = table.column("source").to_pylist() if "source" in table.column_names else None
    return EmbeddingSet(
        table.column("audio_id").to_pylist(), table.column("subset").to_pylist(), frames, sources
    )


def _chunk_frames(chunk: pa.ListArray, width: int) -> list[np.ndarray]:
    offsets = chunk.offsets.to_numpy()
    inner = chunk.values  # FixedSizeListArray sliced by the offsets' range
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flat = flat.reshape(-1, width)
    o0 = offsets[0]
    return [flat[offsets[i] - o0 : offsets[i + 1] - o0] for i in range(len(chunk))]


def read_captions(uri: str, subsets: list[str] | None = None) -> pa.Table:
    """Read a captions table: an extract output, a bare folder, or a CSV/Parquet file.

    A CSV/Parquet caption database needs `text`; caption_id defaults to its row number,
    audio_id to null, subset to "external".
    """
    if uri.endswith((".csv", ".parquet")):
        table = _read_caption_file(uri)
    else:
        table = _read(uri, "captions")
    if subsets is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("subset"), pa.array(subsets)))
    return table


def _read_caption_file(uri: str) -> pa.Table:
    t = storage.read_tabular(uri, "caption file")
    if "text" not in t.column_names:
        raise ValueError(f"{uri}: a caption file needs a column 'text' (got {t.column_names})")
    n = t.num_rows
    cols = {
        "caption_id": t.column("caption_id").cast(pa.string()) if "caption_id" in t.column_names else pa.array([str(i) for i in range(n)]),
        "subset": t.column("subset").cast(pa.string()) if "subset" in t.column_names else pa.array(["external"] * n),
        "text": t.column("text").cast(pa.string()),
        "audio_id": t.column("audio_id").cast(pa.string()) if "audio_id" in t.column_names else pa.nulls(n, pa.string()),
    }
    return pa.table(cols, schema=CAPTION_SCHEMA)


def _read(uri: str, name: str) -> pa.Table:
    """A table of a committed output (IncompleteOutputError without a manifest; BadInputError
    naming the job when the output is another job's)."""
    manifest = storage.read_manifest(uri)
    if name not in manifest["tables"]:
        alt = " or a CSV/Parquet caption file with a 'text' column" if name == "captions" else ""
        raise BadInputError(
            f"{uri} is a {manifest.get('job', 'unknown job')!s} output, not an extract_embeddings "
            f"output: it has no {name!r} table (its {storage.MANIFEST} lists "
            f"{sorted(manifest['tables'])}); give an extract_embeddings output{alt}"
        )
    return storage.read_table(uri, name, manifest=manifest)
