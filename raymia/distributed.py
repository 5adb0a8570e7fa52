"""The one Ray module of raymia: starting/joining Ray, resources per trial, and running
the training stage as concurrent Ray Tune trials.  Everything else in the library is
plain torch/numpy; ``jobs/`` and ``serve/`` build on this module."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from .config import Config, config_from_dict


def in_ray_job() -> bool:
    """True when this process is the driver of a ``ray job submit`` job (its working
    directory is a temporary copy that Ray deletes, so results must go elsewhere)."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID")) or "runtime_resources" in os.getcwd()


def resolve_out_root(cfg: Config) -> Path:
    """Absolute results root.  Relative ``run.out_root`` is taken from ``$RAYMIA_OUT_ROOT``
    if set, from ``~/raymia_runs`` inside a submitted Ray job, else from the current
    directory.  The result is written back into ``cfg.run.out_root``."""
    root = Path(cfg.run.out_root).expanduser()
    if not root.is_absolute():
        base = os.environ.get("RAYMIA_OUT_ROOT")
        if base:
            root = Path(base).expanduser()
        elif in_ray_job():
            root = Path.home() / "raymia_runs"
        else:
            root = Path.cwd() / root
    cfg.run.out_root = str(root.resolve())
    return Path(cfg.run.out_root)


def init_ray(cfg: Optional[Config] = None, address: Optional[str] = None) -> None:
    """Join a running cluster when one is named (``--address``, ``RAY_ADDRESS``, or we are a
    submitted job), otherwise start a private local Ray instance."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr or in_ray_job():
        ray.init(address=addr or "auto", log_to_driver=True)
        return
    mb = cfg.resources.object_store_mb if cfg else 256
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=int(mb) * 1024 * 1024, log_to_driver=True)


def cluster_gpus() -> float:
    import ray
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(cfg: Config, gpu_fraction: Optional[float] = None) -> dict:
    """CPU (and, when the cluster has GPUs, a GPU fraction) each Tune trial requests."""
    res = {"cpu": cfg.resources.cpus_per_trial}
    if cluster_gpus() > 0:
        res["gpu"] = cfg.resources.gpus_per_trial if gpu_fraction is None else gpu_fraction
    return res


def tune_progress(label: str, every_s: float = 10.0):
    """A progress callback for library loops that reports to Tune (and prints)."""
    from ray import tune
    from .training import Progress
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


def _train_trial(config: dict) -> None:
    from ray import tune
    from .artifacts import read_manifest
    from .training import train_artifact
    cfg = config_from_dict(config["cfg"])
    kind = config["kind"]
    out = train_artifact(cfg, kind, progress=tune_progress(kind))
    man = read_manifest(out)
    tune.report({"step": 1, "total": 1, "fraction": 1.0, "done": 1, "artifact": str(out),
                 **{f"m_{k}": v for k, v in man.get("metrics", {}).items() if isinstance(v, (int, float))}})


def run_training(cfg: Config, kinds: list[str], experiment: str = "train") -> None:
    """Train the given base artifacts as concurrent Tune trials (one trial per artifact).

    Each trial writes its artifact atomically to the config-hashed directory, so an
    interrupted job simply retrains what is missing on the next run."""
    if not kinds:
        return
    from ray import tune
    trainable = tune.with_resources(_train_trial, trial_resources(cfg))
    storage = Path(cfg.run.out_root) / cfg.run.name / "tune"
    tuner = tune.Tuner(
        trainable,
        param_space={"cfg": cfg.to_dict(), "kind": tune.grid_search(list(kinds))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"{experiment}-{int(time.time())}", storage_path=str(storage),
                                  verbose=1, failure_config=tune.FailureConfig(max_failures=1)),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} training trial(s) failed; first error: {errors[0]}")
