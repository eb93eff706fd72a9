"""Logs a person can read (issue 15.6): Ray's housekeeping kept off the console, one line per
epoch, one progress line per dataset run, the demo's summary in one screen.

The subprocess test runs `python tests/test_logs.py train WORK`: its own embedded Ray (a
private RAY_TMPDIR) trains a tiny decoder for 3 epochs through jobs' run_job, then a Ray task
fails on purpose; the test reads that process's console.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from aacray import runtime
from aacray.demo import StageResult, format_summary

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------------------
# The filters, on lines and records as Ray 2.60 sends them (no Ray started)
# --------------------------------------------------------------------------------------

TB = [
    "Traceback (most recent call last):",
    '  File "/x/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, in send_resource_request',
    "    ray.get(",
    '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
SEND_FAILED = (
    "Failed to send resource request for train-2143d284a1824687a749f44c9ff0de55. If this only happens "
    "transiently during network partition or CPU being overloaded, it's safe to ignore this error."
)


def _batch(lines, pid=8211, actor="TrainController", is_err=True):
    return {"ip": "10.0.0.1", "pid": pid, "actor_name": actor, "is_err": is_err, "lines": list(lines)}


def test_forwarded_noise_and_its_traceback_are_dropped_real_lines_kept():
    f = runtime.ForwardedLines()
    kept = f.filter(_batch(["Requesting resources: {'CPU': 1.0} * 2", SEND_FAILED, *TB, SEND_FAILED, *TB,
                            "Attempting to start training worker group of size 2"]))  # fmt: skip
    assert kept == ["Requesting resources: {'CPU': 1.0} * 2", "Attempting to start training worker group of size 2"]
    # a traceback split over two batches of the same process
    assert f.filter(_batch([SEND_FAILED, *TB[:2]])) == []
    assert f.filter(_batch([*TB[2:], "next line"])) == ["next line"]
    # the PlacementGroupCleaner's two ways of failing
    cleaner = _batch(
        ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor."] * 3
        + ["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
           '  File "/x/threading.py", line 1045, in _bootstrap_inner', "    self.run()",
           "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:42541', '192.0.2.2:40701'}."],
        pid=8526, actor="PlacementGroupCleaner",
    )  # fmt: skip
    assert f.filter(cleaner) == []
    # raylet, Ray Data in actors, the deprecation warning and its source line
    assert f.filter(_batch([
        "WARNING: 8 PYTHON worker processes have been started on node: 0b61 with address: 192.0.2.2, which is 4x ...",
        "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
        "`ExecutionOptions.exclude_resources` is deprecated and will be removed after Jan 2027.",
        "  self.exclude_resources = exclude_resources",
        "Execution plan of Dataset train_0357: InputDataBuffer[Input] -> TaskPoolMapOperator[ListFiles]",
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "Starting execution of Dataset train_0357. Full logs are in /tmp/ray/session_x/logs/ray-data",
    ], pid="raylet", actor=None)) == ["Starting execution of Dataset train_0357. Full logs are in /tmp/ray/session_x/logs/ray-data"]  # fmt: skip
    # Ray Train and torch in the training workers
    assert f.filter(_batch([
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1",
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1}, validation=False) from rank 1",
        "[2026-12-01 07:29:25,093 E 1683 1898] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
        "ID: '33cd' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
        "[aacray.train] epoch 1/3 train_loss 4.298 val_loss 4.263 91 samples/s",
    ], pid=2243, actor="RayTrainWorker")) == ["[aacray.train] epoch 1/3 train_loss 4.298 val_loss 4.263 91 samples/s"]  # fmt: skip


def test_real_errors_and_job_lines_pass_the_forwarded_filter():
    f = runtime.ForwardedLines()
    lines = [
        "[aacray.train] epoch 1/3 train_loss 4.335 val_loss 4.263 129 samples/s",
        "Traceback (most recent call last):",
        '  File "/work/aacray/train.py", line 290, in train_loop_per_worker',
        "    check_finite(loss, epoch + 1, rank)",
        "FloatingPointError: training loss is nan at epoch 1 on rank 0",
        "Failed to send resource request for train-1.",  # noise without a traceback ...
        "ValueError: deliberate",  # ... does not swallow the next line
        "Worker group failed: the deliberate job error",
    ]
    assert f.filter(_batch(lines)) == lines[:5] + lines[6:]
    os.environ["AACRAY_RAY_CONSOLE"] = "all"
    try:
        assert f.filter(_batch([SEND_FAILED, *TB])) == [SEND_FAILED, *TB]
    finally:
        del os.environ["AACRAY_RAY_CONSOLE"]


class _Writes:
    """A stderr that keeps each write: a Ray worker's stderr (utils.open_log, unbuffered)
    makes each one a write(2) to the log file, so Ray's log monitor can read up to any of
    their ends and publish the rest of that line as the first line of a later batch."""

    def __init__(self):
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def _dead_cleaner_thread_writes() -> list[str]:
    """What the PlacementGroupCleaner's thread writes when it dies (CI, 2026-12-07: two Ray
    instances on the host): Python's own excepthook prints the traceback, carets and all."""
    import threading

    def canonicalize(address):
        raise ConnectionError(f"Found multiple active Ray instances: {{'{address}', '192.0.2.2:6379'}}.")

    def api_server_url(address):
        url = canonicalize(address.strip()) + "/" + address.lower()
        return url

    def monitor():
        alive = api_server_url("192.0.2.2:41113") is not None
        return alive

    err, hook = sys.stderr, threading.excepthook
    sys.stderr, threading.excepthook = _Writes(), threading.__excepthook__  # Python's, not pytest's
    try:
        t = threading.Thread(target=monitor, name="PlacementGroupCleanerMonitor")
        t.start()
        t.join()
        return sys.stderr.pieces
    finally:
        sys.stderr, threading.excepthook = err, hook


