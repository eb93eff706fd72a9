"""URIs (local paths or s3://bucket/prefix), filesystems, and the atomic commit of an output.

An output is a folder of tables (each a folder of Parquet files) plus small side files.
It becomes complete only when `_MANIFEST.json` is written, last; readers refuse a folder
without one, and read exactly the files the manifest lists, so stray files from a crashed
run are never picked up. Starting a new write first removes the old manifest, so a
half-rewritten output is never mistaken for a complete one.

Versions. An output may hold later versions of itself (written by reindex), each with its
own manifest, and a pointer `_CURRENT.json` naming the current one (aacray/versions.py).
`read_manifest` (so `table_files` and `read_table`) follows a valid pointer, so every
reader sees one complete version. Manifest paths are relative to the output ROOT. Side
files are found through the manifest: `join(uri, manifest["extra"]["metrics"])`.

s3:// goes through s3fs. The endpoint, keys and region come from the usual AWS variables
(AWS_ENDPOINT_URL for MinIO / moto / other S3-compatible stores). Ray Data gets the same
filesystem wrapped as a pyarrow filesystem, so every reader and writer agrees.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_MANIFEST.json"


class IncompleteOutputError(RuntimeError):
    """An output folder has no manifest: it is being written, or its writer crashed."""


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _s3_kwargs() -> dict:
    kw: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kw["endpoint_url"] = endpoint
    return kw


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for a URI."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        import s3fs

        fs = s3fs.S3FileSystem(**_s3_kwargs(), skip_instance_cache=True)
        return fs, uri.split("://", 1)[1]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(uri)


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem (for Ray Data and pyarrow.parquet) and path."""
    fs, path = get_fs(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _missing_bucket(uri: str) -> str | None:
    """The bucket of an s3:// URI when it does not exist; None otherwise (or unknown).
    Asked only on an error path: s3fs reports a missing bucket as a FileNotFoundError
    that does not name it."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    try:
        return None if get_fs(uri)[0].exists(bucket) else bucket
    except Exception:
        return None


def _wrap(uri: str, op: str, e: Exception) -> StorageError:
    bucket = _missing_bucket(uri) if isinstance(e, FileNotFoundError) else None
    if bucket:
        return StorageError(f"{op} {uri} failed: bucket {bucket!r} does not exist (create it or fix the URI)")
    return StorageError(f"{op} {uri} failed: {type(e).__name__}: {e}")


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    try:
        return fs.exists(path)
    except Exception as e:  # network / permission errors become StorageError
        raise _wrap(uri, "checking", e) from e


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        if _missing_bucket(uri):  # not "no such file": say which bucket is missing
            raise _wrap(uri, "reading", e) from e
        raise
    except Exception as e:
        raise _wrap(uri, "reading", e) from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temporary name and an atomic rename."""
    fs, path = get_fs(uri)
    try:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            # an S3 PUT is atomic: the object appears whole or not at all
            with fs.open(path, "wb") as f:
                f.write(data)
    except Exception as e:
        raise _wrap(uri, "writing", e) from e


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_tabular(uri: str, what: str = "file") -> pa.Table:
    """One Parquet (`.parquet`) or UTF-8 CSV file (anything else) -> a table; a CSV's empty
    strings stay strings. what: how an error names the file ("caption file")."""
    import pyarrow.csv as pacsv

    data = read_bytes(uri)
    if uri.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri}: not UTF-8 (byte {e.start}); save the {what} as UTF-8") from None
    return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove(uri: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    fs, path = get_fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise _wrap(uri, "removing", e) from e


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below a folder URI (recursive), sorted, as URIs."""
    fs, path = get_fs(uri)
    try:
        if not fs.exists(path):
            return []
        found = fs.find(path)
    except Exception as e:
        raise _wrap(uri, "listing", e) from e
    out = []
    for p in sorted(found):
        rel = posixpath.relpath(p, path) if is_remote(uri) else os.path.relpath(p, path)
        if p.endswith(suffix) and not any(part.startswith(("_", ".")) for part in rel.split("/")):
            out.append(join(uri, rel))
    return out


# --------------------------------------------------------------------------------------
# Outputs with a manifest
# --------------------------------------------------------------------------------------


def begin_output(uri: str, tables: list[str]) -> None:
    """Invalidate an old output at `uri` (manifest first) and clear the tables to write."""
    remove(join(uri, MANIFEST))
    for t in tables:
        remove(join(uri, t))


def write_table(uri: str, name: str, table: pa.Table, rows_per_file: int = 1 << 20) -> list[str]:
    """Write `table` as Parquet shards under `uri/name/`; returns the file URIs."""
    files = []
    n = table.num_rows
    starts = range(0, max(n, 1), rows_per_file) if n else [0]
    for i, s in enumerate(starts):
        part = table.slice(s, rows_per_file)
        buf = io.BytesIO()
        pq.write_table(part, buf)
        f = join(uri, name, f"part-{i:05d}.parquet")
        write_bytes(f, buf.getvalue())
        files.append(f)
    return files


def commit_output(uri: str, job: str, extra: dict | None = None, tables: list[str] | None = None) -> dict:
    """Write the manifest last: list every Parquet file of each table with its row count."""
    manifest: dict[str, Any] = {
        "job": job,
        "created_unix": time.time(),
        "tables": {},
        "extra": extra or {},
    }
    for t in tables or []:
        files = list_files(join(uri, t), ".parquet")
        rows = 0
        for f in files:
            fs, path = get_fs(f)
            with fs.open(path, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        prefix = join(uri, "")
        manifest["tables"][t] = {"files": [f[len(prefix):] for f in files], "rows": rows}
    write_json(join(uri, MANIFEST), manifest)
    return manifest


def read_manifest(uri: str) -> dict:
    """The manifest of a complete output, of its current version when `_CURRENT.json` names
    a valid one (module docstring); IncompleteOutputError when there is none."""
    try:
        root = read_bytes(join(uri, MANIFEST))
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"{uri} is not a complete output: {MANIFEST} is missing (the job that writes it "
            "is still running, or it crashed). Re-run that job to produce it."
        ) from None
    from aacray import versions  # versions builds on this module: imported when needed

    pointer = versions.valid_pointer(uri, root)
    if pointer is None:
        return json.loads(root.decode("utf-8"))
    try:
        return read_json(join(uri, pointer["path"], MANIFEST))
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"{uri}: {versions.CURRENT} names version {pointer['version']} at {pointer['path']}, whose "
            f"{MANIFEST} is missing (removed by hand?). Point {versions.CURRENT} at a complete version "
            "or delete it to read version 0."
        ) from None


def table_files(uri: str, name: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or read_manifest(uri)
    if name not in manifest["tables"]:
        from aacray.errors import BadInputError

        raise BadInputError(
            f"{uri} has no table {name!r}: it is a {manifest.get('job', 'unknown job')!s} output "
            f"(its {MANIFEST} says so and lists {sorted(manifest['tables'])}); give the output of "
            f"the job that writes {name!r}"
        )
    return [join(uri, f) for f in manifest["tables"][name]["files"]]


def read_table(uri: str, name: str, columns: list[str] | None = None, manifest: dict | None = None) -> pa.Table:
    """Read one table of a complete output (only the files its manifest lists)."""
    files = table_files(uri, name, manifest)
    parts = []
    for f in files:
        fs, path = get_fs(f)
        try:
            with fs.open(path, "rb") as fh:
                parts.append(pq.read_table(fh, columns=columns))
        except FileNotFoundError:
            raise IncompleteOutputError(
                f"{uri}: table {name!r} lists {f} in its {MANIFEST}, but that file is missing "
                "(deleted or moved after the job committed): restore it, or re-run the job that "
                "made this output"
            ) from None
    if not parts:
        raise StorageError(f"{uri}: table {name!r} has no files")
    return pa.concat_tables(parts)
