"""The one Ray module of raymia: starting/joining Ray, resources per trial, and running
the training stage as concurrent Ray Tune trials.  Everything else in the library is
plain torch/numpy; ``jobs/`` and ``serve/`` build on this module."""
from __future__ import annotations

import json
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


def use_gpus(cfg: Config) -> bool:
    """Whether trials and attack workers request GPUs (``resources.use_gpu``): ``auto`` when
    the cluster has GPUs now; ``always`` also before an autoscaling cluster has started its
    GPU nodes (the request is what makes the autoscaler launch them); ``never``."""
    mode = cfg.resources.use_gpu
    return mode == "always" or (mode == "auto" and cluster_gpus() > 0)


def trial_resources(cfg: Config, gpu_fraction: Optional[float] = None) -> dict:
    """CPU and, when GPUs are used (:func:`use_gpus`), a GPU share each Tune trial requests:
    ``resources.gpus_per_trial`` (a fraction packs several small-model trials on one GPU)
    unless ``gpu_fraction`` is given."""
    res = {"cpu": cfg.resources.cpus_per_trial}
    if use_gpus(cfg):
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

def make_evaluator_actor(cfg: Config, total_rows: int, done_rows: int, name: str, namespace: str,
                         sweep_anchors: bool = True):
    """The evaluator actor: holds R_E (and the private/anchor features it compares
    against), scores reconstructions as attack workers send them, and keeps the tally
    behind the progress line.  ``sweep_anchors`` loads the anchors of the α sweep's R_dmy
    variants; the defense search registers each trial's anchors with ``add_anchors``."""
    import ray

    @ray.remote(num_cpus=0)
    class Evaluator:
        def __init__(self, cfg_dict: dict, total: int, done: int, with_sweep_anchors: bool):
            from .config import config_from_dict
            from .data import load_bundle
            from .evaluation import ReconstructionScorer
            from .sweep import load_sweep_models
            from .training import artifact_dir, load_classifier, set_threads
            c = config_from_dict(cfg_dict)
            set_threads(1)
            re_model, _ = load_classifier(artifact_dir(c, "evaluator"), "cpu")
            bundle = load_bundle(c.data)
            self.scorer = ReconstructionScorer(re_model, bundle.private_train, bundle.private_to_eval, device="cpu")
            if with_sweep_anchors:
                models = load_sweep_models(c, "cpu")
                for v, x in models.anchors.items():
                    self.scorer.add_anchors(v, x, models.anchor_labels[v])
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

        def add_anchors(self, key, images, labels):
            self.scorer.add_anchors(key, images, labels)

    return Evaluator.options(name=name, namespace=namespace).remote(cfg.to_dict(), total_rows, done_rows,
                                                                    sweep_anchors)


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
    if use_gpus(cfg):
        # one attack worker per GPU, holding all of it: each call batches attack.batch_rows rows
        # (4096 fill an H100, docs/benchmarks.md), so fractional sharing would only add contention
        n_workers = cfg.resources.attack_workers or max(1, int(cluster_gpus()))
        gpu = 1.0
    else:
        n_workers = cfg.resources.attack_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        gpu = None
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


# ----------------------------------------------------------------------------- filter sweep
# The similarity filter (raymia.filter_eval): simulation actors run the sessions (units);
# one Tune trial per (setting, filter configuration) gathers its rows and reports metrics.

