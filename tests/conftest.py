"""Shared fixtures: a moto S3 server on 127.0.0.1, one small local Ray, a tiny demo corpus,
one torch thread for a module of tiny-model tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server, the way s3fs tests itself; yields the endpoint URL."""
    port = _free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One embedded local Ray with 2 CPUs for the whole session (after the S3 server, so
    workers inherit its endpoint and keys)."""
    import ray

    from aacray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small demo corpus in the Clotho v2.1 layout (12 dev / 4 val / 4 eval clips)."""
    from aacray.corpora import write_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(root), seed=1, n_dev=12, n_val=4, n_eval=4, min_seconds=2.0, max_seconds=4.0)
    return str(root)


@pytest.fixture
def small_index(tmp_path):
    """6 audios with 2 captions each, plus one caption made only of unknown words (an
    extract output), and a random tiny checkpoint."""
    import numpy as np
    from faults import CAPTIONS, write_extract_output, write_random_checkpoint

    rng = np.random.default_rng(1)
    ids = [f"clip{i}" for i in range(6)]
    frames = [rng.standard_normal((5 + i, 768)).astype(np.float32) for i in range(6)]
    caps = [
        (f"{a}#{j}", "evaluation", CAPTIONS[(i + j) % 4], a)
        for i, a in enumerate(ids)
        for j in range(2)
    ]
    caps.append(("clip5#2", "evaluation", "zyzzyva quux", "clip5"))  # out of vocabulary only
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * 6, frames, caps)
    ckpt = str(tmp_path / "ckpt")
    write_random_checkpoint(ckpt, CAPTIONS)
    return ext, ckpt


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a module of tiny-model tests (more only cost time on a busy
    machine); use with `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
