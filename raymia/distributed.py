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
    if kind.startswith("dummy-"):
        from .defenses.dummy import train_dummy_artifact
        out = train_dummy_artifact(cfg, kind[len("dummy-"):], progress=tune_progress(kind))
    else:
        out = train_artifact(cfg, kind, progress=tune_progress(kind))
    man = read_manifest(out)
    tune.report({"step": 1, "total": 1, "fraction": 1.0, "done": 1, "artifact": str(out),
                 **{f"m_{k}": v for k, v in man.get("metrics", {}).items() if isinstance(v, (int, float))}})


def run_training(cfg: Config, kinds: list[str], experiment: str = "train") -> None:
    """Train the given artifacts as concurrent Tune trials (one trial per artifact; kinds
    are the base kinds of :data:`raymia.training.KIND_SECTIONS` or ``dummy-<variant>``).

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


# ----------------------------------------------------------------------------- alpha sweep

def make_evaluator_actor(cfg: Config, total_rows: int, done_rows: int, name: str, namespace: str):
    """The evaluator actor: holds R_E (and the private/anchor features it compares
    against), scores reconstructions as attack workers send them, and keeps the tally
    behind the sweep's progress line."""
    import ray

    @ray.remote(num_cpus=0)
    class Evaluator:
        def __init__(self, cfg_dict: dict, total: int, done: int):
            import torch
            from .config import config_from_dict
            from .data import load_bundle
            from .evaluation import ReconstructionScorer
            from .sweep import load_sweep_models
            from .training import artifact_dir, load_classifier, set_threads
            c = config_from_dict(cfg_dict)
            set_threads(1)
            re_model, _ = load_classifier(artifact_dir(c, "evaluator"), "cpu")
            bundle = load_bundle(c.data)
            models = load_sweep_models(c, "cpu")
            self.scorer = ReconstructionScorer(re_model, bundle.private_train, bundle.private_to_eval,
                                               models.anchors, "cpu", anchor_labels=models.anchor_labels)
            self.total, self.done, self.start_done = total, done, done
            self.t0 = time.time()
            self.hits: dict = {}

        def score(self, images, targets, variant, alphas):
            out = self.scorer.score(images, targets, variant)
            self.done += len(targets)
            for a, h in zip(alphas, out["success_top5"]):
                k = (variant, float(a))
                n, s = self.hits.get(k, (0, 0))
                self.hits[k] = (n + 1, s + int(h))
            return out

        def progress(self) -> dict:
            el = time.time() - self.t0
            new = self.done - self.start_done
            eta = el / new * (self.total - self.done) if new else float("nan")
            return {"done": self.done, "total": self.total, "elapsed_s": el, "eta_s": eta}

        def anchor_floor(self, variant):
            return self.scorer.anchor_floor(variant)

    return Evaluator.options(name=name, namespace=namespace).remote(cfg.to_dict(), total_rows, done_rows)


def _attack_trial(config: dict) -> None:
    """One Tune trial = one attack worker: runs its share of the pending chunks as
    batched attacks, sends each chunk's reconstructions to the evaluator actor, writes
    the scored chunk atomically and reports progress."""
    import ray
    from ray import tune
    from .sweep import ChunkStore, attack_chunk, chunk_id, load_sweep_models, plan_chunks, plan_rows, scored_rows
    from .training import pick_device, set_threads
    cfg = config_from_dict(config["cfg"])
    evaluator = ray.get_actor(config["evaluator"], namespace=config["namespace"])
    set_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    models = load_sweep_models(cfg, device)
    store = ChunkStore(config["rows_dir"])
    chunks = plan_chunks(plan_rows(cfg, config["n_private"]), cfg.attack.batch_rows)
    mine = [c for i, c in enumerate(chunks) if i % config["n_workers"] == config["worker"]]
    for chunk in mine:
        cid = chunk_id(chunk)
        if cid in store.done():
            continue
        rows, images = attack_chunk(cfg, models, chunk)
        scores = ray.get(evaluator.score.remote(images, rows["target"].tolist(), rows["variant"].iloc[0],
                                                rows["alpha"].tolist()))
        store.write(cid, scored_rows(rows, scores))
        p = ray.get(evaluator.progress.remote())
        print(f"[alpha_sweep] rows {p['done']}/{p['total']} ({100 * p['done'] / p['total']:.0f}%) "
              f"elapsed {p['elapsed_s']:.0f}s eta {p['eta_s']:.0f}s", flush=True)
        tune.report({"rows_done": p["done"], "rows_total": p["total"], "eta_s": p["eta_s"]})
    tune.report({"rows_done": -1, "worker_done": 1})


def run_alpha_sweep(cfg: Config, rows_dir: Path, n_private: int, total_rows: int, done_rows: int) -> dict:
    """Run every pending chunk on attack-worker Tune trials plus one evaluator actor;
    returns {variant: alpha=0 floor}."""
    import ray
    from ray import tune
    namespace = f"raymia-{os.getpid()}"
    name = "evaluator"
    evaluator = make_evaluator_actor(cfg, total_rows, done_rows, name, namespace)
    n_workers = cfg.resources.attack_workers or int(cluster_gpus()) or max(1, int(ray.cluster_resources().get("CPU", 1)))
    gpu = 1.0 if cluster_gpus() > 0 else None
    trainable = tune.with_resources(_attack_trial, trial_resources(cfg, gpu))
    tuner = tune.Tuner(
        trainable,
        param_space={"cfg": cfg.to_dict(), "evaluator": name, "namespace": namespace, "rows_dir": str(rows_dir),
                     "n_private": n_private, "n_workers": n_workers, "worker": tune.grid_search(list(range(n_workers)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"alpha_sweep-{int(time.time())}",
                                  storage_path=str(Path(cfg.run.out_root) / cfg.run.name / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    grid = tuner.fit()
    floors = {v: ray.get(evaluator.anchor_floor.remote(v)) for v in cfg.sweep.variants}
    ray.kill(evaluator)
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} attack worker(s) failed; first error: {errors[0]}")
    return floors
