"""The alpha sweep without Ray: planning (attack, variant, alpha, target, restart) rows,
the attack context that runs a chunk of rows in one batched attack, and the chunk store
that makes the sweep resumable (one atomic parquet shard per finished chunk; a rerun
skips finished chunks; duplicate keys are impossible by construction and dropped on
read).  ``raymia.distributed`` spreads chunks over Ray actors.

The sweep's attack dimension (``sweep.attacks``): every row is attacked by one of

* ``whitebox``: Khosravy's generator MIA (the paper's attacker), gradients through R';
* ``eot``: the same with R''s confidence averaged over random flips, shifts and noise
  (the adaptive attacker of the defense search, ``search.eot_*``);
* ``nes``: the black-box score-based attack through an in-process oracle
  (``query_attack.budget`` queries per row);
* ``label``: the label-only attack (``query_attack.label_budget`` queries per row).

All four start each (target, restart) from the same row seed, so attacks are paired."""
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

from .config import SWEEP_ATTACKS, Config, ConfigError, alpha_grid
from .attacks.adaptive import EOTModel
from .attacks.generator_mia import generator_mia, score_latents
from .attacks.oracle import InProcessOracle
from .attacks.query import run_query_attack
from .defenses.dummy import combined_model, dummy_artifact_dir, load_dummy
from .kinds import artifact_dir
from .training import load_classifier, load_generator

KEY = ["variant", "alpha", "target", "restart"]
#: a row's key across the attacks of one sweep (each attack keeps its own chunk store)
TRIAL_KEY = ["attack"] + KEY


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
    """Every (attack, variant, α, target, restart) row of the sweep with its seed; the seed
    depends on (target, restart) only, so all attacks, variants and α share their starts."""
    alphas = alpha_grid(cfg.sweep)
    targets = resolve_targets(cfg, n_private)
    first = cfg.attack.restart_offset
    rows = [(k, v, a, t, r, row_seed(cfg, t, r)) for k in cfg.sweep.attacks for v in cfg.sweep.variants
            for r in range(first, first + cfg.attack.restarts) for t in targets for a in alphas]
    return pd.DataFrame(rows, columns=TRIAL_KEY + ["seed"])