def test_a_traceback_line_cut_between_two_batches_stays_hidden():
    """CI 2026-12-07: a caret line of the dead cleaner's traceback came cut in two; its tail
    ('^^^^') read as the traceback's last line and the rest reached the console. Here the
    traceback is cut at the end of every write Python makes, as the log monitor can, and a
    line that follows in a later batch is still shown. (A cut right after "Exception in
    thread " is not caught: that head is not noise yet.)"""
    pieces = _dead_cleaner_thread_writes()
    text = "".join(pieces)
    lines = text.splitlines()
    assert lines[0] == "Exception in thread PlacementGroupCleanerMonitor:" and "^^^" in text
    assert lines[-1].startswith("ConnectionError: Found multiple active Ray instances")
    assert runtime.ForwardedLines().filter(_batch(lines, actor="PlacementGroupCleaner")) == []
    unseen = len("Exception in thread ")  # the one cut not caught: its head is not noise yet
    cuts = sorted({c for c in itertools.accumulate(len(p) for p in pieces) if 0 < c < len(text)} - {unseen})
    assert len(cuts) > 100  # a caret or a space per write
    shown = {}
    for cut in cuts:
        head, tail = text[:cut].split("\n"), text[cut:].splitlines()
        head = head if head[-1] else head[:-1]  # a cut at a line's end leaves no fragment
        f = runtime.ForwardedLines()
        kept = [line for batch in (head, tail, ["next line"]) for line in f.filter(_batch(batch))]
        if kept != ["next line"]:
            shown[cut] = kept
    assert shown == {}, list(shown.items())[:3]


