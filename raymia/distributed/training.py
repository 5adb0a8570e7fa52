"""Training stage on Ray: every missing artifact a concurrent Tune trial."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ray import tune

from ..artifacts import read_manifest
from ..config import Config, config_from_dict
from ..kinds import kind, missing
from .runtime import init_ray, trial_resources
from .tune import experiment_name, run_grid, tune_progress


def _train_trial(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    name = config["kind"]
    out = kind(name).train(cfg, progress=tune_progress(name))
    man = read_manifest(out)
    tune.report({"step": 1, "total": 1, "fraction": 1.0, "done": 1, "artifact": str(out),
                 **{f"m_{k}": v for k, v in man.get("metrics", {}).items() if isinstance(v, (int, float))}})


def run_training(cfg: Config, kinds: Sequence[str], stage: str = "train") -> None:
    """Train the given artifact kinds (:data:`raymia.kinds.KINDS`) as concurrent Tune
    trials.  Each trial writes its artifact atomically to its config-hashed directory, so
    an interrupted job retrains only what is missing on the next run."""
    if not kinds:
        return
    run_grid(_train_trial, trial_resources(cfg), {"cfg": cfg.to_dict(), "kind": tune.grid_search(list(kinds))},
             experiment_name(stage), Path(cfg.run.out_root) / cfg.run.name / "tune", "training trial(s)")


def ensure_artifacts(cfg: Config, kinds: Sequence[str], address: Optional[str] = None, label: str = "train") -> dict:
    """Train whatever of ``kinds`` is missing (joining or starting Ray only then); returns
    {kind: artifact dir}.  Every pipeline gets its models through this."""
    todo = missing(cfg, kinds)
    dirs = {k: kind(k).dir(cfg) for k in kinds}
    for k in kinds:
        if k not in todo:
            print(f"[{label}] reusing {k}: {dirs[k]}", flush=True)
    if todo:
        print(f"[{label}] training {', '.join(todo)} as Ray Tune trials", flush=True)
        init_ray(cfg, address)
        run_training(cfg, todo, stage=label)
    return dirs