def rows_key(cfg: Config, attack: str = "whitebox") -> str:
    """Hash of everything that determines a scored row of ``attack`` besides its own key:
    the models attacked and scored (their artifact keys), the attack's settings, and the
    combination rule.  The sweep keeps each attack's finished chunks under
    ``rows/<rows_key>/``, so a rerun after any of these changed never reuses stale rows
    (the white-box attack's key is the one the sweep had before it had other attacks)."""
    if attack not in SWEEP_ATTACKS:
        raise ConfigError(f"sweep.attacks: unknown attack {attack!r} (one of {', '.join(SWEEP_ATTACKS)})")
    d = cfg.to_dict()
    parts = {k: artifact_dir(cfg, k).name for k in ("target", "evaluator", "attacker_gan")}
    parts.update({f"dummy-{v}": dummy_artifact_dir(cfg, v).name for v in cfg.sweep.variants})
    parts.update({"attack": {k: v for k, v in d["attack"].items() if k != "batch_rows"}, "combine": d["combine"],
                  "judge": d["judge"]})
    if attack == "eot":
        parts["sweep_attack"] = {"eot": {k: d["search"][k] for k in ("eot_samples", "eot_shift", "eot_noise")}}
    elif attack in ("nes", "label"):
        # forward_batch only cuts an iteration's forward into pieces (same queries and answers)
        parts["sweep_attack"] = {attack: {k: v for k, v in d["query_attack"].items() if k != "forward_batch"}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def rows_dirs(cfg: Config, root) -> dict[str, Path]:
    """Each attack of ``sweep.attacks`` -> its chunk store directory under ``root``."""
    return {k: Path(root) / rows_key(cfg, k) for k in cfg.sweep.attacks}


def chunk_attack(chunk: pd.DataFrame) -> str:
    """The attack of a chunk's rows (``whitebox`` where the rows carry no ``attack`` column)."""
    return str(chunk["attack"].iloc[0]) if "attack" in chunk else "whitebox"


def plan_chunks(rows: pd.DataFrame, batch_rows: int) -> list[pd.DataFrame]:
    """Split rows into chunks of at most ``batch_rows`` rows of one attack and variant each;
    the chunk id is a hash of its keys, so the same plan always gives the same chunks."""
    chunks = []
    by = [c for c in ("attack", "variant") if c in rows]
    for _, g in rows.groupby(by, sort=False):
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
        return df.drop_duplicates([k for k in TRIAL_KEY if k in df], keep="last").reset_index(drop=True)


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
    """Run one chunk (one attack, one variant, each row with its own α, target and seed)
    as one batched attack; returns the rows with loss, confidence under R' and latent (and
    for the query attacks the queries answered), and the reconstructions for scoring."""
    variant, attack = chunk["variant"].iloc[0], chunk_attack(chunk)
    released, F_ = models.combined[variant], models.attacker_gen
    targets, seeds, alphas = chunk["target"].tolist(), chunk["seed"].tolist(), chunk["alpha"].tolist()
    out = chunk.copy()
    if attack in ("whitebox", "eot"):
        attacked = released
        if attack == "eot":
            s = cfg.search
            attacked = EOTModel(released, s.eot_samples, s.eot_shift, s.eot_noise, seed=int(seeds[0])).eval()
        res = generator_mia(attacked, F_, targets, seeds, alphas, iters=cfg.attack.iters,
                            lr=cfg.attack.lr, bound=cfg.attack.latent_bound, device=models.device,
                            autocast_dtype=autocast_dtype, progress=progress, fast=cfg.attack)
        latents, seconds = res.latents, res.seconds
    elif attack in ("nes", "label"):
        qa = cfg.query_attack
        oracle = InProcessOracle(released, len(chunk), n_outputs(released, F_, models.device), alphas=alphas,
                                 labels_only=attack == "label", top_k=qa.top_k or None, device=models.device)
        res = run_query_attack(attack, oracle, F_, targets, seeds, qa.budget if attack == "nes" else qa.label_budget,
                               qa, cfg.attack.latent_bound, models.device)
        latents, seconds = res.latents, res.seconds
        out["queries"] = res.queries
    else:
        raise ConfigError(f"sweep.attacks: unknown attack {attack!r} (one of {', '.join(SWEEP_ATTACKS)})")
    if attack == "whitebox":      # generator_mia already scored its latents under R' (fp32 networks)
        images, conf = res.images, res.target_conf
    else:                         # EOT's own scores average transforms; the oracle's may be masked
        t = torch.as_tensor(targets, dtype=torch.long, device=models.device)
        a = torch.as_tensor(alphas, dtype=torch.float32, device=models.device)
        images, conf, _ = score_latents(released, F_, latents.to(models.device), t, a)
    out["final_loss"] = (-torch.log(conf.clamp_min(1e-12))).cpu().numpy()
    out["target_conf"] = conf.cpu().numpy()
    out["latent"] = list(latents.cpu().numpy().astype(np.float32))
    out["attack_seconds"] = seconds / len(chunk)
    return out, images.cpu()


@torch.no_grad()
def n_outputs(model: torch.nn.Module, generator: torch.nn.Module, device) -> int:
    """Classes of a released model's confidence vector (one forward of one prior sample)."""
    z = torch.zeros(1, generator.latent_dim, device=device)
    return int(model(generator(z), torch.ones(1, device=device)).shape[1])


def scored_rows(rows: pd.DataFrame, scores: dict) -> pd.DataFrame:
    out = rows.copy()
    for k, v in scores.items():
        out[k] = v
    return out
