"""aac-metrics' environment (aacray/metrics_env.py): Java probing against fake `java`
executables, linking pycocoevalcap's jars into a cache, and that the module (and the stage
modules that use it) import without Ray."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from aacray import metrics_env
from aacray.metrics_env import link_pycocoevalcap, resolve_java


def _fake_java(folder, version: str) -> str:
    """An executable that answers `-version` the way a JDK does (on stderr)."""
    path = os.path.join(folder, f"java-{version}")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho \'openjdk version "{version}" 2021-01-19\' >&2\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_resolve_java_accepts_8_to_13_only(tmp_path):
    ok = resolve_java(_fake_java(tmp_path, "1.8.0_292"))
    assert ok.supported and ok.version == "1.8.0_292" and ok.source == "config" and ok.problem is None
    assert resolve_java(_fake_java(tmp_path, "11.0.13")).supported
    new = resolve_java(_fake_java(tmp_path, "17.0.15"))
    assert not new.supported and new.version == "17.0.15"
    assert "17.0.15" in new.problem and "8-13" in new.problem  # names the version and the range


def test_link_pycocoevalcap_links_only_what_is_missing(tmp_path, monkeypatch):
    wheel = tmp_path / "wheel"
    wheel.mkdir()
    files = {}
    for rel in ("meteor-1.5.jar", "meteor/data/paraphrase-en.gz", "stanford-corenlp-3.4.1.jar"):
        src = wheel / rel.replace("/", "_")
        src.write_bytes(rel.encode())
        files[rel] = str(src)
    monkeypatch.setattr(metrics_env, "_pycocoevalcap_files", lambda: files)
    cache = tmp_path / "cache"
    (cache / "meteor" / "data").mkdir(parents=True)
    (cache / "meteor-1.5.jar").write_bytes(b"a real download")  # present: kept as it is
    os.symlink(str(tmp_path / "gone.jar"), cache / "stanford-corenlp-3.4.1.jar")  # dangling

    linked = link_pycocoevalcap(str(cache))

    assert sorted(linked) == ["meteor/data/paraphrase-en.gz", "stanford-corenlp-3.4.1.jar"]
    assert (cache / "meteor-1.5.jar").read_bytes() == b"a real download"
    for rel in linked:
        assert os.path.realpath(cache / rel) == os.path.realpath(files[rel])
        assert (cache / rel).read_bytes() == rel.encode()
    assert link_pycocoevalcap(str(cache)) == []  # nothing left to link


def test_metrics_and_stage_modules_import_without_ray():
    """The metrics and the stages' pure parts are usable (and testable) without Ray: the
    stages import it inside the function that builds their pipeline."""
    modules = "aacray.metrics_env, aacray.captioning, aacray.perturb, aacray.extract"
    code = f"import sys, {modules}; assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
