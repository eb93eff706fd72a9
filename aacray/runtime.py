"""Starting or joining Ray, and the few process-wide settings every job shares.

- `ray job submit` sets RAY_ADDRESS for the driver: then `ray.init()` joins that cluster.
- `ray.address` in a config joins a named cluster (`auto` for one started with `ray start`).
- Otherwise an embedded local Ray starts, with `ray.num_cpus` CPUs if set.
The S3 variables (AWS_*) are forwarded to workers in the runtime env so every process
reaches the same endpoint with the same keys.
"""

from __future__ import annotations

import logging
import os

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


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("AACRAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address is None and os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at RAY_ADDRESS=%s", os.environ["RAY_ADDRESS"])
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    elif address is not None:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
    else:
        log.info("starting an embedded local Ray (num_cpus=%s)", num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.preserve_order = True
