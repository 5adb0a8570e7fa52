"""The similarity-filter sweep on Ray: simulation actors run the sessions (units); one
Tune trial per (setting, filter configuration) gathers its rows and reports metrics."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import pandas as pd
import ray
from ray import tune

from ..config import Config
from .runtime import cluster_gpus
from .tune import experiment_name, run_grid


def make_filter_actors(cfg_dicts: dict, configs: dict, store_dir: str, n: int, namespace: str) -> tuple[list, list]:
    """Start ``n`` named simulation actors; returns (names, handles) -- keep the handles
    alive for as long as the actors are needed.  Each actor holds, per
    setting, R_T and R_E (loaded on first use), computes a unit once (the rows are
    written atomically to ``store_dir`` and kept in memory), and answers later requests
    for any configuration of that unit from memory or disk."""
    gpus = cluster_gpus()

    @ray.remote(num_cpus=0)
    class FilterSim:
        def __init__(self, cfg_dicts: dict, configs: dict, store_dir: str, index: int, n_actors: int):
            from ..config import config_from_dict
            from ..defenses.filter import FilterParams
            from ..runtime import set_threads
            from ..sweep import ChunkStore
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
                from ..filter_eval import SimContext
                from ..runtime import pick_device
                cfg = self.cfgs[setting]
                self.ctx[setting] = SimContext(cfg, pick_device(cfg.run.device))
            return self.ctx[setting]

        def rows(self, unit: dict, uid: str, config: Optional[str] = None):
            from ..filter_eval import Unit, run_unit
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
    from ..filter_eval import detection_metrics
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
    from ..filter_eval import METRIC_KEYS
    return [{**r.config["trial"], **{k: r.metrics[k] for k in METRIC_KEYS}} for r in grid]


def run_filter_units(units: list, actors: list[str], namespace: str, label: str = "extra") -> list:
    """Run (route index, unit dict, uid) on the simulation actors; returns their rows
    (DataFrames) in order, printing progress as units finish."""
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


