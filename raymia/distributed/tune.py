"""One way to build and run a Tune experiment, collect its trial errors, and report
progress from inside a trial.  Tune's own trial tables are off (``verbose=0``): every
stage prints one readable :mod:`raymia.progress` line instead."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ray import tune

from ..progress import Progress


def experiment_name(stage: str) -> str:
    return f"{stage}-{int(time.time())}"


def make_tuner(trainable, resources: dict, param_space: dict, name: str, storage: Path, *,
               max_failures: int = 1, callbacks: Optional[list] = None,
               tune_config: Optional[tune.TuneConfig] = None, verbose: int = 0) -> tune.Tuner:
    """A Tuner over ``trainable`` with ``resources`` per trial, results under
    ``storage/name`` (``storage`` must be absolute), actors reused between trials."""
    return tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune_config or tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


def raise_trial_errors(grid, what: str) -> None:
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} {what} failed; first error: {errors[0]}")


def run_grid(trainable, resources: dict, param_space: dict, name: str, storage: Path, what: str, **kw):
    """Build, fit, and raise on failed trials (``what`` names them in the message)."""
    grid = make_tuner(trainable, resources, param_space, name, storage, **kw).fit()
    raise_trial_errors(grid, what)
    return grid


def tune_progress(label: str, every_s: float = 10.0):
    """A progress callback for library loops inside a trial: prints and reports to Tune."""
    printer = Progress(label, every_s)
    last = [0.0]

    def cb(step: int, total: int, metrics: dict) -> None:
        printer(step, total, metrics)
        now = time.time()
        if now - last[0] >= every_s and step < total:
            last[0] = now
            tune.report({"step": step, "total": total, "fraction": step / max(total, 1),
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    return cb
