"""Starting or joining Ray, and the few process-wide settings every job shares.

- `ray job submit` sets RAY_ADDRESS for the driver: then `ray.init()` joins that cluster.
- `ray.address` in a config joins a named cluster (`auto` for one started with `ray start`).
- Otherwise an embedded local Ray starts, with `ray.num_cpus` CPUs if set.
The S3 variables (AWS_*) are forwarded to workers in the runtime env so every process
reaches the same endpoint with the same keys.

The console. Ray writes every process's output to its session's log files
(<session>/logs/worker-*.out|err, raylet.*, ray-data/ray-data.log, train/ray-train-sys-*.log)
and forwards a copy of each worker's stdout/stderr to the driver. Of that copy, the lines in
CONSOLE_NOISE say nothing to a user of these jobs (they are Ray's housekeeping on a small
local cluster); they are kept off the console and appended to
<session>/logs/aacray-console-filtered.log. Everything else, errors included, shows.
  - epoch lines printed twice: Ray Train V2 patches `print` in its workers to log the line on
    the root logger, and also print it, because a Ray worker's sys.stdout is not
    sys.__stdout__; the root logger's console handler writes to the same stream, so the line
    is forwarded twice. RAY_TRAIN_ENABLE_PRINT_PATCH=0 (set here unless set already; Ray
    Train passes it on to the controller and workers) leaves `print` as it is.
  - Ray Train's INFO lines (worker group start, "Checkpoint successfully created ...") repeat
    per epoch: `train_logging_config()` is the RunConfig(logging_config=...) that keeps them
    in the train/ log files only. ("Reporting training result ...", per epoch and worker, is
    logged on a logger that setting misses: it is in CONSOLE_NOISE.)
  - The raylet's messages to the driver pass the same filter.
  - Ray Data: one progress display per dataset run (the total, not one bar per operator); when
    stdout is not a terminal, one line every AACRAY_PROGRESS_LOG_S seconds (default 30)
    instead of Ray's 4-9 line block every 10 s.
AACRAY_RAY_CONSOLE=all shows everything Ray forwards, unfiltered.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("aacray")

_FORWARD_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

ASIDE_FILE = "aacray-console-filtered.log"


@dataclass(frozen=True)
class Noise:
    """A console line that says nothing to the user; `why` says where it comes from."""

    pattern: str
    why: str
    traceback: bool = False  # a Python traceback follows (exc_info, a dead thread): hide it too
    then: int = 0  # a fixed number of following lines to hide too (warnings.warn's source line)


CONSOLE_NOISE: tuple[Noise, ...] = (
    Noise(
        r"Failed to query Ray Train Controller actor state",
        "PlacementGroupCleaner polls the State API every second; a local Ray started without "
        "the dashboard has none, so each poll fails. The cleaner is a safety net for a "
        "controller that dies while the cluster lives on; an embedded Ray dies with the driver",
    ),
    Noise(
        r"^Exception in thread PlacementGroupCleanerMonitor",
        "the same cleaner's thread, dead on a host with several Ray instances (the State API "
        "client cannot tell which one is its own)",
        traceback=True,
    ),
    Noise(
        r"Failed to (send|cancel) resource request for ",
        "TrainController's advisory request to Ray Data's AutoscalingCoordinator times out "
        "(5 s) while that actor is still starting; a local cluster has no autoscaler to ask",
        traceback=True,
    ),
    Noise(
        r"PYTHON worker processes have been started on node",
        "raylet: more worker processes than 'startup concurrency' (= CPUs) on a small machine",
    ),
    Noise(
        r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
        "Ray Train's own DatasetManager sets the deprecated option",
        then=1,
    ),
    Noise(r"^Progress bars (for operators )?disabled\. To enable", "Ray Data: the settings made here"),
    Noise(r"Progress will be logged because stdout is a non-interactive terminal", "Ray Data"),
    Noise(r"A new progress UI is available", "Ray Data"),
    Noise(r"^Execution plan of Dataset ", "Ray Data: the operator chain (kept in ray-data.log)"),
    Noise(
        r"^Reporting training result \d+: TrainingReport\(",
        "Ray Train, per epoch and worker, on a logger named by its file path (getLogger(__file__)) "
        "that RunConfig's log level does not reach; kept in train/ray-train-app-worker-*.log",
    ),
    Noise(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks", "torch.distributed's gloo set-up"),
    Noise(
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
        r"store and max_restarts > 0",
        "Ray about its own actors (Ray Data's MapWorker, Train's PreemptionWatcher); the driver's "
        "own copy of this C++ line goes straight to its stderr and stays",
    ),
    Noise(r"^Failed to get node info ", "ray.init polling for its raylet on a busy host (INFO)"),
    Noise(
        r"Token authentication is enabled for this Ray cluster",
        "Ray 2.60 on every ray.init; a local cluster only listens on this host",
    ),
)
_NOISE_RE = [(re.compile(n.pattern), n) for n in CONSOLE_NOISE]


def match_noise(line: str) -> Noise | None:
    for rx, n in _NOISE_RE:
        if rx.search(line):
            return n
    return None


def _console_filter_on() -> bool:
    return os.environ.get("AACRAY_RAY_CONSOLE", "").lower() != "all"


# --------------------------------------------------------------------------------------
# Where hidden lines go: <session>/logs/aacray-console-filtered.log
# --------------------------------------------------------------------------------------


class _Aside:
    """Appends hidden console lines to the session's log dir (kept in memory until a Ray
    session exists on this host, at most 500 lines)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._path: str | None = None

    def _session_logs(self) -> str | None:
        try:
            import ray._private.worker as w

            node = w._global_node
            return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
        except Exception:
            return None

    def path(self) -> str | None:
        logs = self._session_logs()
        return os.path.join(logs, ASIDE_FILE) if logs else None

    def write(self, source: str, line: str) -> None:
        with self._lock:
            self._pending.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {source}: {line.rstrip()}\n")
            del self._pending[:-500]
            path = self.path()
            if path is None:
                return
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(self._pending)
                self._pending.clear()
            except OSError:
                pass


