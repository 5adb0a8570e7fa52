"""Defense search without Ray: the search space, one defense evaluated with the real
attack in the loop, the objective, and the Pareto front.

A *defense* is a dummy-model configuration (R_dmy's training: variant, sigma^2,
sigma_tilde^2, m, calibration weight, epochs, anchors per class, anchor choice) plus the
rule that combines R_T and R_dmy (``combine`` section).  :class:`DefenseEvaluator` trains
R_dmy for it against the fixed base artifacts (R_T, G, F, R_E), then attacks the released
model over the search's alpha grid in rounds (round r = restart r of every target at
every alpha, one batched attack call), scoring each round with R_E.  After each round the
objective can be read off; ``raymia.distributed`` reports it to Ray Tune, whose ASHA
scheduler stops hopeless defenses after their first round.

Objective (lower is better): per-trial top-5 MIA success at the best alpha whose accuracy
stays >= accuracy(R_T) - ``sweep.accuracy_tolerance``; 1 + accuracy shortfall if no alpha
qualifies (so such defenses rank last, ordered by how close they came).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from .config import SWEEP_ATTACKS, Config, ConfigError, SweepCfg, alpha_grid, apply_override
from .data import Bundle, load_bundle
from .defenses.dummy import combined_model, train_dummy
from .evaluation import accuracy_rows, judge_names, make_scorer, recommend, summarize
from .sweep import TRIAL_KEY, SweepModels, attack_chunk, resolve_targets, row_seed, scored_rows
from .kinds import artifact_dir, dummy_kind
from .training import load_classifier, load_generator

#: what the search varies; each maps to a config key
PARAM_KEYS = {
    "variant": "dummy.variant", "sigma2": "dummy.sigma2", "sigma_tilde2": "dummy.sigma_tilde2", "m": "dummy.m",
    "calib_weight": "dummy.calib_weight", "epochs": "dummy.epochs", "anchors_per_class": "dummy.anchors_per_class",
    "anchor_choice": "dummy.anchor_choice", "rule": "combine.rule", "gate_tau": "combine.gate_tau",
}


#: the per-defense result columns kept in the search's and the check's tables
SUMMARY_COLS = ["objective", "feasible", "best_alpha", "best_mia_success_top5", "best_ci_low", "best_ci_high",
                "best_mia_best_restart_top5", "best_accuracy", "acc_rt", "dmy_top_conf_real"]


def trial_params(spec: dict) -> dict:
    """The defense parameters of a Tune trial's config: its ``params`` entry (the check),
    or the searched keys (the search)."""
    return dict(spec.get("params") or {k: spec[k] for k in PARAM_KEYS if k in spec})


def baselines(cfg: Config) -> dict[str, dict]:
    """The paper's recipe and the calibrated variant at the config's own values."""
    d = cfg.dummy
    common = {"sigma2": d.sigma2, "sigma_tilde2": d.sigma_tilde2, "m": d.m, "epochs": d.epochs,
              "anchors_per_class": 1, "anchor_choice": "random", "rule": "linear", "gate_tau": cfg.combine.gate_tau,
              "calib_weight": d.calib_weight}
    return {"paper": {**common, "variant": "paper"}, "calibrated": {**common, "variant": "calibrated"}}


def apply_params(cfg: Config, params: dict) -> Config:
    """A copy of ``cfg`` with the defense ``params`` set (unknown params are an error)."""
    out = copy.deepcopy(cfg)
    for k, v in params.items():
        if k not in PARAM_KEYS:
            raise KeyError(f"unknown defense parameter {k!r}; known: {', '.join(PARAM_KEYS)}")
        apply_override(out, PARAM_KEYS[k], v.item() if hasattr(v, "item") else v)   # numpy scalars from Tune
    return out


def objective(summary: pd.DataFrame, acc_rt: float, tolerance: float, rule: str = "point") -> dict:
    """Best alpha of one defense (one variant in ``summary``) and the search objective."""
    rec = next(iter(recommend(summary, acc_rt, tolerance, rule).values()))
    if rec.get("alpha") is None:
        shortfall = float(acc_rt - tolerance - summary["accuracy"].max())
        return {"objective": 1.0 + shortfall, "best_alpha": float("nan"), "feasible": False}
    return {"objective": float(rec["mia_success_top5"]), "best_alpha": float(rec["alpha"]), "feasible": True,
            **{f"best_{k}": float(rec[k]) for k in ("mia_success_top5", "ci_low", "ci_high", "mia_best_restart_top5",
                                                    "best_ci_low", "best_ci_high", "mia_success_top1", "accuracy")}}


def pareto_front(points: pd.DataFrame, x: str = "mia_success_top5", y: str = "accuracy") -> pd.DataFrame:
    """Rows not dominated by another (lower x and higher y), sorted by x."""
    pts = points.sort_values([x, y], ascending=[True, False])
    keep, best_y = [], -np.inf
    for i, row in pts.iterrows():
        if row[y] > best_y:
            keep.append(i)
            best_y = row[y]
    return points.loc[keep].sort_values(x)


@dataclass
class Base:
    """What every defense shares: the data and the frozen base models."""
    cfg: Config
    bundle: Bundle
    rt: torch.nn.Module
    G: torch.nn.Module
    F: torch.nn.Module
    acc_rt: float
    device: torch.device


def load_base(cfg: Config, device) -> Base:
    from .artifacts import read_manifest
    bundle = load_bundle(cfg.data)
    rt, _ = load_classifier(artifact_dir(cfg, "target"), device)
    G, _ = load_generator(artifact_dir(cfg, "gan"), device)
    F_, _ = load_generator(artifact_dir(cfg, "attacker_gan"), device)
    acc = read_manifest(artifact_dir(cfg, "target"))["metrics"]["test_acc"]
    return Base(cfg, bundle, rt, G, F_, float(acc), torch.device(device))


class DefenseEvaluator:
    """One defense against the real attack, round by round.

    ``score(images, targets, key, alphas)`` scores reconstructions (a
    :class:`ReconstructionScorer`'s ``score`` or the evaluator actor's); ``add_anchors``
    registers this defense's anchors with the scorer under ``key``."""

    def __init__(self, base: Base, params: dict, seed: int, key: str, attack: str = "whitebox",
                 score: Optional[Callable] = None, add_anchors: Optional[Callable] = None,
                 progress=None, dummy_state: Optional[dict] = None):
        if attack not in SWEEP_ATTACKS:
            raise ConfigError(f"search.check_attacks: unknown attack {attack!r} (one of {', '.join(SWEEP_ATTACKS)})")
        self.base, self.params, self.seed, self.key, self.attack = base, dict(params), int(seed), key, attack
        self.cfg = apply_params(base.cfg, params)
        self.cfg.run.seed = self.seed
        cfg = self.cfg
        variant = cfg.dummy.variant
        if dummy_state is None:
            dm, ds, metrics = train_dummy(cfg, base.G, base.bundle, variant, base.device,
                                          dummy_kind(variant).seed(self.seed), progress, target=base.rt)
            self.anchors = {"x": ds["anchor_x"], "y": ds["anchor_y"]}
        else:
            from .models import build_classifier, freeze
            b = base.bundle
            dm = build_classifier(cfg.target, b.channels, b.private_train.x.shape[-1], b.n_private)
            dm.load_state_dict(dummy_state["model"])
            dm = freeze(dm.to(base.device))
            self.anchors = {"x": dummy_state["anchor_x"], "y": dummy_state["anchor_y"].long()}
            metrics = dummy_state.get("metrics", {})
        self.dummy, self.dummy_metrics = dm, dict(metrics)
        self.released = combined_model(cfg, base.rt, dm)
        self.models = SweepModels({key: self.released}, base.F, {}, {key: self.anchors["x"]}, {key: self.anchors["y"]},
                                  base.device)
        self.alphas = alpha_grid(SweepCfg(alphas=list(cfg.search.alphas)))
        self.targets = resolve_targets(cfg, base.bundle.n_private)
        self.accuracy = pd.DataFrame([{"variant": key, **r} for r in accuracy_rows(
            self.released, base.bundle.private_test, self.alphas, base.device, cfg.sweep.bootstrap, self.seed)])
        if score is None:
            scorer = make_scorer(base.cfg, base.bundle, base.device)
            score, add_anchors = (lambda imgs, t, key, a: scorer.score(imgs, t, key)), scorer.add_anchors
        add_anchors(key, self.anchors["x"], self.anchors["y"])
        self._score = score
        self.rows: list[pd.DataFrame] = []

    def dummy_state(self) -> dict:
        return {"model": self.dummy.state_dict(), "anchor_x": self.anchors["x"], "anchor_y": self.anchors["y"]}

    @property
    def rounds(self) -> int:
        return self.cfg.attack.restarts

    def run_round(self, r: int) -> pd.DataFrame:
        """Restart ``r`` of every target at every alpha, in one batched attack (``self.attack``:
        any attack of the sweep's attack dimension, :func:`raymia.sweep.attack_chunk`)."""
        rows = [(self.attack, self.key, a, t, r, row_seed(self.cfg, t, r)) for t in self.targets for a in self.alphas]
        chunk = pd.DataFrame(rows, columns=TRIAL_KEY + ["seed"])
        out, images = attack_chunk(self.cfg, self.models, chunk)
        scores = self._score(images, out["target"].tolist(), self.key, out["alpha"].tolist())
        scored = scored_rows(out, scores)
        self.rows.append(scored)
        return scored

    def summary(self) -> pd.DataFrame:
        trials = pd.concat(self.rows, ignore_index=True)
        return summarize(trials, self.accuracy, self.cfg.sweep.bootstrap, self.seed)

    def result(self) -> dict:
        s = self.summary()
        out = objective(s, self.base.acc_rt, self.cfg.sweep.accuracy_tolerance, self.cfg.sweep.accuracy_rule)
        out.update({"rounds_done": len(self.rows), "acc_rt": self.base.acc_rt,
                    "dmy_top_conf_real": self.dummy_metrics.get("dmy_top_conf_real", float("nan"))})
        trials = pd.concat(self.rows, ignore_index=True)
        judges = judge_names(trials)
        for row in s.itertuples():
            a = f"{row.alpha:g}"
            out[f"mia_top5@{a}"] = float(row.mia_success_top5)
            out[f"mia_best@{a}"] = float(row.mia_best_restart_top5)
            out[f"acc@{a}"] = float(row.accuracy)
            for j in judges:
                out[f"{j}_top5@{a}"] = float(getattr(row, f"{j}_top5"))
            # per-target success (R_E; judges), for hierarchical CIs over seeds and targets
            g = trials[trials["alpha"] == row.alpha].groupby("target")
            out[f"targets@{a}"] = [float(v) for v in g["success_top5"].mean()]
            for j in judges:
                out[f"{j}_targets@{a}"] = [float(v) for v in g[f"{j}_top5"].mean()]
        return out