def test_filters_wired_into_rays_driver_printing():
    """The driver's two printing paths of Ray 2.60: the dispatcher handler `ray_print_logs`
    (worker output) and worker.print_to_stdstream (what the raylet pushes)."""
    import ray._private.worker as worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    got = []
    n_before = len(dispatcher.handlers)  # a Ray of this pytest session may have one too
    dispatcher.add_handler("ray_print_logs", lambda data: got.append(data["lines"]))
    try:
        runtime._install_console_filters()
        runtime._install_console_filters()  # twice: no second wrapper
        dispatcher.emit(_batch(["[aacray.train] epoch 1/3 ...", SEND_FAILED, *TB, "after"]))
        assert ["[aacray.train] epoch 1/3 ...", "after"] in got and [SEND_FAILED] not in got
        assert getattr(worker.print_to_stdstream, "_aacray", False)
    finally:
        with dispatcher._lock:
            dispatcher.handlers = dispatcher.handlers[:n_before] + dispatcher.handlers[n_before + 1 :]


def _record(name, msg, level=logging.INFO):
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_console_noise_filter_and_progress_condenser_on_records():
    nf = runtime.ConsoleNoiseFilter()
    assert not nf.filter(_record("ray._private.authentication.authentication_token_setup",
                                 "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled"))  # fmt: skip
    assert nf.filter(_record("ray.data", "Dataset x execution failed", logging.ERROR))
    assert nf.filter(_record("aacray.train", "train_decoder: 24 train clips"))

    c = runtime.ProgressCondenser()
    name = runtime.ProgressCondenser.LOGGER
    block = [
        "======= Running Dataset: dataset_0356_0 =======",
        "Total Progress: 12/36",
        "Active & requested resources: 1/2 CPU, 2.5MiB/3.2GiB object store",
        "",
        "=================================================",
    ]
    shown = []
    for msg in block * 2:
        r = _record(name, msg)
        if c.filter(r):
            shown.append(r.getMessage())
    assert shown == ["dataset_0356_0: 12/36 rows; Active & requested resources: 1/2 CPU, 2.5MiB/3.2GiB object store"] * 2
    # a block without the resources line still gives its total; other loggers untouched
    shown = [r.getMessage() for r in (_record(name, m) for m in (block[0], block[1], block[4])) if c.filter(r)]
    assert shown == ["dataset_0356_0: 12/36 rows"]
    assert c.filter(_record("ray.data._internal.execution.streaming_executor", "Total Progress: 1/2"))


# --------------------------------------------------------------------------------------
# The demo's summary
# --------------------------------------------------------------------------------------

STAGES = [
    StageResult("make_demo_corpus", 1.2, {"output": "runs/demo/make_demo_corpus", "clips": {"development": 300, "validation": 40, "evaluation": 80}}),
    StageResult("extract_embeddings", 25.4, {"items_in": 420, "written": 418, "quarantined": 2, "clips_per_s": 16.46}),
    StageResult("train_decoder", 296.6, {"epochs": 30, "val_loss_first": 4.2629, "val_loss_last": 2.1437,
                                         "matched_lower_share": 0.9612, "heldout_pairs": 200}),
    StageResult("score_matrix", 40.1, {"n_audios": 80, "n_captions": 400, "n_pairs": 32000, "pairs_per_s": 5123.4,
                                       "t2a": {"R@1": 0.1, "R@5": 0.35, "R@10": 0.5, "mAP@10": 0.2, "n_queries": 400},
                                       "a2t_raw": {"R@1": 0.05, "R@5": 0.2, "R@10": 0.3, "n_queries": 80},
                                       "a2t_minmax": {"R@1": 0.125, "R@5": 0.4, "R@10": 0.6, "n_queries": 80}}),
    StageResult("score_shortlist", 50.2, {"n_pairs": 27700, "candidates": {"method": "profile", "k": 20, "share_of_all_pairs": 0.86562,
                                                                           "t2a_gt_in_list": 0.965, "a2t_gt_in_list": 0.95},
                                          "t2a": {"R@1": 0.1, "R@5": 0.3, "R@10": 0.45, "mAP@10": 0.19, "n_queries": 400},
                                          "a2t_raw": {"R@1": 0.05, "R@5": 0.2, "R@10": 0.3, "n_queries": 80},
                                          "a2t_minmax": {"R@1": 0.125, "R@5": 0.375, "R@10": 0.55, "n_queries": 80}}),
    StageResult("caption", 30.0, {"n_audios": 80, "metrics": {"meteor": 0.1234, "cider_d": 0.4567, "spider": 0.3,
                                                              "vocab.cands": 57.0, "bleu_1": 0.5},
                                  "skipped": ["fense", "spice", "spider_fl"]}),
    StageResult("perturb", 20.0, {"n_perturbed": 1234, "accuracy": {"replace_bat": 0.6, "invert_seq": None},
                                  "accuracy_in_vocab": {"replace_bat": 0.65}}),
]  # fmt: skip