_aside = _Aside()


# --------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------


class ConsoleNoiseFilter(logging.Filter):
    """On a console handler in this process: drops CONSOLE_NOISE records (set aside)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _console_filter_on():
            return True
        try:
            msg = record.getMessage()
        except Exception:
            return True
        if match_noise(msg.split("\n", 1)[0]) is None:
            return True
        _aside.write(record.name, msg)
        return False


class ProgressCondenser(logging.Filter):
    """On Ray Data's console handler: its non-tty progress block ("===== Running Dataset: X
    =====", "Total Progress: a/b", the resources line, op lines, "=====") becomes one line
    "X: a/b rows; <resources>". Operator lines, if enabled, pass as they are."""

    LOGGER = "ray.data._internal.progress.logging_progress"

    def __init__(self):
        super().__init__()
        self._dataset: str | None = None
        self._total: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self.LOGGER:
            return True
        msg = record.getMessage()
        m = re.match(r"=+ Running Dataset: (\S+) =+$", msg)
        if m:
            self._dataset, self._total = m.group(1), None
            return False
        if self._dataset is None:
            return True
        if msg.startswith("Total Progress: "):
            self._total = msg[len("Total Progress: "):]
            return False
        if msg == "":
            return False
        if re.fullmatch(r"=+", msg):
            dataset, pending = self._dataset, self._total
            self._dataset = self._total = None
            if pending is None:
                return False
            self._set(record, f"{dataset}: {pending} rows")
            return True
        if self._total is not None and not msg.startswith(" "):
            # the resources line right after the total
            line = f"{self._dataset}: {self._total} rows; {msg}"
            self._total = None
            self._set(record, line)
            return True
        return True

    @staticmethod
    def _set(record: logging.LogRecord, msg: str) -> None:
        record.msg, record.args = msg, ()


class ForwardedLines:
    """Filters the worker output Ray forwards to the driver (batches of lines per process):
    drops CONSOLE_NOISE lines and the traceback or lines that follow them.

    Ray's log monitor reads a worker's log file while the worker writes it, so a line
    written in several writes can come cut in two: its head ends one batch and its tail
    starts the next batch of the same stream. A tail inside a hidden traceback is hidden
    with it (`_is_cut_tail`): it is often not indented, so it would otherwise read as the
    traceback's last line and let the rest of the traceback through."""

    def __init__(self):
        self._state: dict[tuple, tuple[str, int]] = {}  # stream -> (mode, lines left)
        self._lock = threading.Lock()

    def filter(self, data: dict) -> list[str]:
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler" or not _console_filter_on():
            return lines
        key = (data.get("ip"), data.get("pid"), data.get("is_err"))
        who = f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
        kept = []
        with self._lock:
            mode, left = self._state.get(key, ("", 0))
            for i, line in enumerate(lines):
                if i == 0 and _is_cut_tail(line, mode):
                    hide, mode = True, {"exc?": "exc"}.get(mode, mode)  # its head was hidden
                else:
                    hide, mode, left = self._step(line, mode, left)
                if hide:
                    _aside.write(who, line)
                else:
                    kept.append(line)
            self._state[key] = (mode, left)
        return kept

    @staticmethod
    def _step(line: str, mode: str, left: int) -> tuple[bool, str, int]:
        """(hide this line, next mode, lines left). Modes: '' normal; 'then' hide `left`
        more lines; 'tb?' a traceback may follow; 'tb' inside one; 'exc' after its last line;
        'exc?' after a last line with no message yet (maybe cut after the exception's name)."""
        if mode == "then" and left > 0:
            return True, ("then" if left > 1 else ""), left - 1
        if mode in ("tb?", "exc", "exc?"):
            if line.startswith("Traceback (most recent call last)"):
                return True, "tb", 0
            after = mode != "tb?"
            if after and (line.strip() == "" or line.startswith(("During handling", "The above exception"))):
                return True, "exc", 0  # a chained exception: its traceback follows
            if after and line.startswith((" ", "\t")):
                return True, "tb", 0  # the message's own indented lines, or a cut line's tail
            mode = ""
        elif mode == "tb":
            if line.startswith((" ", "\t")) or line.strip() == "":
                return True, "tb", 0
            # "SomeError: message", the traceback's last line
            return True, ("exc?" if _NAME_ONLY.match(line) else "exc"), 0
        n = match_noise(line)
        if n is None:
            return False, "", 0
        if n.traceback:
            return True, "tb?", 0
        if n.then:
            return True, "then", n.then
        return True, "", 0


