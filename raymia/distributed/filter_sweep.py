"""The similarity-filter sweep on Ray: simulation actors (:class:`FilterSim`) run the
sessions (units); one Tune trial per (setting, filter configuration) gathers its rows
from them and reports the detection metrics."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import ray
from ray import tune

from ..config import Config
from ..progress import line
from .runtime import cluster_cpus, cluster_gpus, init_ray
from .tune import experiment_name, run_grid


@ray.remote(num_cpus=0)
class FilterSim:
    """One simulation actor.  Holds, per setting, R_T and R_E (loaded on first use),
    computes a unit once (the rows are written atomically to ``store_dir`` and kept in
    memory), and answers later requests for any configuration of that unit from memory
    or disk.  Prints one :func:`raymia.progress.line` per unit it computes, against the
    units announced with :meth:`expect`."""

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
        self.todo: set = set()
        self.tag = f"actor {index + 1}/{n_actors}"
        self.computed = 0
        self.t0 = time.time()

    def expect(self, uids: list) -> int:
        """Announce units routed to this actor (for the progress line's total); returns
        how many of them are still to be computed."""
        self.todo.update(u for u in uids if u not in self.memo and not (self.store.dir / f"{u}.parquet").exists())
        return len(self.todo)

    def _context(self, setting: str):
        if setting not in self.ctx:
            from ..filter_sim.simulate import SimContext
            from ..runtime import pick_device
            cfg = self.cfgs[setting]
            self.ctx[setting] = SimContext(cfg, pick_device(cfg.run.device))
        return self.ctx[setting]

    def rows(self, unit: dict, uid: str, config: Optional[str] = None):
        from ..filter_sim.simulate import run_unit
        from ..filter_sim.units import Unit
        df = self.memo.get(uid)
        if df is None:
            path = self.store.dir / f"{uid}.parquet"
            if path.exists():
                from ..filter_sim.simulate import normalise_rows, stale
                df = normalise_rows(pd.read_parquet(path))
                if stale(df, unit, self.cfgs[unit["setting"]].filter_sim):
                    df = None
            if df is None:
                u = Unit(**{**unit, "bank": tuple(unit["bank"])})
                t = time.time()
                df = run_unit(self._context(u.setting), u, self.configs[u.setting])
                self.store.write(uid, df)
                self.computed += 1
                self.todo.discard(uid)
                print(line(f"filter_sweep {self.tag}", self.computed, self.computed + len(self.todo),
                           time.time() - self.t0, extra=f"{u.setting} {u.kind} label={u.label} rep={u.rep} "
                           f"noise={u.noise:g} k={u.k}: {time.time() - t:.1f}s"), flush=True)
            self.memo[uid] = df
        return df if config is None else df[df["config"] == config]


@dataclass(frozen=True)
class SimPool:
    """The running simulation actors: their names in ``namespace``."""
    names: tuple
    namespace: str

    def handles(self) -> list:
        """The actors' handles; the unit with route index ``i`` always goes to
        ``handles[i % len(handles)]``, so every trial asking for it finds it computed once."""
        return [ray.get_actor(n, namespace=self.namespace) for n in self.names]

    def expect(self, items: list) -> int:
        """Announce (route index, unit dict, uid) items to their actors (the total of
        their progress lines); returns how many are still to be computed."""
        handles = self.handles()
        per = [[uid for i, _, uid in items if i % len(handles) == j] for j in range(len(handles))]
        return sum(ray.get([h.expect.remote(u) for h, u in zip(handles, per)]))


def kill_actors(handles: list) -> None:
    for h in handles:
        ray.kill(h)


@contextlib.contextmanager
def simulation_actors(cfgs: dict, configs: dict, store_dir: Path, address: Optional[str] = None):
    """Ray started or joined and the simulation actors up: ``filter_sim.actors`` of the
    first setting (0 = one per GPU, else one per CPU), each with a GPU share when the
    cluster has GPUs.  ``cfgs``: {setting: Config}; ``configs``: {setting: {name:
    FilterParams}}.  Yields a :class:`SimPool`; the actors are killed afterwards."""
    first = next(iter(cfgs.values()))
    init_ray(first, address)
    n = first.filter_sim.actors or int(cluster_gpus()) or max(1, int(cluster_cpus()))
    namespace = f"raymia-filter-{os.getpid()}"
    cfg_dicts = {s: c.to_dict() for s, c in cfgs.items()}
    param_dicts = {s: {k: q.to_dict() for k, q in c.items()} for s, c in configs.items()}
    opts = {"namespace": namespace}
    gpus = cluster_gpus()
    if gpus:
        opts["num_gpus"] = min(1.0, gpus / n)
    names = tuple(f"filter-sim-{i}" for i in range(n))
    handles = [FilterSim.options(name=name, **opts).remote(cfg_dicts, param_dicts, str(store_dir), i, n)
               for i, name in enumerate(names)]
    try:
        yield SimPool(names, namespace)
    finally:
        kill_actors(handles)


def _filter_config_trial(config: dict) -> None:
    """One Tune trial: one (setting, filter configuration).  Its attack and regular-user
    sessions (those whose bank holds the configuration: reported and calibration
    sessions, both user protocols) run on the simulation actors (concurrently); it
    reports Eqs. 2-5, the FPR per protocol, the iterations before detection and the
    calibration sessions' numbers (:func:`raymia.filter_sim.metrics.config_metrics`)."""
    from ..filter_sim.metrics import config_metrics
    t = config["trial"]
    actors = SimPool(tuple(config["actors"]), config["namespace"]).handles()
    refs = [actors[i % len(actors)].rows.remote(u, uid, t["config"]) for i, u, uid in config["units"][t["setting"]]
            if t["config"] in u["bank"]]
    df = pd.concat(ray.get(refs), ignore_index=True)
    m = config_metrics(df)
    tune.report({"setting": t["setting"], "filter_config": t["config"], **m})


class _ConfigProgress(tune.Callback):
    """One progress line per finished (setting, configuration) trial."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.done += 1
        print(line("filter_sweep configs", self.done, self.total, time.time() - self.t0,
                   extra=f"{result['setting']} {result['filter_config']}: recall {result['recall']:.2f} "
                   f"FPR {result['fpr']:.2f} median iters before detection {result['iters_median']:.0f}"),
              flush=True)


def run_filter_sweep(cfg: Config, trials: list[dict], units: dict, pool: SimPool, storage: Path) -> list[dict]:
    """Tune grid over ``trials`` ({setting, config}); ``units[setting]`` lists
    (route index, unit dict, uid).  Returns each trial's reported metrics."""
    from ..filter_sim.metrics import METRIC_KEYS
    pool.expect([it for items in units.values() for it in items])
    grid = run_grid(_filter_config_trial, {"cpu": cfg.resources.cpus_per_trial},
                    {"trial": tune.grid_search(trials), "units": units, "actors": list(pool.names),
                     "namespace": pool.namespace},
                    experiment_name("filter_sweep"), storage, "filter sweep trial(s)",
                    callbacks=[_ConfigProgress(len(trials))])
    return [{**r.config["trial"], **{k: r.metrics[k] for k in METRIC_KEYS}} for r in grid]


def run_filter_units(units: list, pool: SimPool, label: str = "extra") -> list:
    """Run (route index, unit dict, uid) on the simulation actors; returns their rows
    (DataFrames) in order, printing progress as units finish."""
    pool.expect(units)
    handles = pool.handles()
    refs = [handles[i % len(handles)].rows.remote(u, uid) for i, u, uid in units]
    pending, t0 = list(refs), time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        print(line(f"filter_sweep {label} units", len(refs) - len(pending), len(refs), time.time() - t0), flush=True)
    return ray.get(refs)
