"""Process runtime: device choice, seeding, torch threads, and where results go.

Ray-free: the pipelines, the library and a GPU box without Ray all use these."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={spec!r} but CUDA is not available on this machine (use auto or cpu)")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


def in_ray_job() -> bool:
    """True when this process is the driver of a ``ray job submit`` job (its working
    directory is a temporary copy that Ray deletes, so results must go elsewhere)."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID")) or "runtime_resources" in os.getcwd()


def resolve_out_root(cfg) -> Path:
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


def out_dir(cfg, out, stage: str) -> Path:
    """A pipeline's output directory: ``out`` if given, else ``<out_root>/<run.name>/<stage>``."""
    root = resolve_out_root(cfg)
    return Path(out).expanduser().resolve() if out else root / cfg.run.name / stage
