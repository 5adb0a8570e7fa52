"""The defense search on Ray: one Tune trial per defense (and seed, and attacker), the
search space, Optuna TPE proposing and ASHA stopping hopeless defenses after a round;
every trial checkpoints its R_dmy and scored rows after each round, so a rerun resumes."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from safetensors.torch import load_file, save_file

from ..config import Config, config_from_dict
from ..kinds import kind
from ..runtime import pick_device, set_threads
from ..search import SUMMARY_COLS, DefenseEvaluator, baselines, load_base, trial_params
from .evaluator import start_evaluator
from .runtime import cluster_gpus, init_ray, trial_resources
from .tune import make_tuner


def search_space(cfg: Config) -> dict:
    """The Tune search space built from ``cfg.search`` (Ray's sampling primitives)."""
    s = cfg.search
    return {
        "variant": "calibrated",
        "sigma_tilde2": tune.loguniform(*s.sigma_tilde2_log),
        "sigma2": tune.uniform(*s.sigma2),
        "m": tune.randint(int(s.m[0]), int(s.m[1]) + 1),
        "calib_weight": tune.loguniform(*s.calib_weight_log),
        "epochs": tune.randint(int(s.epochs[0]), int(s.epochs[1]) + 1),
        "anchors_per_class": tune.randint(int(s.anchors_per_class[0]), int(s.anchors_per_class[1]) + 1),
        "anchor_choice": tune.choice(list(s.anchor_choices)),
        "rule": tune.choice(list(s.rules)),
        "gate_tau": tune.uniform(*s.gate_tau),
    }


_BASE_CACHE: dict = {}


def _search_base(cfg: Config, device):
    """The shared base models, loaded once per worker process (Tune reuses actors)."""
    key = (str(device), json.dumps([kind(k).key(cfg) for k in ("target", "gan", "attacker_gan")], sort_keys=True),
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
    cfg = config_from_dict(config["cfg"])
    set_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    base = _search_base(cfg, device)
    evaluator = ray.get_actor(config["evaluator"], namespace=config["namespace"])
    spec = config.get("check") or config          # the final check nests (defense, params, seed, attack)
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
    ev = DefenseEvaluator(base, params, spec["seed"], key, spec.get("attack", "whitebox"),
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
    storage = Path(out_dir) / "tune"
    gpu = cfg.resources.gpus_per_trial if cluster_gpus() > 0 else None
    resources = trial_resources(cfg, gpu)
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        print(f"[defense_search] resuming {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), tune.with_resources(_defense_trial, resources),
                                   resume_unfinished=True, resume_errored=True,
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
    tuner = make_tuner(_defense_trial, resources, {**param_space, "evaluator": evaluator_name, "namespace": namespace},
                       name, storage,
                       tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=search_alg,
                                                   scheduler=scheduler, num_samples=num_samples, reuse_actors=True,
                                                   max_concurrent_trials=cfg.search.max_concurrent or None))
    return tuner.fit()


# ----------------------------------------------------------------------------- the pipeline's Ray steps

@contextlib.contextmanager
def evaluator_session(cfg: Config, address: Optional[str] = None):
    """Ray started or joined, the evaluator actor up for the search's trials; yields the
    actors' namespace and kills the evaluator afterwards."""
    init_ray(cfg, address)
    namespace = f"raymia-search-{os.getpid()}"
    evaluator = start_evaluator(cfg, 0, 0, "evaluator", namespace, sweep_anchors=False)
    try:
        yield namespace
    finally:
        ray.kill(evaluator)


def trials_frame(grid, kind: str) -> pd.DataFrame:
    rows = []
    for r in grid:
        if r.metrics is None or "objective" not in r.metrics:
            continue
        c = r.config
        params = trial_params(c)
        rows.append({"kind": kind, "trial_id": r.metrics.get("trial_id"), "defense": c.get("defense", "search"),
                     "seed": c.get("seed"), "attack": c.get("attack", "whitebox"),
                     **{f"p_{k}": v for k, v in params.items()},
                     **{k: v for k, v in r.metrics.items() if k == "round" or k in SUMMARY_COLS or "@" in k}})
    return pd.DataFrame(rows)


def run_search(cfg: Config, out: Path, namespace: str) -> pd.DataFrame:
    common = {"cfg": cfg.to_dict(), "attack": "whitebox", "seed": cfg.run.seed}
    print(f"[defense_search] searching {cfg.search.num_samples} defenses over alphas {cfg.search.alphas}", flush=True)
    space = search_space(cfg)
    searchable = [k for k, v in space.items() if hasattr(v, "sample")]
    start = {k: v for k, v in baselines(cfg)["calibrated"].items() if k in searchable}   # TPE starts from it
    points = [start] if all(_inside(space[k], v) for k, v in start.items()) else []
    grid = run_defense_trials(cfg, {**common, **space}, out, "search", "evaluator", namespace,
                              num_samples=cfg.search.num_samples, search=True, points=points)
    trials = trials_frame(grid, "search")
    if trials.empty:
        raise RuntimeError("no search trial finished a round; see the Tune log under " + str(out / "tune"))
    return trials


def _inside(domain, value) -> bool:
    """Whether ``value`` lies in a Tune domain (categorical, or numeric [lower, upper])."""
    if hasattr(domain, "categories"):
        return value in domain.categories
    return domain.lower <= value <= domain.upper


def run_check(cfg: Config, out: Path, combos: list, namespace: str, check_row) -> pd.DataFrame:
    """The multi-seed check as a Tune grid over ``combos``; ``check_row(combo, metrics)`` makes each row."""
    grid = run_defense_trials(cfg, {"cfg": cfg.to_dict(), "check": tune.grid_search(combos)}, out, "check",
                              "evaluator", namespace)
    return pd.DataFrame([check_row(r.config["check"], r.metrics) for r in grid
                         if r.metrics and "objective" in r.metrics])
