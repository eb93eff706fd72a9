"""One writer per output: a lock file created atomically, local or on S3.

`with Lock(output, run_key, stale_s, job="reindex"):` creates `output/_LOCK.json` (owner,
host, pid, start time, run key, a random token) only if it is absent: `os.open(O_CREAT |
O_EXCL)` locally, a PUT with `If-None-Match: *` on S3 (s3fs `pipe_file(mode="create")`;
AWS S3, MinIO and moto honour it; a store that ignores it is caught in most cases by
reading the lock back). A lock held by a live run is refused with its owner, pid and start
time. A lock whose pid is gone on this host, or older than `stale_s`, is broken; locally
the break is a rename that checks it moved the lock it judged stale, on S3 a
read-then-delete (two breakers in the same instant could both proceed: schedule with
`concurrencyPolicy: Forbid`). The lock is removed on exit, also on an exception, and only
if it is still ours (the token).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import time
import uuid

from aacray import storage
from aacray.errors import BadInputError

log = logging.getLogger("aacray.lock")

LOCK = "_LOCK.json"


class LockError(BadInputError):
    """Another run holds the output's lock (nothing was changed)."""


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
        # that window is possible; module docstring)
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


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a container's uid): the owner is still host + pid
        return "unknown"


class Lock:
    """`with Lock(output, run_key, stale_s, job):` one writer per output (module docstring)."""

    def __init__(self, output: str, run_key: str, stale_s: float | None = None, job: str = "reindex"):
        self.uri = storage.join(output, LOCK)
        self.stale_s = stale_s
        self.job = job
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
        for _ in range(2):  # a second try after breaking a stale lock
            if _create_exclusive(self.uri, data):
                if storage.is_remote(self.uri) and storage.read_json(self.uri).get("token") != self.info["token"]:
                    raise LockError(f"{self.uri}: lost a race for the lock (the store may ignore If-None-Match)")
                return self
            held = self._held()
            if held is None:
                continue  # released meanwhile
            why = _lock_stale(held, self.stale_s)
            if why is None:
                raise LockError(
                    f"{self.uri}: another {self.job} holds this output: owner {held.get('owner')}, pid "
                    f"{held.get('pid')}, since {held.get('created')} (run {held.get('run_key')}). Wait for it, "
                    f"or if it died elsewhere delete {self.uri} (or set stale_lock_s)."
                )
            log.warning("breaking the stale lock %s: %s", self.uri, why)
            _break_lock(self.uri, held)
        raise LockError(f"{self.uri}: could not take the lock (another run took it meanwhile)")

    def _held(self) -> dict | None:
        """The lock as it stands; None when it is gone, {} when unreadable (half written)."""
        try:
            return storage.read_json(self.uri)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}

    def __exit__(self, *exc) -> None:
        try:
            if storage.read_json(self.uri).get("token") == self.info["token"]:
                storage.remove(self.uri)
        except FileNotFoundError:
            pass
