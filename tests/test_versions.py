"""Versions of an output (aacray/versions.py): the pointer, its voiding by a rewritten root,
retention of version folders and of the shared shards they list."""

from __future__ import annotations

import pyarrow as pa
import pytest

from aacray import storage, versions


def _version(out: str, n: int, rows: list[int], shared: list[str] = ()) -> None:
    """A complete version n: its own table `t` plus the shared files it lists."""
    files = storage.write_table(storage.join(out, versions.version_path(n)), "t", pa.table({"a": rows}))
    tables = {"t": {"files": versions.relative(out, files), "rows": len(rows)}}
    if shared:
        tables["s"] = {"files": list(shared), "rows": 0}
    storage.write_json(storage.join(out, versions.version_path(n), storage.MANIFEST), {"job": "test", "version": n, "tables": tables})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_version_pointer(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    out = storage.join(base, "o")
    storage.write_table(out, "t", pa.table({"a": [0]}))
    storage.commit_output(out, "test", {}, ["t"])
    digest = versions.manifest_digest(out)
    with pytest.raises(storage.StorageError, match="no _MANIFEST.json"):
        versions.set_current(out, 1, digest)
    _version(out, 1, [1, 2])
    assert storage.read_table(out, "t").column("a").to_pylist() == [0]  # not current yet
    versions.set_current(out, 1, digest)
    assert storage.read_table(out, "t").column("a").to_pylist() == [1, 2]
    assert versions.current_version(out) == 1 and versions.list_versions(out) == [1]
    storage.commit_output(out, "test", {"again": True}, ["t"])  # the root rewritten: pointer void
    assert storage.read_table(out, "t").column("a").to_pylist() == [0] and versions.current_version(out) == 0


def test_retain_keeps_newest_and_what_they_list(tmp_path):
    out = str(tmp_path / "o")
    storage.write_table(out, "t", pa.table({"a": [0]}))
    storage.commit_output(out, "test", {}, ["t"])
    shards = [versions.write_shards(out, "shared", versions.version_prefix(n), pa.table({"x": [n]}))[0] for n in (1, 2, 3)]
    storage.write_bytes(storage.join(out, "shared", "notes.parquet"), b"")  # not a version's shard: kept
    _version(out, 1, [1], shards[:1])
    _version(out, 2, [2], shards[1:2])
    _version(out, 3, [3], shards[1:])  # versions 2 and 3 no longer list version 1's shard
    storage.write_text(storage.join(out, versions.version_path(4), "half-written"), "")  # never published
    versions.set_current(out, 3, versions.manifest_digest(out))
    versions.retain(out, 2, 3, ("shared",))
    assert versions.list_versions(out) == [2, 3]
    left = versions.relative(out, storage.list_files(storage.join(out, "shared")))
    assert left == ["shared/notes.parquet", *shards[1:]]  # version 1's shard collected with it
    versions.clear_unpublished(out, 3, ("shared",))
    assert versions.list_versions(out) == [2] and versions.relative(out, storage.list_files(storage.join(out, "shared"))) == ["shared/notes.parquet", shards[1]]