def make_filter_actors(cfg_dicts: dict, configs: dict, store_dir: str, n: int, namespace: str) -> tuple[list, list]:
    """Start ``n`` named simulation actors; returns (names, handles) -- keep the handles
    alive for as long as the actors are needed.  Each actor holds, per
    setting, R_T and R_E (loaded on first use), computes a unit once (the rows are
    written atomically to ``store_dir`` and kept in memory), and answers later requests
    for any configuration of that unit from memory or disk."""
    import ray
    gpus = cluster_gpus()

    @ray.remote(num_cpus=0)
    class FilterSim:
        def __init__(self, cfg_dicts: dict, configs: dict, store_dir: str, index: int, n_actors: int):
            from .config import config_from_dict
            from .defenses.filter import FilterParams
            from .sweep import ChunkStore
            from .training import set_threads
            self.cfgs = {s: config_from_dict(d) for s, d in cfg_dicts.items()}
            self.configs = {s: {k: FilterParams(**v) for k, v in c.items()} for s, c in configs.items()}
            set_threads(max(1, self.cfgs[next(iter(self.cfgs))].run.threads or 1))
            self.store = ChunkStore(store_dir)
            self.ctx: dict = {}
            self.memo: dict = {}
            self.tag = f"actor {index + 1}/{n_actors}"
            self.computed = 0
            self.t0 = time.time()

        def _context(self, setting: str):
            if setting not in self.ctx:
                from .filter_eval import SimContext
                from .training import pick_device
                cfg = self.cfgs[setting]
                self.ctx[setting] = SimContext(cfg, pick_device(cfg.run.device))
            return self.ctx[setting]

        def rows(self, unit: dict, uid: str, config: Optional[str] = None):
            import pandas as pd
            from .filter_eval import Unit, run_unit
            df = self.memo.get(uid)
            if df is None:
                path = self.store.dir / f"{uid}.parquet"
                if path.exists():
                    df = pd.read_parquet(path)
                else:
                    u = Unit(**{**unit, "bank": tuple(unit["bank"])})
                    t = time.time()
                    df = run_unit(self._context(u.setting), u, self.configs[u.setting])
                    self.store.write(uid, df)
                    self.computed += 1
                    print(f"[filter_sweep {self.tag}] {u.setting} {u.kind} label={u.label} rep={u.rep} "
                          f"noise={u.noise:g} k={u.k}: {time.time() - t:.1f}s "
                          f"({self.computed} computed, {time.time() - self.t0:.0f}s)", flush=True)
                self.memo[uid] = df
            return df if config is None else df[df["config"] == config]

    opts = {"namespace": namespace}
    if gpus:
        opts["num_gpus"] = min(1.0, gpus / n)
    names = [f"filter-sim-{i}" for i in range(n)]
    handles = [FilterSim.options(name=name, **opts).remote(cfg_dicts, configs, store_dir, i, n)
               for i, name in enumerate(names)]
    return names, handles


def _filter_config_trial(config: dict) -> None:
    """One Tune trial: one (setting, filter configuration).  Its attack and regular-user
    sessions run on the simulation actors (concurrently); it reports Eqs. 2-5, the FPR
    and the iterations before detection."""
    import pandas as pd
    import ray
    from ray import tune
    from .filter_eval import detection_metrics
    t = config["trial"]
    actors = [ray.get_actor(n, namespace=config["namespace"]) for n in config["actors"]]
    refs = [actors[i % len(actors)].rows.remote(u, uid, t["config"]) for i, u, uid in config["units"][t["setting"]]]
    df = pd.concat(ray.get(refs), ignore_index=True)
    m = detection_metrics(df[df["kind"] == "attack"], df[df["kind"] == "user"])
    tune.report({"setting": t["setting"], "filter_config": t["config"], **m})


def run_filter_sweep(cfg: Config, trials: list[dict], units: dict, actors: list[str], namespace: str,
                     storage: Path) -> list[dict]:
    """Tune grid over ``trials`` ({setting, config}); ``units[setting]`` lists
    (route index, unit dict, uid).  Returns each trial's reported metrics."""
    from ray import tune

    total = len(trials)

    class _Progress(tune.Callback):
        def __init__(self):
            self.done, self.t0 = 0, time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.done += 1
            el = time.time() - self.t0
            print(f"[filter_sweep] config {self.done}/{total} {result['setting']} {result['filter_config']}: "
                  f"recall {result['recall']:.2f} FPR {result['fpr']:.2f} "
                  f"median iters before detection {result['iters_median']:.0f} "
                  f"(elapsed {el:.0f}s, eta {el / self.done * (total - self.done):.0f}s)", flush=True)

    trainable = tune.with_resources(_filter_config_trial, {"cpu": cfg.resources.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials), "units": units, "actors": actors, "namespace": namespace},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=f"filter_sweep-{int(time.time())}", storage_path=str(storage), verbose=0,
                                  callbacks=[_Progress()], failure_config=tune.FailureConfig(max_failures=1)),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} filter sweep trial(s) failed; first error: {errors[0]}")
    from .filter_eval import METRIC_KEYS
    return [{**r.config["trial"], **{k: r.metrics[k] for k in METRIC_KEYS}} for r in grid]


def run_filter_units(units: list, actors: list[str], namespace: str, label: str = "extra") -> list:
    """Run (route index, unit dict, uid) on the simulation actors; returns their rows
    (DataFrames) in order, printing progress as units finish."""
    import ray
    handles = [ray.get_actor(n, namespace=namespace) for n in actors]
    refs = [handles[i % len(handles)].rows.remote(u, uid) for i, u, uid in units]
    pending, t0 = list(refs), time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        done = len(refs) - len(pending)
        el = time.time() - t0
        print(f"[filter_sweep] {label} units {done}/{len(refs)} (elapsed {el:.0f}s, "
              f"eta {el / done * len(pending):.0f}s)", flush=True)
    return ray.get(refs)


