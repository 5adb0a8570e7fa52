"""Command-line entry points: one per pipeline (``jobs/*.py`` and the ``raymia-*``
console commands call these), shared config arguments, and clean error exits."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .artifacts import CheckpointError
from .config import Config, ConfigError, add_cli_args, load_config
from .data import DataError

#: errors a user can cause; they print one line and exit with status 2, no traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def parser(description: str, out_help: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_cli_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    if out_help:
        p.add_argument("--out", default=None, help=f"output directory (default: {out_help})")
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


def _entry(fn: Callable[[Optional[Sequence[str]]], object]) -> Callable[[Optional[Sequence[str]]], None]:
    def main(argv: Optional[Sequence[str]] = None) -> None:
        run_main(lambda: fn(argv))
    main.__doc__ = fn.__doc__
    return main


@_entry
def train(argv=None):
    """Train R_T, R_E, the defender's G and the attacker's F as concurrent Ray Tune trials."""
    from .pipelines import train as pipeline
    args = parser(train.__doc__, "<out_root>/<run.name>").parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address)


@_entry
def alpha_sweep(argv=None):
    """The dummy-model defense end to end: train what is missing, attack over the α grid, report."""
    from .pipelines import alpha_sweep as pipeline
    args = parser(alpha_sweep.__doc__, "<out_root>/<run.name>/alpha_sweep").parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address)


@_entry
def defense_search(argv=None):
    """Defense search with the attack in the loop (Tune), then the multi-seed check."""
    from .pipelines import defense_search as pipeline
    p = parser(defense_search.__doc__, "<out_root>/<run.name>/defense_search")
    p.add_argument("--check-only", action="store_true", help="skip the search; check the best of OUT/search_trials.parquet")
    p.add_argument("--local", action="store_true", help="with --check-only: run the check in this process, no Ray")
    p.add_argument("--search-only", action="store_true", help="stop after the search (check later with --check-only)")
    args = p.parse_args(argv)
    return pipeline.run(config_from_args(args), args.preset, args.out, args.address, args.check_only, args.local,
                        args.search_only)


@_entry
def filter_sweep(argv=None):
    """Similarity-filter sweep (Raha et al.): Table 1's configs and a grid, attack and regular-user simulations."""
    from .pipelines import filter_sweep as pipeline
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")        # every simulation actor's progress line
    p = parser(filter_sweep.__doc__, "<out_root>/filter_sweep")
    p.set_defaults(preset="filter_mnist,filter_orl")
    args = p.parse_args(argv)
    return pipeline.run(pipeline.load_settings(args.preset, args.overrides), args.out, args.address)


@_entry
def study(argv=None):
    """The alpha sweep over seeds x identity folds, pooled with hierarchical CIs (the README's numbers)."""
    from .pipelines import study as pipeline
    args = parser(study.__doc__, "<out_root>/<run.name>/study").parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address)


@_entry
def red_team(argv=None):
    """Red team of the filters: calibrate the robust detector on benign traffic, then every evasion strategy and query attack."""
    from .pipelines import red_team as pipeline
    p = parser(red_team.__doc__, "<out_root>/<run.name>/red_team")
    p.add_argument("--no-attacks", action="store_true", help="skip the black-box and label-only attacks (no models needed)")
    args = p.parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address, attacks=not args.no_attacks)


@_entry
def threat_panel(argv=None):
    """Threat panel: the query attacks' success against query budget, undefended, behind the dummy defense, the filters and both."""
    from .pipelines import threat_panel as pipeline
    args = parser(threat_panel.__doc__, "<out_root>/<run.name>/threat_panel").parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address)


@_entry
def whitebox_panel(argv=None):
    """White-box attack panel: priors, regularisers, augmentation and victims, judged by R_E and the independent judges."""
    from .pipelines import whitebox_panel as pipeline
    args = parser(whitebox_panel.__doc__, "<out_root>/<run.name>/whitebox_panel").parse_args(argv)
    return pipeline.run(config_from_args(args), args.out, args.address)
