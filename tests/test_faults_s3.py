"""S3 faults against moto: the endpoint goes away in the middle of a manifest or table PUT (a
TCP proxy in front of moto, so moto keeps its state and what a fault left visible can be
read back), a bucket policy denies writes, a bucket does not exist. Nothing half-written is
ever taken for a complete output."""

from __future__ import annotations

import json
import os
import socket
import threading

import pyarrow as pa
import pytest

from aacray import storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class CutProxy:
    """A TCP proxy in front of the moto server whose endpoint can go away: at once (`cut`),
    or in the middle of the first PUT request whose request line holds `cut_during` (half
    of its first chunk is forwarded, then every connection is closed). While cut, the port
    refuses connections, as a dead server's would. moto itself keeps running, so what a
    fault left visible can be read back directly afterwards (`restore`)."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.cut_during: bytes | None = None
        self.cut_request = b""
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self._listen(0)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        self.lsock = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR on POSIX
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.lsock,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.lsock.close()
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.socks.clear()

    def restore(self) -> None:
        self.cut_during = None
        if self.lsock.fileno() == -1:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            with self.lock:
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                if (
                    to_server
                    and self.cut_during
                    and line.startswith(b"PUT ")
                    and self.cut_during in line
                ):
                    self.cut_request = line
                    dst.sendall(data[: len(data) // 2])
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """This process talks to moto through a CutProxy; one attempt per request (botocore's
    default retries take 10-40 s to give up on a dead endpoint, same outcome)."""
    proxy = CutProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    yield proxy
    proxy.close()


def _keys(s3_server: str, bucket_uri: str) -> list[str]:
    import boto3

    b = bucket_uri.split("://", 1)[1]
    return sorted(
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server)
        .list_objects_v2(Bucket=b)
        .get("Contents", [])
    )


def test_s3_endpoint_lost_during_manifest_put(s3_bucket, s3_server, s3_proxy):
    """Tables written, then the endpoint dies in the middle of the manifest PUT: a
    StorageError naming the manifest; afterwards no manifest exists and readers refuse."""
    out = f"{s3_bucket}/out"
    t = pa.table({"a": list(range(10))})
    storage.write_table(out, "t", t)
    s3_proxy.cut_during = b"_MANIFEST.json"
    with pytest.raises(
        storage.StorageError,
        match=r"writing s3://.*/out/_MANIFEST\.json failed: (EndpointConnectionError|ConnectionClosedError)",
    ):
        storage.commit_output(out, "test", {}, ["t"])
    assert b"PUT /" in s3_proxy.cut_request and b"_MANIFEST.json" in s3_proxy.cut_request
    s3_proxy.restore()
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]  # no manifest
    with pytest.raises(storage.IncompleteOutputError, match="_MANIFEST.json is missing"):
        storage.read_table(out, "t")
    storage.commit_output(out, "test", {}, ["t"])  # the endpoint is back: the commit goes through
    assert storage.read_table(out, "t").equals(t)


def test_s3_endpoint_lost_during_a_table_put(s3_bucket, s3_server, s3_proxy):
    """Cut in the middle of a shard's PUT: no partial object exists (an S3 PUT is atomic),
    nothing else follows, the output stays incomplete."""
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    s3_proxy.cut_during = b"part-00001.parquet"
    with pytest.raises(
        storage.StorageError, match=r"writing s3://.*/out/t/part-00001\.parquet failed"
    ):
        storage.write_table(out, "t", pa.table({"a": list(range(10))}), rows_per_file=4)
    s3_proxy.restore()
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_manifest(out)


def test_s3_endpoint_lost_while_score_matrix_commits(
    small_index, s3_bucket, s3_server, s3_proxy, ray_local
):
    """The job: every block scored and every table written to S3, then the endpoint dies
    during the manifest PUT. The job fails with a StorageError naming the manifest, nothing
    is visible as complete; once the endpoint is back the same command finishes from the
    persisted blocks without scoring a pair again."""
    from aacray.config import ScoreConfig, from_dict
    from aacray.scoring import TABLES, run_score_matrix

    ext, ckpt = small_index
    out = f"{s3_bucket}/score"
    cfg = from_dict(
        ScoreConfig,
        {
            "checkpoint": ckpt,
            "audio": ext,
            "captions": ext,
            "output": out,
            "k": 3,
            "caption_block_size": 13,
            "write_scores": True,
            "plots": False,
        },
    )
    s3_proxy.cut_during = b"_MANIFEST.json"
    with pytest.raises(storage.StorageError, match=r"writing s3://.*/score/_MANIFEST\.json failed"):
        run_score_matrix(cfg)
    s3_proxy.restore()
    keys = _keys(s3_server, s3_bucket)
    assert "score/_MANIFEST.json" not in keys
    for name in TABLES:  # the tables were written before the fault, but nobody reads them
        assert any(k.startswith(f"score/{name}/") for k in keys), name
        with pytest.raises(storage.IncompleteOutputError):
            storage.read_table(out, name)
    s = run_score_matrix(cfg)
    m = storage.read_json(f"{out}/metrics.json")
    assert (
        s["n_pairs"] == 6 * 13
        and m["blocks_skipped_on_resume"] == 1
        and m["pairs_scored_this_run"] == 0
    )
    assert (
        m["captions_with_unknown_words"] == 1
    )  # the out-of-vocabulary caption is scored, and counted
    scores = storage.read_table(out, "scores").to_pandas()
    assert len(scores) == 78 and not scores.duplicated(["audio_id", "caption_id"]).any()


def _deny(bucket_uri: str, resource: str) -> None:
    import boto3

    b = bucket_uri.split("://", 1)[1]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{b}/{resource}",
            }
        ],
    }
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_bucket_policy(
        Bucket=b, Policy=json.dumps(policy)
    )


def test_s3_denied_write(s3_bucket, s3_server, monkeypatch):
    """A bucket policy denies s3:PutObject under out/ (moto enforces a bucket policy's
    explicit Deny on object requests): a StorageError naming the object, nothing written."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _deny(s3_bucket, "out/*")
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    with pytest.raises(
        storage.StorageError,
        match=r"writing s3://.*/out/t/part-00000\.parquet failed: PermissionError",
    ):
        storage.write_table(out, "t", pa.table({"a": [1, 2]}))
    assert _keys(s3_server, s3_bucket) == []
    storage.write_json(f"{s3_bucket}/elsewhere/x.json", {"ok": 1})  # the policy is what denies