# ----------------------------------------------------------------------------- defense search

_BASE_CACHE: dict = {}


def _search_base(cfg: Config, device):
    """The shared base models, loaded once per worker process (Tune reuses actors)."""
    from .search import load_base
    from .training import artifact_key
    key = (str(device), json.dumps([artifact_key(cfg, k) for k in ("target", "gan", "attacker_gan")], sort_keys=True),
           cfg.run.out_root, cfg.run.name)
    if key not in _BASE_CACHE:
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = load_base(cfg, device)
    return _BASE_CACHE[key]


def _defense_trial(config: dict) -> None:
    """One Tune trial = one defense (and seed, and attacker): trains its R_dmy, then
    attacks the released model round by round (one restart of every target at every α
    per round), scoring on the shared evaluator actor; reports the objective after every
    round with a checkpoint (R_dmy + scored rows) so a restored trial continues."""
    import tempfile

    import pandas as pd
    import ray
    from ray import tune
    from safetensors.torch import load_file, save_file
    from .search import DefenseEvaluator, trial_params
    from .training import pick_device, set_threads
    cfg = config_from_dict(config["cfg"])
    set_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    base = _search_base(cfg, device)
    evaluator = ray.get_actor(config["evaluator"], namespace=config["namespace"])
    spec = config.get("check") or config          # the final check nests (defense, params, seed, adaptive)
    params = trial_params(spec)
    key = tune.get_context().get_trial_id()
    state, rows = None, []
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            t = load_file(str(Path(d) / "dummy.safetensors"))
            state = {"model": {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")},
                     "anchor_x": t["anchor_x"], "anchor_y": t["anchor_y"]}
            rows = [pd.read_parquet(Path(d) / "rows.parquet")]
    ev = DefenseEvaluator(base, params, spec["seed"], key, bool(spec.get("adaptive", False)),
                          score=lambda imgs, t, k, a: ray.get(evaluator.score.remote(imgs, t, k, a)),
                          add_anchors=lambda k, x, y: ray.get(evaluator.add_anchors.remote(k, x, y)),
                          dummy_state=state)
    done = 0 if not rows else int(rows[0]["restart"].max()) + 1
    ev.rows = rows
    for r in range(done, ev.rounds):
        ev.run_round(r)
        with tempfile.TemporaryDirectory() as d:
            st = ev.dummy_state()
            save_file({**{f"model.{k}": v.detach().cpu().contiguous() for k, v in st["model"].items()},
                       "anchor_x": st["anchor_x"].contiguous(), "anchor_y": st["anchor_y"].contiguous()},
                      str(Path(d) / "dummy.safetensors"))
            pd.concat(ev.rows, ignore_index=True).drop(columns=["latent"]).to_parquet(Path(d) / "rows.parquet")
            res = ev.result()
            print(f"[defense_search] trial {key} round {r + 1}/{ev.rounds}: objective {res['objective']:.3f} "
                  f"(best alpha {res['best_alpha']})", flush=True)
            tune.report({"round": r + 1, **res}, checkpoint=tune.Checkpoint.from_directory(d))


def run_defense_trials(cfg: Config, param_space: dict, out_dir: Path, name: str, evaluator_name: str,
                       namespace: str, num_samples: int = 1, search: bool = False, points: Optional[list] = None):
    """Run defense trials on Tune (resuming ``out_dir/tune/name`` if it exists).
    ``search=True`` adds the configured searcher (Optuna TPE, which first evaluates
    ``points``, or random) and ASHA, which stops a defense after its first rounds when its
    objective is among the worse half."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    storage = Path(out_dir) / "tune"
    gpu = cfg.resources.gpus_per_trial if cluster_gpus() > 0 else None
    trainable = tune.with_resources(_defense_trial, trial_resources(cfg, gpu))
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        print(f"[defense_search] resuming {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space={**param_space, "evaluator": evaluator_name, "namespace": namespace})
        return tuner.fit()
    search_alg = scheduler = None
    if search:
        if cfg.search.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch(seed=cfg.run.seed, points_to_evaluate=points or None)
        if cfg.search.max_concurrent and search_alg is not None:
            search_alg = ConcurrencyLimiter(search_alg, cfg.search.max_concurrent)
        scheduler = ASHAScheduler(time_attr="round", max_t=cfg.attack.restarts, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        trainable,
        param_space={**param_space, "evaluator": evaluator_name, "namespace": namespace},
        tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, reuse_actors=True,
                                    max_concurrent_trials=cfg.search.max_concurrent or None),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()
