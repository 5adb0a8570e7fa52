"""Shared command-line plumbing for the jobs: config arguments and clean error exits."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .artifacts import CheckpointError
from .config import Config, ConfigError, add_cli_args, load_config
from .data import DataError

#: errors a user can cause; they print one line and exit with status 2, no traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_cli_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return p


def config_from_args(args) -> Config:
    return load_config(args.preset, args.overrides)


def run_main(main: Callable[[], object]) -> None:
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        sys.exit(130)
