"""The α sweep on Ray: attack workers as Tune trials, each running its share of the
pending chunks as batched attacks and sending the reconstructions to the evaluator actor."""
from __future__ import annotations

import os
from pathlib import Path

import ray
from ray import tune

from ..config import Config, config_from_dict
from ..runtime import pick_device, set_threads
from ..sweep import (ChunkStore, attack_chunk, chunk_attack, chunk_id, load_sweep_models, plan_chunks, plan_rows,
                     scored_rows)
from .evaluator import start_evaluator
from .runtime import cluster_cpus, cluster_gpus, trial_resources, use_gpus
from .tune import experiment_name, run_grid


def _attack_trial(config: dict) -> None:
    """One Tune trial = one attack worker: runs its share of the pending chunks as
    batched attacks, sends each chunk's reconstructions to the evaluator actor, writes
    the scored chunk atomically and reports progress."""
    cfg = config_from_dict(config["cfg"])
    evaluator = ray.get_actor(config["evaluator"], namespace=config["namespace"])
    set_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    models = load_sweep_models(cfg, device)
    stores = {k: ChunkStore(d) for k, d in config["rows_dirs"].items()}
    chunks = plan_chunks(plan_rows(cfg, config["n_private"]), cfg.attack.batch_rows)
    mine = [c for i, c in enumerate(chunks) if i % config["n_workers"] == config["worker"]]
    for chunk in mine:
        cid, store = chunk_id(chunk), stores[chunk_attack(chunk)]
        if cid in store.done():
            continue
        rows, images = attack_chunk(cfg, models, chunk)
        scores = ray.get(evaluator.score.remote(images, rows["target"].tolist(), rows["variant"].iloc[0],
                                                rows["alpha"].tolist()))
        store.write(cid, scored_rows(rows, scores))
        print(ray.get(evaluator.progress.remote("alpha_sweep rows")), flush=True)
        tune.report({"chunks_done": 1})
    tune.report({"worker_done": 1})


def run_alpha_sweep(cfg: Config, rows_dirs: dict, n_private: int, total_rows: int, done_rows: int) -> dict:
    """Run every pending chunk on attack-worker Tune trials plus one evaluator actor
    (``rows_dirs``: attack -> its chunk store); returns {variant: alpha=0 floor}."""
    namespace = f"raymia-{os.getpid()}"
    name = "evaluator"
    evaluator = start_evaluator(cfg, total_rows, done_rows, name, namespace)
    if use_gpus(cfg):
        # one attack worker per GPU, holding all of it: each call batches attack.batch_rows rows
        # (4096 fill an H100, docs/benchmarks.md), so fractional sharing would only add contention
        n_workers = cfg.resources.attack_workers or max(1, int(cluster_gpus()))
        gpu = 1.0
    else:
        n_workers = cfg.resources.attack_workers or max(1, int(cluster_cpus()))
        gpu = None
    try:
        run_grid(_attack_trial, trial_resources(cfg, gpu),
                 {"cfg": cfg.to_dict(), "evaluator": name, "namespace": namespace,
                  "rows_dirs": {k: str(d) for k, d in rows_dirs.items()}, "n_private": n_private, "n_workers": n_workers, "worker": tune.grid_search(list(range(n_workers)))},
                 experiment_name("alpha_sweep"), Path(cfg.run.out_root) / cfg.run.name / "tune", "attack worker(s)",
                 max_failures=2)
        return {v: ray.get(evaluator.anchor_floor.remote(v)) for v in cfg.sweep.variants}
    finally:
        ray.kill(evaluator)
