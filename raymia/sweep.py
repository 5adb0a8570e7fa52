"""The alpha sweep without Ray: planning (variant, alpha, target, restart) rows, the
attack context that runs a chunk of rows in one batched attack, and the chunk store
that makes the sweep resumable (one atomic parquet shard per finished chunk; a rerun
skips finished chunks; duplicate keys are impossible by construction and dropped on
read).  ``raymia.distributed`` spreads chunks over Ray actors."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Config, ConfigError, alpha_grid
from .attacks.generator_mia import generator_mia
from .defenses.dummy import combined_model, dummy_artifact_dir, load_dummy
from .kinds import artifact_dir
from .training import load_classifier, load_generator

KEY = ["variant", "alpha", "target", "restart"]


def resolve_targets(cfg: Config, n_private: int) -> list[int]:
    """The attack's targets: ``attack.targets``, or every R_T class R_E also knows (all of
    them unless ``data.eval_shared_ids`` limits the shared identities)."""
    shared = cfg.data.eval_shared_ids or n_private
    t = list(cfg.attack.targets) or list(range(min(shared, n_private)))
    bad = [x for x in t if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_private]
    if bad:
        raise ConfigError(f"attack.targets: unknown target(s) {bad}; R_T has classes 0..{n_private - 1}")
    unscored = [x for x in t if x >= shared]
    if unscored:
        raise ConfigError(f"attack.targets: {unscored} are not identities of the evaluator R_E "
                          f"(data.eval_shared_ids={shared}: targets must lie in 0..{shared - 1})")
    return sorted(set(t))


def row_seed(cfg: Config, target: int, restart: int) -> int:
    """Same start for a (target, restart) at every alpha and variant (common random numbers)."""
    return cfg.run.seed * 1_000_003 + target * 1009 + restart


def plan_rows(cfg: Config, n_private: int) -> pd.DataFrame:
    alphas = alpha_grid(cfg.sweep)
    targets = resolve_targets(cfg, n_private)
    first = cfg.attack.restart_offset
    rows = [(v, a, t, r, row_seed(cfg, t, r)) for v in cfg.sweep.variants
            for r in range(first, first + cfg.attack.restarts) for t in targets for a in alphas]
    return pd.DataFrame(rows, columns=KEY + ["seed"])


def rows_key(cfg: Config) -> str:
    """Hash of everything that determines a scored row besides its own key: the models
    attacked and scored (their artifact keys), the attack, and the combination rule.  The
    sweep keeps its finished chunks under ``rows/<rows_key>/``, so a rerun after any of
    these changed never reuses stale rows."""
    d = cfg.to_dict()
    parts = {k: artifact_dir(cfg, k).name for k in ("target", "evaluator", "attacker_gan")}
    parts.update({f"dummy-{v}": dummy_artifact_dir(cfg, v).name for v in cfg.sweep.variants})
    parts.update({"attack": {k: v for k, v in d["attack"].items() if k != "batch_rows"}, "combine": d["combine"],
                  "judge": d["judge"]})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def plan_chunks(rows: pd.DataFrame, batch_rows: int) -> list[pd.DataFrame]:
    """Split rows into chunks of at most ``batch_rows`` rows of one variant each; the chunk
    id is a hash of its keys, so the same plan always gives the same chunks."""
    chunks = []
    for _, g in rows.groupby("variant", sort=False):
        for i in range(0, len(g), max(1, batch_rows)):
            chunks.append(g.iloc[i:i + batch_rows].reset_index(drop=True))
    return chunks


def chunk_id(chunk: pd.DataFrame) -> str:
    s = chunk[KEY].to_csv(index=False).encode()
    return hashlib.sha256(s).hexdigest()[:16]


class ChunkStore:
    """Finished chunks as ``<dir>/<chunk_id>.parquet``, each written atomically."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.parquet")}

    def write(self, cid: str, df: pd.DataFrame) -> None:
        tmp = self.dir / f".{cid}.{os.getpid()}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.dir / f"{cid}.parquet")

    def read_all(self) -> pd.DataFrame:
        parts = [pd.read_parquet(p) for p in sorted(self.dir.glob("*.parquet"))]
        if not parts:
            return pd.DataFrame()
        df = pd.concat(parts, ignore_index=True)
        return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


@dataclass
class SweepModels:
    combined: dict          # variant -> CombinedModel
    attacker_gen: torch.nn.Module
    dummy_meta: dict        # variant -> manifest
    anchors: dict           # variant -> anchor images (k*n, C, H, W)
    anchor_labels: dict     # variant -> R_T class of each anchor
    device: torch.device


def load_sweep_models(cfg: Config, device, variants: Optional[Sequence[str]] = None) -> SweepModels:
    rt, _ = load_classifier(artifact_dir(cfg, "target"), device)
    F_, _ = load_generator(artifact_dir(cfg, "attacker_gan"), device)
    combined, metas, anchors, labels = {}, {}, {}, {}
    for v in variants or cfg.sweep.variants:
        dm, anc, man = load_dummy(dummy_artifact_dir(cfg, v), device)
        combined[v] = combined_model(cfg, rt, dm)
        metas[v], anchors[v] = man, anc["x"]
        labels[v] = anc["y"].long() if "y" in anc else torch.arange(anc["x"].shape[0])
    return SweepModels(combined, F_, metas, anchors, labels, torch.device(device))


def attack_chunk(cfg: Config, models: SweepModels, chunk: pd.DataFrame, progress=None,
                 autocast_dtype=None) -> tuple[pd.DataFrame, torch.Tensor]:
    """Run the batched generator MIA on one chunk (one variant); returns the rows with
    loss, confidence and latent, and the reconstructions for scoring."""
    variant = chunk["variant"].iloc[0]
    res = generator_mia(models.combined[variant], models.attacker_gen, chunk["target"].tolist(),
                        chunk["seed"].tolist(), chunk["alpha"].tolist(), iters=cfg.attack.iters,
                        lr=cfg.attack.lr, bound=cfg.attack.latent_bound, device=models.device,
                        autocast_dtype=autocast_dtype, progress=progress, fast=cfg.attack)
    out = chunk.copy()
    out["final_loss"] = res.loss.numpy()
    out["target_conf"] = res.target_conf.numpy()
    out["latent"] = list(res.latents.numpy().astype(np.float32))
    out["attack_seconds"] = res.seconds / len(chunk)
    return out, res.images


def scored_rows(rows: pd.DataFrame, scores: dict) -> pd.DataFrame:
    out = rows.copy()
    for k, v in scores.items():
        out[k] = v
    return out
