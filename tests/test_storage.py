import os

import pyarrow as pa
import pytest

from aacray import storage


def _roundtrip(base: str) -> None:
    out = storage.join(base, "job")
    t = pa.table({"a": list(range(10)), "b": [str(i) for i in range(10)]})
    storage.begin_output(out, ["t"])
    storage.write_table(out, "t", t, rows_per_file=4)
    # not committed yet: readers refuse
    with pytest.raises(storage.IncompleteOutputError, match="_MANIFEST.json"):
        storage.read_table(out, "t")
    m = storage.commit_output(out, "test", {"x": 1}, ["t"])
    assert m["tables"]["t"]["rows"] == 10 and len(m["tables"]["t"]["files"]) == 3
    assert storage.read_table(out, "t").equals(t)
    # a stray file from a crashed writer is not read: only the manifest's files count
    storage.write_table(out, "stray", t)
    storage.write_bytes(storage.join(out, "t", "part-99999.parquet"), b"garbage")
    assert storage.read_table(out, "t").equals(t)
    # starting a rewrite invalidates the old output first
    storage.begin_output(out, ["t"])
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_manifest(out)


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path))


def test_s3_roundtrip(s3_bucket):
    _roundtrip(s3_bucket + "/prefix")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = str(tmp_path / "f.json")
    storage.write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(storage.StorageError, match="f.json"):
        storage.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert storage.read_json(target) == {"v": 1}


def test_missing_bucket_is_clear(s3_server):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-aacray"):
        storage.write_json("s3://no-such-bucket-aacray/x/_MANIFEST.json", {})
