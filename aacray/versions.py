"""Versions of an output: the `_CURRENT.json` pointer, version folders, shared shards, retention.

Version 0 is an output folder as its job committed it (aacray/storage.py). Later versions
(written by reindex) live in `versions/0001/`, `versions/0002/`, ... each with its own
manifest, and `_CURRENT.json` = {"version": n, "path": "versions/000n", "base": <digest of
the root manifest>} names the current one; `storage.read_manifest` follows it through
`valid_pointer`. The pointer is one atomic write (temporary file + rename locally, one PUT
on S3), so a reader sees the old version or the new one, never a mix. It is followed only
while the root manifest it was made on is there unchanged: a job that rewrites the root
voids older versions instead of being shadowed by them.

Manifest paths are relative to the output ROOT, so a version lists files of earlier
versions without copying them. What versions share is append-only at the root, in folders
of shards named by the version that added them (`<folder>/v0003-part-00000.parquet`), and
collected by `retain` once no kept version lists them.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aacray import storage

CURRENT = "_CURRENT.json"
VERSIONS = "versions"


# --------------------------------------------------------------------------------------
# The pointer
# --------------------------------------------------------------------------------------


def version_path(n: int) -> str:
    """Folder of version n >= 1, relative to the output root (version 0 is the root)."""
    if n < 1:
        raise ValueError(f"version {n}: versions >= 1 live under {VERSIONS}/, version 0 is the root")
    return f"{VERSIONS}/{n:04d}"


def version_prefix(n: int) -> str:
    """Name prefix of the shared shards version n adds (`v0003`)."""
    return f"v{n:04d}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def manifest_digest(uri: str) -> str | None:
    """Digest of the root manifest (what a version pointer is bound to); None without one."""
    try:
        return digest(storage.read_bytes(storage.join(uri, storage.MANIFEST)))
    except FileNotFoundError:
        return None


def valid_pointer(uri: str, root_manifest: bytes) -> dict | None:
    """The pointer of `uri` when it was made on this root manifest, else None."""
    try:
        pointer = storage.read_json(storage.join(uri, CURRENT))
    except FileNotFoundError:
        return None
    return pointer if pointer.get("base") == digest(root_manifest) else None


def read_current(uri: str) -> dict | None:
    """The version pointer of an output when valid, else None (version 0 is current).

    Void when the root manifest changed since the pointer was written, and None without a
    root manifest (IncompleteOutputError comes from `storage.read_manifest` then)."""
    try:
        root = storage.read_bytes(storage.join(uri, storage.MANIFEST))
    except FileNotFoundError:
        return None
    return valid_pointer(uri, root)


def current_version(uri: str) -> int:
    """Number of the version readers see now (0: the root output)."""
    pointer = read_current(uri)
    return int(pointer["version"]) if pointer else 0


def set_current(uri: str, version: int, base: str, **extra: Any) -> dict:
    """Make version `version` (already complete: its manifest written) the current one.

    One atomic write (`storage.write_bytes`). `base` is `manifest_digest(uri)` read when the
    version was started."""
    pointer = {"version": version, "path": version_path(version), "base": base, "created_unix": time.time(), **extra}
    if not storage.exists(storage.join(uri, pointer["path"], storage.MANIFEST)):
        raise storage.StorageError(f"{uri}: version {version} has no {storage.MANIFEST}; refusing to make it current")
    storage.write_json(storage.join(uri, CURRENT), pointer)
    return pointer


def list_versions(uri: str) -> list[int]:
    """Numbers of the version folders present under `uri/versions/` (complete or not)."""
    folder = storage.join(uri, VERSIONS)
    fs, path = storage.get_fs(folder)
    try:
        if not fs.exists(path):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except Exception as e:  # network / permission errors name the folder, as storage's do
        raise storage.StorageError(f"listing {folder} failed: {type(e).__name__}: {e}") from e
    return sorted(int(n) for n in names if n.isdigit())


# --------------------------------------------------------------------------------------
# Shared shards (root-relative files)
# --------------------------------------------------------------------------------------


def relative(uri: str, files: list[str]) -> list[str]:
    """File URIs below `uri` as the root-relative paths a manifest lists."""
    prefix = storage.join(uri, "")
    return [f[len(prefix) :] for f in files]


def write_shards(uri: str, folder: str, prefix: str, table: pa.Table, rows_per_file: int = 256) -> list[str]:
    """Write a table as `uri/folder/<prefix>-part-i.parquet`; root-relative paths back."""
    out = []
    for i, s in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        buf = io.BytesIO()
        pq.write_table(table.slice(s, rows_per_file), buf)
        rel = f"{folder}/{prefix}-part-{i:05d}.parquet"
        storage.write_bytes(storage.join(uri, rel), buf.getvalue())
        out.append(rel)
    return out


def read_files(uri: str, files: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """The rows of root-relative Parquet files, concatenated (None for no files)."""
    parts = []
    for f in files:
        fs, path = storage.get_fs(storage.join(uri, f))
        with fs.open(path, "rb") as fh:
            parts.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


# --------------------------------------------------------------------------------------
# Starting a version, retention
# --------------------------------------------------------------------------------------


def clear_unpublished(uri: str, n: int, shared: tuple[str, ...]) -> None:
    """Remove what an earlier attempt at version n left: its folder and its shared shards.

    A version numbered above the current one was never published (a crashed run) or was
    voided by a rewrite of the root, so its number is reused."""
    storage.remove(storage.join(uri, version_path(n)))
    for folder in shared:
        for f in storage.list_files(storage.join(uri, folder), ".parquet"):
            if posixpath.basename(f).startswith(version_prefix(n) + "-"):
                storage.remove(f)


def retain(uri: str, keep: int, current: int, shared: tuple[str, ...]) -> None:
    """Keep the `keep` newest committed versions (the current one among them); delete older
    and unfinished version folders, and shards of `shared` folders no kept version lists."""
    present = list_versions(uri)
    committed = [v for v in present if storage.exists(storage.join(uri, version_path(v), storage.MANIFEST))]
    kept = [v for v in committed if v <= current][-keep:]
    if current not in kept:
        kept.append(current)
    for v in present:
        if v not in kept:
            storage.remove(storage.join(uri, version_path(v)))
    listed = set()
    for v in kept:
        m = storage.read_json(storage.join(uri, version_path(v), storage.MANIFEST))
        for t in m["tables"].values():
            listed.update(t["files"])
    for folder in shared:
        for f in relative(uri, storage.list_files(storage.join(uri, folder), ".parquet")):
            name = f.rsplit("/", 1)[-1]
            # only shards a version added (vNNNN-...); anything else is not ours to delete
            if name[:1] == "v" and name[1:5].isdigit() and f not in listed:
                storage.remove(storage.join(uri, f))