# a traceback's last line: "ValueError: ...", "ray.exceptions.RayTaskError(ValueError): ...",
# or a bare name ("StopIteration"); _NAME_ONLY: one whose message has not come (yet)
_EXCEPTION_NAME = r"^[A-Za-z_][\w.]*(\([\w.]*\))?"
_EXCEPTION_LINE = re.compile(_EXCEPTION_NAME + r"(:|$)")
_NAME_ONLY = re.compile(_EXCEPTION_NAME + r"(: ?)?$")


def _is_cut_tail(line: str, mode: str) -> bool:
    """Whether the first line of a batch, arriving while a traceback is hidden, is the tail
    of a line cut at the previous batch's end. Python prints a thread's traceback in small
    writes (a caret line one character at a time), so the cut falls mostly inside a line of
    the traceback ('tb'): its tail is then neither indented nor shaped like the exception's
    last line. After a last line with no message ('exc?'), the tail is that message; after
    a noise line cut before its colon ('tb?', "Exception in thread X" + ":"), that colon."""
    if mode == "tb?":
        return line.startswith(":")
    if mode not in ("tb", "exc?") or line.strip() == "" or match_noise(line) is not None:
        return False
    if mode == "tb":
        return not line.startswith((" ", "\t")) and _EXCEPTION_LINE.match(line) is None
    return not line.startswith("Traceback (most recent call last)")


_forwarded = ForwardedLines()
_noise_filter = ConsoleNoiseFilter()
_condenser = ProgressCondenser()


def _is_file_handler(h: logging.Handler) -> bool:
    return isinstance(h, logging.FileHandler) or type(h).__name__ == "SessionFileHandler"


def _add_filter(logger_name: str, flt: logging.Filter) -> None:
    for h in logging.getLogger(logger_name).handlers:
        if not _is_file_handler(h) and flt not in h.filters:
            h.addFilter(flt)


