"""Evaluation of model-inversion results and of the released model.

* :class:`ReconstructionScorer` (what the evaluator actor holds): R_E's top-1/top-5
  decision for each reconstruction (the paper's success criterion), R_E's rank of the
  target, and — beyond the paper — the cosine distance in R_E's penultimate features
  to the nearest private training image of the target and to the target's synthetic
  anchor, which shows where the attack was led.
* per-alpha summaries with a bootstrap 95% CI over targets, accuracy of R' at every
  alpha from one forward pass, and the alpha recommendation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .data import Split


@torch.no_grad()
def _embed(model, x: torch.Tensor, device, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, x.shape[0], batch):
        e = model.embed(x[i:i + batch].to(device))
        feats.append(F.normalize(e.float(), dim=1).cpu())
        logits.append(model.head(e).float().cpu())
    return torch.cat(feats), torch.cat(logits)


class ReconstructionScorer:
    """Scores reconstructions with the evaluation model R_E.

    ``private`` holds R_T's training images (labels = R_T classes); ``private_to_eval``
    maps R_T classes to R_E classes; ``anchors`` maps a variant (or any key) to its
    synthetic anchor images and ``anchor_labels`` to their R_T classes (default: row i =
    anchor of class i)."""

    def __init__(self, evaluator, private: Split, private_to_eval: torch.Tensor,
                 anchors: Optional[dict] = None, device="cpu", k: int = 5, anchor_labels: Optional[dict] = None,
                 judges: Optional[dict] = None):
        self.model, self.device, self.k = evaluator, device, k
        self.judges = dict(judges or {})        # name -> raymia.judges.Judge over R_E's identities
        self.p2e = private_to_eval.long()
        self.private_feats, _ = _embed(evaluator, private.x, device)
        self.private_y = private.y.long()
        self.anchor_feats, self.anchor_logits, self.anchor_y = {}, {}, {}
        for key, x in (anchors or {}).items():
            self.add_anchors(key, x, (anchor_labels or {}).get(key))

    def add_anchors(self, key, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Register a defense's synthetic anchors under ``key`` (for distances and the floor)."""
        self.anchor_feats[key], self.anchor_logits[key] = _embed(self.model, images, self.device)
        self.anchor_y[key] = torch.arange(images.shape[0]) if labels is None else torch.as_tensor(labels).long()

    def score(self, images: torch.Tensor, targets: Sequence[int], variant: Optional[str] = None) -> dict:
        t = torch.as_tensor(list(targets), dtype=torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.p2e.numel()):
            raise ValueError(f"target outside R_T's classes 0..{self.p2e.numel() - 1}")
        if t.numel() and bool((self.p2e[t] < 0).any()):
            raise ValueError(f"target(s) {sorted(set(t[self.p2e[t] < 0].tolist()))} are not classes of the "
                             "evaluator R_E (only shared identities can be scored)")
        feats, logits = _embed(self.model, images, self.device)
        et = self.p2e[t]
        true_logit = logits.gather(1, et[:, None])
        rank = (logits > true_logit).sum(1) + 1
        sims = feats @ self.private_feats.T                             # (R, N_private)
        same = (self.private_y[None, :] == t[:, None])
        dist_private = 1.0 - sims.masked_fill(~same, -2.0).max(1).values
        out = {"eval_rank": rank.numpy(), "success_top1": (rank <= 1).numpy(),
               "success_top5": (rank <= self.k).numpy(),
               "eval_conf": F.softmax(logits, 1).gather(1, et[:, None])[:, 0].numpy(),
               "dist_private": dist_private.numpy()}
        if variant in self.anchor_feats:          # nearest anchor of the target's class
            sims_a = feats @ self.anchor_feats[variant].T
            own = self.anchor_y[variant][None, :] == t[:, None]
            out["dist_anchor"] = (1.0 - sims_a.masked_fill(~own, -2.0).max(1).values).numpy()
        else:
            out["dist_anchor"] = np.full(t.numel(), np.nan)
        for judge in self.judges.values():       # the independent judges' verdicts, same identities
            out.update(judge.judge(images, et.tolist()))
        return out

    def anchor_floor(self, variant: str) -> float:
        """alpha = 0 floor: how often R_E puts an anchor's own class in its top-k (the
        attack's success if it found the anchor exactly)."""
        shared = self.p2e[self.anchor_y[variant]] >= 0          # anchors of classes R_E knows
        logits = self.anchor_logits[variant][shared]
        et = self.p2e[self.anchor_y[variant][shared]]
        rank = (logits > logits.gather(1, et[:, None])).sum(1) + 1
        return float((rank <= self.k).float().mean())