def test_format_summary_lines():
    lines = format_summary(STAGES, 413.3, "runs/demo")
    assert len(lines) < 40 and max(map(len, lines)) <= 100, lines
    assert lines[:10] == [
        "===== demo summary =====",
        "stage                 wall s  result",
        "make_demo_corpus         1.2  clips: development 300, validation 40, evaluation 80",
        "extract_embeddings      25.4  418 of 420 clips written, 2 quarantined (16.5 clips/s)",
        "train_decoder          296.6  30 epochs; val loss 4.263 -> 2.144; matched beats random 96.1% of 200",
        "score_matrix            40.1  80 audios x 400 captions = 32000 pairs, 5123 pairs/s",
        "score_shortlist         50.2  profile K=20: 27700 pairs (87%); truth listed: T2A 0.96, A2T 0.95",
        "caption                 30.0  80 audios captioned, 5 metrics (3 n/a)",
        "perturb                 20.0  1234 perturbed captions scored on their audio",
        "total                  413.3",
    ]
    text = "\n".join(lines)
    assert "\nRetrieval                      R@1    R@5   R@10 mAP@10\n" in text
    assert "\n  text-to-audio              0.100  0.350  0.500  0.200\n" in text
    assert "\n  audio-to-text              0.050  0.200  0.300      -\n" in text
    assert "\n  A2T min-max                0.125  0.400  0.600      -\n" in text
    # the shortlist run's rows under the exact ones
    assert "\n  text-to-audio (shortlist)  0.100  0.300  0.450  0.190\n" in text
    assert "\n  A2T min-max (shortlist)    0.125  0.375  0.550      -\n" in text
    assert "\nCaptions  METEOR CIDEr-D SPIDEr  Vocab BLEU-1\n           0.123   0.457  0.300     57  0.500\n" in text
    assert "\n  n/a: fense, spice, spider_fl (why: caption/metrics.json)\n" in text
    assert "\n  replace_bat           0.600    0.650\n  invert_seq                -        -\n" in text
    assert lines[-1] == "outputs under runs/demo; every figure: runs/demo/demo_summary.json"


def test_format_summary_failed_stage_and_partial_chain():
    lines = format_summary(
        [STAGES[1], StageResult("train_decoder", 3.0, {}, "TrainingFailedError: worker died")], 30.0
    )
    assert lines[3] == "train_decoder            3.0  FAILED: TrainingFailedError: worker died"
    assert len(lines) == 5  # no tables for stages that did not run


def test_demo_arguments_move_the_chain_and_set_keys():
    from aacray.demo import parse_args, rebase_overrides

    names = ["make_demo_corpus", "extract_embeddings", "train_decoder"]
    only, root, ov = parse_args(["--root", "/tmp/d/", "train_decoder", "train_decoder.epochs=3"], names)
    assert (only, root, ov["train_decoder"], ov["make_demo_corpus"]) == ({"train_decoder"}, "/tmp/d", ["epochs=3"], [])
    assert rebase_overrides(os.path.join(ROOT, "configs/extract_demo.yaml"), "/tmp/d") == [
        "input.root=/tmp/d/make_demo_corpus", "output=/tmp/d/extract_embeddings"]  # fmt: skip
    assert rebase_overrides(os.path.join(ROOT, "configs/extract_demo.yaml"), "runs/demo") == []
    with pytest.raises(ValueError, match="unknown argument"):
        parse_args(["epochs=3"], names)


# --------------------------------------------------------------------------------------
# A real job's console
# --------------------------------------------------------------------------------------