def _install_console_filters() -> None:
    """Filters on the console handlers of the driver's `ray` and `ray.data` loggers (their
    file handlers keep every record) and around the handler that prints forwarded lines."""
    _add_filter("ray", _noise_filter)
    if "ray.data" in sys.modules:
        _add_filter("ray.data", _noise_filter)
        _add_filter("ray.data", _condenser)
    try:
        import ray._private.worker as worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without them: the console shows everything
        return
    # messages the raylet pushes to the driver (listen_error_messages) call this directly
    if callable(getattr(worker, "print_to_stdstream", None)) and not getattr(worker.print_to_stdstream, "_aacray", False):
        original = worker.print_to_stdstream

        def print_to_stdstream(data, ignore_prefix: bool):
            lines = _forwarded.filter(data)
            if lines:
                original({**data, "lines": lines}, ignore_prefix)

        print_to_stdstream._aacray = True
        worker.print_to_stdstream = print_to_stdstream
    with dispatcher._lock:
        handlers = []
        for name, fn in dispatcher.handlers:
            # after a ray.shutdown, ray.init binds the print_to_stdstream patched here
            if name == "ray_print_logs" and not getattr(getattr(fn, "func", fn), "_aacray", False):
                fn = _filtered_printer(fn)
            handlers.append((name, fn))
        dispatcher.handlers = handlers


def _filtered_printer(print_fn):
    def printer(data: dict) -> None:
        lines = _forwarded.filter(data)
        if lines:
            print_fn({**data, "lines": lines})

    printer._aacray = True
    return printer


# --------------------------------------------------------------------------------------
# The process-wide settings
# --------------------------------------------------------------------------------------


def quiet_ray_env() -> None:
    """Environment for Ray read at start-up or first use; a value set by the user stays."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", os.environ.get("AACRAY_PROGRESS_LOG_S", "30"))


def setup_logging() -> None:
    quiet_ray_env()
    logging.basicConfig(
        level=os.environ.get("AACRAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if "ray" in sys.modules:
        _install_console_filters()


def train_logging_config():
    """RunConfig(logging_config=...) for Ray Train: its INFO lines to the train/ log files,
    WARNING and above to the console too (AACRAY_RAY_TRAIN_LOG_LEVEL overrides)."""
    import ray.train

    return ray.train.LoggingConfig(log_level=os.environ.get("AACRAY_RAY_TRAIN_LOG_LEVEL", "WARNING"))


LOCAL_START_TRIES = 3

_embedded_gcs: str | None = None  # the GCS address of the embedded Ray init_ray last started


def joins_cluster(address: str | None) -> bool:
    """Whether `init_ray(address)` joins a running Ray cluster (an address, or the
    RAY_ADDRESS that `ray job submit` sets) rather than start an embedded one."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def ray_is_embedded() -> bool:
    """True when this process is connected to an embedded local Ray that `init_ray` started:
    its one node is all it will ever have (no autoscaler adds nodes to it)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs


def _start_local(ray, num_cpus: int | None, runtime_env: dict | None) -> None:
    """ray.init of an embedded Ray; again (at most LOCAL_START_TRIES in all) when Ray gives
    up waiting for its own raylet, which a busy host makes miss Ray's fixed 30 s."""
    for attempt in range(1, LOCAL_START_TRIES + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
            return
        except Exception as e:
            node = _half_started_node(e) if "timed out during startup" in str(e) else None
            if node is None or attempt == LOCAL_START_TRIES:
                raise
            log.warning("local Ray did not start in time (%s); trying again (%d/%d)", e, attempt + 1, LOCAL_START_TRIES)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            ray.shutdown()


def _half_started_node(e: BaseException):
    """The ray._private.node.Node whose __init__ raised `e` (its processes still run)."""
    from ray._private.node import Node

    tb = e.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "__init__" and isinstance(obj, Node):
            return obj
        tb = tb.tb_next
    return None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    global _embedded_gcs
    import ray

    quiet_ray_env()
    if ray.is_initialized():
        _install_console_filters()
        return
    # before ray.init: Ray logs its start-up (the token-auth warning) on the `ray` logger
    _add_filter("ray", _noise_filter)
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if joins_cluster(address):
        log.info("joining the Ray cluster at %s", address or f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting an embedded local Ray (num_cpus=%s)", num_cpus)
        _start_local(ray, num_cpus, runtime_env)
        _embedded_gcs = ray.get_runtime_context().gcs_address
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    # one bar (tty) or line (log) per dataset run: its total, not one per operator
    ctx.enable_operator_progress_bars = False
    ctx.execution_options.preserve_order = True
    _install_console_filters()
    if _console_filter_on():
        log.info("Ray's log files: %s (lines kept off this console: %s)", _aside._session_logs(), ASIDE_FILE)
