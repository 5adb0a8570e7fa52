"""Starting or joining Ray, and what each trial or worker asks for."""
from __future__ import annotations

import os
from typing import Optional

import ray

from ..config import Config
from ..runtime import in_ray_job


def init_ray(cfg: Optional[Config] = None, address: Optional[str] = None) -> None:
    """Join a running cluster when one is named (``--address``, ``RAY_ADDRESS``, or we are a
    submitted job), otherwise start a private local Ray instance."""
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
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


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
