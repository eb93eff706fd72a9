"""A Ray Train worker process SIGKILLed after its first checkpoint (in a subprocess): Ray
Train restarts the worker group and the loop resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from faults import (
    run_script,
    write_extract_output,
)

from aacray import storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def train_kill_main(work: str) -> None:
    """Embedded Ray (2 CPUs); run_train with max_failures=1; SIGKILL the RayTrainWorker
    process once Ray Train has registered the first checkpoint."""
    from ray._private import state

    from aacray.config import TrainConfig, from_dict
    from aacray.runtime import setup_logging
    from aacray.train import run_train

    setup_logging()
    emb = os.path.join(work, "emb")
    rng = np.random.default_rng(0)
    words = ["dog", "bell", "rain", "engine", "birds", "siren", "barks", "rings", "falls", "hums"]
    ids, subsets, frames, caps = [], [], [], []
    for i in range(96):
        aid = f"a{i:03d}"
        ids.append(aid)
        subsets.append("development" if i < 80 else "validation")
        frames.append(rng.standard_normal((int(rng.integers(8, 32)), 768)).astype(np.float32))
        for j in range(3):
            caps.append((f"{aid}#{j}", subsets[-1], " ".join(rng.choice(words, 5)), aid))
    write_extract_output(emb, ids, subsets, frames, caps)
    out = os.path.join(work, "train")
    killed: dict = {}

    def kill_after_first_checkpoint() -> None:
        # a checkpoint counts once Ray Train has registered it (its snapshot lists it); a
        # checkpoint folder still being written is not one yet, and a worker killed then
        # restarts from scratch
        run_dir = os.path.join(out, "ray_train")
        snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        registered: list = []
        while not registered:
            time.sleep(0.05)
            try:
                with open(snapshot) as f:
                    registered = json.load(f)["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                pass
        workers = [
            a
            for a in state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
        ]
        pid = workers[0]["Pid"]
        os.kill(pid, signal.SIGKILL)  # a process of this script's own Ray
        killed.update(
            pid=pid,
            registered_at_kill=[r["metrics"]["epoch"] for r in registered],
            t_kill=time.time(),
        )

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    t0 = time.time()
    summary = run_train(
        from_dict(
            TrainConfig,
            {
                "embeddings": emb,
                "output": out,
                "epochs": 8,
                "batch_size": 16,
                "num_workers": 1,
                "max_failures": 1,
                "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 256},
                "ray": {"num_cpus": 2},
            },
        )
    )
    killed["seconds"] = round(time.time() - t0, 2)
    if "t_kill" in killed:
        killed["seconds_after_kill"] = round(time.time() - killed.pop("t_kill"), 2)
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump({"killed": killed, "summary": summary}, f, indent=2, default=str)


@pytest.mark.slow
def test_train_worker_killed_resumes_from_checkpoint(tmp_path):
    """SIGKILL of the training worker after its first checkpoint: Ray Train restarts the
    worker group (max_failures=1), the loop resumes from that checkpoint, and the final
    history covers every epoch exactly once."""
    t0 = time.time()
    report, out = run_script(__file__, "train-kill", str(tmp_path), timeout=900)
    print(json.dumps(report["killed"]), f"wall {time.time() - t0:.1f} s")
    assert report["killed"].get("pid"), report
    first = report["killed"]["registered_at_kill"][-1]
    assert (
        f"resumed from the checkpoint of epoch {first}" in out
        or f"resumed from the checkpoint of epoch {first + 1}" in out
    ), (
        "the restarted worker did not resume from the checkpoint registered before the kill (or the next one)"
    )
    assert "[FailurePolicy] RETRY" in out  # Ray Train saw the failure and used max_failures
    hist = json.loads((tmp_path / "train" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert all(np.isfinite(h["val_loss"]) for h in hist)
    assert storage.read_manifest(str(tmp_path / "train"))["extra"]["epochs"] == 8




if __name__ == "__main__":
    {"train-kill": train_kill_main}[sys.argv[1]](sys.argv[2])