def make_scorer(cfg, bundle, device, anchors: Optional[dict] = None, anchor_labels: Optional[dict] = None,
                judges: bool = True):
    """R_E (the ``evaluator`` artifact of ``cfg``) as a :class:`ReconstructionScorer` of
    ``bundle``'s private set, with optional anchors per key and, with ``judges``, the
    independent judges of ``cfg.judge`` (:mod:`raymia.judges`)."""
    from .judges import build_judges
    from .kinds import artifact_dir
    from .training import load_classifier
    re_model, _ = load_classifier(artifact_dir(cfg, "evaluator"), device)
    return ReconstructionScorer(re_model, bundle.private_train, bundle.private_to_eval, anchors, device,
                                anchor_labels=anchor_labels, judges=build_judges(cfg, bundle) if judges else None)


def bootstrap_ci(per_target: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over targets (targets resampled)."""
    v = np.asarray(per_target, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired units (targets) and its percentile bootstrap CI,
    resampling the pairs together (the same targets, anchors, restarts and seeds)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same shape")
    d = b - a
    lo, hi = bootstrap_ci(d, n_boot, seed, level)
    return float(d.mean()) if d.size else float("nan"), lo, hi


def hierarchical_bootstrap(per_seed: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """Estimate and CI of a success rate measured with several seeds: resample the seeds,
    then the targets within each resampled seed; the statistic is the mean over seeds of
    the mean over targets.  ``per_seed[i]`` holds seed i's per-target values."""
    groups = [np.asarray(g, dtype=float) for g in per_seed if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    est = float(np.mean([g.mean() for g in groups]))
    stats = np.empty(n_boot)
    for i in range(n_boot):
        picked = rng.integers(0, len(groups), len(groups))
        stats[i] = np.mean([groups[j][rng.integers(0, groups[j].size, groups[j].size)].mean() for j in picked])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return est, float(lo), float(hi)


def paired_differences(trials: pd.DataFrame, variants: Sequence[str], judges: Sequence[str],
                       n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Second variant minus first, per α and judge (R_E = ``re``): the mean difference in
    per-target top-5 success over the same targets and restarts, with a paired bootstrap CI."""
    if len(variants) < 2:
        return pd.DataFrame()
    va, vb = variants[0], variants[1]
    cols = judge_columns(judges)
    rows = []
    for alpha, g in trials.groupby("alpha"):
        ga, gb = g[g["variant"] == va], g[g["variant"] == vb]
        for j, col in cols.items():
            pa = ga.groupby("target")[col].mean()
            pb = gb.groupby("target")[col].mean()
            common = pa.index.intersection(pb.index)
            d, lo, hi = paired_bootstrap_diff(pa[common].to_numpy(), pb[common].to_numpy(), n_boot, seed)
            rows.append({"alpha": float(alpha), "judge": j, "first": va, "second": vb, "n_targets": len(common),
                         "diff_top5": d, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows).sort_values(["judge", "alpha"], ascending=[True, False]).reset_index(drop=True)


@torch.no_grad()
def correct_by_alpha(combined, test: Split, alphas: Sequence[float], device) -> tuple[np.ndarray, dict]:
    """Per test image: whether R_T alone is right, and whether R' is right at each alpha
    (one forward pass of each branch)."""
    p_t, p_d = [], []
    for i in range(0, len(test), 512):
        a, b = combined.branch_probs(test.x[i:i + 512].to(device))
        p_t.append(a.cpu()); p_d.append(b.cpu())
    p_t, p_d = torch.cat(p_t), torch.cat(p_d)
    rt = (p_t.argmax(1) == test.y).numpy()
    return rt, {float(a): (combined.mix(p_t, p_d, float(a)).argmax(1) == test.y).numpy() for a in alphas}


def accuracy_rows(combined, test: Split, alphas: Sequence[float], device, n_boot: int = 1000,
                  seed: int = 0) -> list[dict]:
    """Per alpha: R''s accuracy and its drop against R_T on the same images (``acc_drop``)
    with a paired bootstrap 95% CI over the images (``acc_drop_ci_low/high``)."""
    rt, by = correct_by_alpha(combined, test, alphas, device)
    rows = []
    for a, c in by.items():
        drop, lo, hi = paired_bootstrap_diff(c, rt, n_boot, seed)      # R_T's correctness minus R''s
        rows.append({"alpha": a, "accuracy": float(c.mean()), "acc_drop": drop,
                     "acc_drop_ci_low": lo, "acc_drop_ci_high": hi})
    return rows


def judge_names(trials: pd.DataFrame) -> list[str]:
    """The independent judges whose verdicts ``trials`` carries (``<name>_top5`` columns)."""
    return [c[:-len("_top5")] for c in trials.columns if c.endswith("_top5") and c != "success_top5"]


def judge_summary(g: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Per judge: per-trial top-5 success with its bootstrap CI over targets, best of
    restarts, top-1, and the mean distance to the target's nearest real image."""
    out = {}
    for j in judge_names(g):
        per_target = g.groupby("target")[f"{j}_top5"].mean().to_numpy()
        lo, hi = bootstrap_ci(per_target, n_boot, seed)
        out.update({f"{j}_top5": float(g[f"{j}_top5"].mean()), f"{j}_ci_low": lo, f"{j}_ci_high": hi,
                    f"{j}_best_restart_top5": float(g.groupby("target")[f"{j}_top5"].max().mean()),
                    f"{j}_top1": float(g[f"{j}_top1"].mean()), f"{j}_dist": float(g[f"{j}_dist"].mean())})
    return out


def summarize(trials: pd.DataFrame, accuracy: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (variant, alpha): per-trial success (top-5, top-1) with a bootstrap CI
    over targets, best-of-restarts success per target, distances, and R' accuracy."""
    rows = []
    for (variant, alpha), g in trials.groupby(["variant", "alpha"], sort=False):
        per_target = g.groupby("target")["success_top5"].mean().to_numpy()
        best = g.groupby("target")["success_top5"].max().to_numpy()
        lo, hi = bootstrap_ci(per_target, n_boot, seed)
        blo, bhi = bootstrap_ci(best, n_boot, seed)
        rows.append({"variant": variant, "alpha": float(alpha), "n_trials": len(g), "n_targets": len(per_target),
                     "mia_success_top5": float(g["success_top5"].mean()), "ci_low": lo, "ci_high": hi,
                     "mia_success_top1": float(g["success_top1"].mean()),
                     "mia_best_restart_top5": float(best.mean()), "best_ci_low": blo, "best_ci_high": bhi,
                     "dist_private": float(g["dist_private"].mean()), "dist_anchor": float(g["dist_anchor"].mean()),
                     **judge_summary(g, n_boot, seed)})
    out = pd.DataFrame(rows)
    out = out.merge(accuracy, on=["variant", "alpha"], how="left")
    return out.sort_values(["variant", "alpha"], ascending=[True, False]).reset_index(drop=True)


def admissible(g: pd.DataFrame, acc_target: float, tolerance: float, rule: str = "point") -> pd.Series:
    """Which alphas keep the accuracy.  ``point``: accuracy >= accuracy(R_T) - tolerance (on a
    small test set one image decides).  ``ci``: also every alpha whose accuracy drop against R_T
    is not shown to exceed the tolerance, i.e. the lower end of the drop's paired 95% bootstrap
    CI over the test images is <= tolerance (on 60 images: up to 3 images lost)."""
    ok = g["accuracy"] >= acc_target - tolerance - 1e-9
    if rule == "ci":
        if "acc_drop_ci_low" not in g:
            raise ValueError("accuracy rule 'ci' needs the accuracy drop's CI (evaluation.accuracy_rows)")
        ok = ok | (g["acc_drop_ci_low"] <= tolerance + 1e-9)
    return ok


def recommend(summary: pd.DataFrame, acc_target: float, tolerance: float, rule: str = "point") -> dict:
    """Per variant: the alpha with the lowest per-trial MIA success among the admissible ones
    (:func:`admissible`; ties: the larger alpha)."""
    rec = {}
    for variant, g in summary.groupby("variant"):
        ok = g[admissible(g, acc_target, tolerance, rule)]
        if ok.empty:
            rec[variant] = {"alpha": None, "reason": f"no alpha keeps accuracy ({rule} rule, R_T "
                                                     f"{acc_target:.3f}, tolerance {tolerance:.3f})"}
            continue
        best = ok.sort_values(["mia_success_top5", "alpha"], ascending=[True, False]).iloc[0]
        rec[variant] = {k: (float(v) if isinstance(v, (np.floating, float, int, np.integer)) else v)
                        for k, v in best.items()}
    return rec


def judge_columns(judges: Sequence[str]) -> dict:
    """Judge name -> its per-trial top-5 column (R_E is ``re``)."""
    return {"re": "success_top5", **{j: f"{j}_top5" for j in judges}}


def summarize_attacks(trials: pd.DataFrame, accuracy: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`summarize` per attack of the sweep's attack dimension (an ``attack`` column
    first), with the mean queries per row for the query attacks."""
    parts = []
    for attack, g in trials.groupby("attack", sort=False):
        s = summarize(g, accuracy, n_boot, seed)
        if "queries" in g and g["queries"].notna().any():
            q = g.groupby(["variant", "alpha"])["queries"].mean().rename("queries_mean").reset_index()
            s = s.merge(q, on=["variant", "alpha"], how="left")
        parts.append(s.assign(attack=attack))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return out[["attack"] + [c for c in out.columns if c != "attack"]] if len(out) else out


def defense_effects(trials: pd.DataFrame, chosen: dict, judges: Sequence[str], n_boot: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Per attack, variant and judge: success at α = 1 (R_T alone) and at the variant's chosen
    α (``chosen``: variant -> α), and the paired difference (chosen minus α = 1) over the same
    targets and restarts, with its bootstrap CI -- what the deployed defense takes away from
    each attacker."""
    rows = []
    for (attack, variant), g in trials.groupby(["attack", "variant"], sort=False):
        a = chosen.get(variant)
        if a is None:
            continue
        g1, ga = g[g["alpha"] == 1.0], g[g["alpha"] == float(a)]
        for j, col in judge_columns(judges).items():
            if col not in g:
                continue
            p1, pa = g1.groupby("target")[col].mean(), ga.groupby("target")[col].mean()
            common = p1.index.intersection(pa.index)
            d, lo, hi = paired_bootstrap_diff(p1[common].to_numpy(), pa[common].to_numpy(), n_boot, seed)
            rows.append({"attack": attack, "variant": variant, "alpha": float(a), "judge": j,
                         "n_targets": len(common), "n_trials": len(ga),
                         "top5_alpha1": float(g1[col].mean()) if len(g1) else float("nan"),
                         "top5_alpha": float(ga[col].mean()) if len(ga) else float("nan"),
                         "diff_top5": d, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)
