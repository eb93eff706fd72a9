"""The shared body of every `jobs/*.py` entry script: config, logging, errors, exit codes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from aacray.config import ConfigError, load_config
from aacray.runtime import setup_logging

log = logging.getLogger("aacray")

# exit codes: 0 ok, 2 bad config or input (nothing ran), 3 ran but quarantined too much
EXIT_BAD_INPUT = 2
EXIT_QUARANTINE = 3


def run_job(cfg_cls: type, fn: Callable[[Any], dict], argv: list[str]) -> int:
    setup_logging()
    try:
        cfg = load_config(cfg_cls, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = fn(cfg)
    except Exception as e:
        from aacray.extract import TooManyBadItems

        if isinstance(e, TooManyBadItems):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_QUARANTINE
        if isinstance(e, ValueError | FileNotFoundError):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    print(json.dumps(result, indent=2, default=str))
    return 0
