"""Training stage on Ray: every missing artifact a concurrent Tune trial."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional, Sequence

from ray import tune

from ..artifacts import read_manifest
from ..config import Config, config_from_dict
from ..kinds import kind, missing
from .runtime import init_ray, trial_resources
from .tune import experiment_name, run_grid, tune_progress


def _job(name: str) -> tuple[str, int]:
    """``"kind"`` or ``"kind@draw"`` (a redraw of a dummy kind, R_dmy's report draw)."""
    k, _, d = name.partition("@")
    return k, int(d or 0)


def _train_trial(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    name, draw = _job(config.get("job") or config["kind"])
    if draw:
        cfg.dummy.draw = draw
    needs = [n for n in kind(name).needs if n in config.get("siblings", ())]
    if needs:
        # trained by a sibling trial of this phase that started before this one (grid order)
        wait_for_artifacts(cfg, needs, float(config.get("wait_s", 3600.0)))
    out = kind(name).train(cfg, progress=tune_progress(name if not draw else f"{name}@{draw}"))
    man = read_manifest(out)
    tune.report({"step": 1, "total": 1, "fraction": 1.0, "done": 1, "artifact": str(out),
                 **{f"m_{k}": v for k, v in man.get("metrics", {}).items() if isinstance(v, (int, float))}})


def wait_for_artifacts(cfg: Config, names: Sequence[str], timeout_s: float, poll_s: float = 1.0) -> None:
    from ..artifacts import artifact_exists
    deadline = time.monotonic() + timeout_s
    while not all(artifact_exists(kind(n).dir(cfg)) for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(names)} did not appear within {timeout_s:.0f} s")
        time.sleep(poll_s)


def run_training(cfg: Config, jobs: Sequence[str], stage: str = "train") -> None:
    """Train the given artifact kinds (:data:`raymia.kinds.KINDS`; ``kind@draw`` for a
    redraw) as concurrent Tune trials, in the order given.  A trial whose inputs are
    trained in the same phase (R_dmy needs G) waits for them: they come earlier in the
    order, so they have started (Tune starts trials in grid order), and while they
    finish the other slots train what does not depend on them.  Each trial writes its
    artifact atomically to its config-hashed directory, so an interrupted job retrains
    only what is missing on the next run."""
    if not jobs:
        return
    siblings = sorted({_job(j)[0] for j in jobs})
    run_grid(_train_trial, trial_resources(cfg), {"cfg": cfg.to_dict(), "siblings": siblings,
                                                  "job": tune.grid_search(list(jobs))},
             experiment_name(stage), Path(cfg.run.out_root) / cfg.run.name / "tune", "training trial(s)")


def ensure_artifacts(cfg: Config, kinds: Sequence[str], address: Optional[str] = None, label: str = "train",
                     draws: Sequence[int] = ()) -> dict:
    """Train whatever of ``kinds`` is missing (joining or starting Ray only then), in one
    Tune phase; ``draws``: also these redraws of the dummy kinds among ``kinds``.  Returns
    {kind: artifact dir}.  Every pipeline gets its models through this."""
    todo = missing(cfg, kinds)
    for d in draws:
        c = copy.deepcopy(cfg)
        c.dummy.draw = int(d)
        todo += [f"{n}@{d}" for n in missing(c, [k for k in kinds if kind(k).family == "dummy"])]
    dirs = {k: kind(k).dir(cfg) for k in kinds}
    for k in kinds:
        if k not in todo:
            print(f"[{label}] reusing {k}: {dirs[k]}", flush=True)
    if todo:
        print(f"[{label}] training {', '.join(todo)} as Ray Tune trials", flush=True)
        init_ray(cfg, address)
        run_training(cfg, todo, stage=label)
    return dirs