EPOCH_RE = re.compile(r"\[aacray\.train\] epoch (\d+)/3 ")
NOISE_SEEN = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "GetTimeoutError",
              "Failed to send resource request", "Reporting training result", "Token authentication",
              "PYTHON worker processes have been started", "[Gloo]",
              # Ray Train's INFO lines: gone once aacray/train.py passes
              # RunConfig(logging_config=runtime.train_logging_config())
              "Checkpoint successfully created", "Started training worker group")  # fmt: skip


def train_main(work: str) -> None:
    """Tiny run_job(train) on its own Ray, then a Ray task that fails on purpose."""
    import numpy as np
    from faults import write_extract_output

    from aacray.cli import run_job
    from aacray.config import TrainConfig
    from aacray.train import run_train

    rng = np.random.default_rng(0)
    words = ["dog", "bell", "rain", "engine", "birds", "siren", "barks", "rings"]
    ids = [f"a{i:02d}" for i in range(24)]
    subsets = ["development"] * 20 + ["validation"] * 4
    frames = [rng.standard_normal((int(rng.integers(8, 16)), 768)).astype(np.float32) for _ in ids]
    caps = [(f"{a}#{j}", s, " ".join(rng.choice(words, 5)), a) for a, s in zip(ids, subsets, strict=True) for j in range(2)]
    emb = write_extract_output(os.path.join(work, "emb"), ids, subsets, frames, caps)
    args = ["configs/train_demo.yaml", f"embeddings={emb}", f"output={os.path.join(work, 'train')}", "epochs=3",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64"]  # fmt: skip
    rc = run_job(TrainConfig, run_train, args)
    print(f"train rc={rc}", flush=True)

    import ray

    @ray.remote(num_cpus=0)
    def fails():
        logging.getLogger("aacray.job").error("deliberate job error 4242 (logged in a worker)")
        raise ValueError("deliberate job error 4242")

    try:
        ray.get(fails.remote())
    except ray.exceptions.RayTaskError as e:
        print(f"job error caught: {type(e.cause).__name__}\n{e}", flush=True)
    import time

    time.sleep(2)  # the worker's lines reach the driver asynchronously


def _run_isolated(cmd: str, work: str, extra_env: dict | None = None, timeout: float = 600) -> str:
    ray_tmp = tempfile.mkdtemp(prefix="aacl", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "AACRAY_"))}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", PYTHONPATH=HERE, **(extra_env or {}))
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), cmd, work], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        aside = ""
        for dirpath, _, files in os.walk(ray_tmp):
            if runtime.ASIDE_FILE in files:
                with open(os.path.join(dirpath, runtime.ASIDE_FILE)) as f:
                    aside += f.read()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = p.stdout + p.stderr
    with open(os.path.join(work, "console.log"), "w") as f:
        f.write(out)
    with open(os.path.join(work, "aside.log"), "w") as f:
        f.write(aside)
    assert p.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
def test_train_console_one_line_per_epoch_no_ray_noise_errors_shown(tmp_path):
    out = _run_isolated("train", str(tmp_path))
    aside = (tmp_path / "aside.log").read_text()
    assert "train rc=0" in out, out[-6000:]
    epochs = [int(m.group(1)) for m in EPOCH_RE.finditer(out)]
    assert epochs == [1, 2, 3], out[-6000:]
    for noise in NOISE_SEEN:
        assert noise not in out, f"{noise!r} on the console:\n{out[-6000:]}"
    # the deliberate error: the worker's own ERROR line and the exception's traceback
    assert "deliberate job error 4242 (logged in a worker)" in out
    assert "ValueError: deliberate job error 4242" in out and "job error caught: ValueError" in out
    # what was kept off the console is in the session's logs: with no dashboard, the
    # PlacementGroupCleaner's State API polls fail
    assert "PlacementGroupCleaner" in aside or "Failed to query Ray Train Controller" in aside, aside[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    {"train": train_main}[sys.argv[1]](sys.argv[2])