def test_s3_denied_manifest_leaves_output_incomplete(s3_bucket, s3_server, monkeypatch):
    """Tables may be written but the manifest is denied: the error names it and readers
    refuse the output (no half-written output is ever visible as complete)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _deny(s3_bucket, "*_MANIFEST.json")
    out = f"{s3_bucket}/out"
    storage.begin_output(out, ["t"])
    storage.write_table(out, "t", pa.table({"a": [1, 2]}))
    with pytest.raises(
        storage.StorageError, match=r"writing s3://.*/out/_MANIFEST\.json failed: PermissionError"
    ):
        storage.commit_output(out, "test", {}, ["t"])
    assert _keys(s3_server, s3_bucket) == ["out/t/part-00000.parquet"]
    with pytest.raises(storage.IncompleteOutputError):
        storage.read_table(out, "t")


def test_s3_missing_bucket_is_named(s3_server, tmp_path, small_index):
    """Reading from or writing to a bucket that does not exist: the error names the bucket."""
    from aacray.config import ScoreConfig, from_dict
    from aacray.corpora import list_manifest
    from aacray.embeddings import read_embeddings
    from aacray.scoring import run_score_matrix

    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        read_embeddings("s3://no-such-bucket-aacray/ext")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        list_manifest("s3://no-such-bucket-aacray/audio/manifest.csv")
    ext, ckpt = small_index
    cfg = from_dict(
        ScoreConfig,
        {
            "checkpoint": ckpt,
            "audio": ext,
            "captions": ext,
            "output": "s3://no-such-bucket-aacray/score",
        },
    )
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-aacray' does not exist"):
        run_score_matrix(cfg)  # refused before any Ray work starts


