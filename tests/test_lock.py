"""The output lock (aacray/lock.py): stale locks are broken, live ones refused, local and on S3."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from aacray import storage
from aacray.lock import LOCK, Lock, LockError


def test_stale_locks_are_broken(tmp_path):
    uri = str(tmp_path / "o")
    os.makedirs(uri)
    lock = os.path.join(uri, LOCK)
    # a dead pid on this host
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "created_unix": time.time(), "token": "t"}
    with open(lock, "w") as f:
        json.dump(dead, f)
    with Lock(uri, "r1"):
        assert storage.read_json(lock)["run_key"] == "r1"
    # another host: refused while young, broken once older than stale_s
    with open(lock, "w") as f:
        json.dump({**dead, "host": "elsewhere", "created_unix": time.time() - 100}, f)
    with pytest.raises(LockError, match="another reindex"):
        with Lock(uri, "r2", stale_s=1000):
            pass
    with Lock(uri, "r3", stale_s=10):
        assert storage.read_json(lock)["run_key"] == "r3"
    assert not os.path.exists(lock)


def test_lock_released_on_error_and_names_its_job(tmp_path):
    uri = str(tmp_path / "o")
    with pytest.raises(RuntimeError, match="boom"):
        with Lock(uri, "r1", job="compaction"):
            with pytest.raises(LockError, match=f"another compaction holds this output.*pid {os.getpid()}.*run r1"):
                with Lock(uri, "r2", job="compaction"):
                    pass
            raise RuntimeError("boom")
    assert not os.path.exists(os.path.join(uri, LOCK))


def test_lock_on_s3(s3_bucket):
    out = s3_bucket + "/index"
    with Lock(out, "a"):
        with pytest.raises(LockError, match="another reindex"):
            with Lock(out, "b"):
                pass
    assert not storage.exists(storage.join(out, LOCK))
    with Lock(out, "c"):
        assert storage.read_json(storage.join(out, LOCK))["run_key"] == "c"
