"""Detection metrics of the filter paper (Eqs. 2-5): an attack trial is a positive, a
regular-user trial a negative; TP = attack trials blocked, FN = attack trials never
blocked within ``filter_sim.max_iters``, FP = users blocked, TN = users never blocked.
Plus the calibration: the configuration that detects soonest under an FPR target."""
from __future__ import annotations

import math

import pandas as pd

from .units import is_ablation, paper_k


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def detection_metrics(attack: pd.DataFrame, users: pd.DataFrame) -> dict:
    """Eqs. 2-5 plus the false-positive rate and iterations before detection."""
    det = attack["detected"].astype(bool) if len(attack) else pd.Series(dtype=bool)
    tp = int(det.sum())
    fn = len(attack) - tp
    fp = int(users["flagged"].astype(bool).sum()) if len(users) else 0
    tn = len(users) - fp
    prec, rec = _div(tp, tp + fp), _div(tp, tp + fn)
    it = attack.loc[det, "iters_before_detection"] if len(attack) else pd.Series(dtype=float)
    return {"attack_trials": len(attack), "user_trials": len(users), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "accuracy": _div(tp + tn, tp + tn + fp + fn), "precision": prec, "recall": rec,
            "f1": _div(2 * prec * rec, prec + rec) if tp else (0.0 if len(attack) else math.nan),
            "fpr": _div(fp, fp + tn),
            "iters_max": float(it.max()) if len(it) else math.nan,
            "iters_median": float(it.median()) if len(it) else math.nan,
            "iters_min": float(it.min()) if len(it) else math.nan,
            "reached_target_before_block": float(attack["reached_target"].astype(float).mean()) if len(attack) else math.nan,
            "re_top1_at_stop": float(attack["re_top1_at_stop"].astype(float).mean()) if len(attack) else math.nan}


METRIC_KEYS = tuple(detection_metrics(pd.DataFrame({"detected": [True], "iters_before_detection": [1.0],
                                                     "reached_target": [True], "re_top1_at_stop": [True]}),
                                       pd.DataFrame({"flagged": [False]})))


def calibrate(summary: pd.DataFrame, fpr_target: float) -> dict:
    """Per setting: among configs with FPR <= target, the one that detects every attack
    trial soonest (rank: recall high, worst-case iterations before detection low,
    median low, FPR low).  None when no config meets the FPR target."""
    out = {}
    for setting, g in summary.groupby("setting", sort=False):
        ok = g[(g["fpr"] <= fpr_target + 1e-12) & ~g["config"].map(is_ablation)].copy()
        if ok.empty:
            out[setting] = {"config": None, "reason": f"no configuration has FPR <= {fpr_target:.0%}"}
            continue
        ok["_max"] = ok["iters_max"].fillna(math.inf)
        ok["_med"] = ok["iters_median"].fillna(math.inf)
        best = ok.sort_values(["recall", "_max", "_med", "fpr"], ascending=[False, True, True, True]).iloc[0]
        out[setting] = {"config": best["config"], "fpr_target": fpr_target,
                        **{k: (v.item() if hasattr(v, "item") else v) for k, v in best.drop(["_max", "_med"]).items()}}
    return out


def sweep_summary(metrics: list[dict], configs: dict[str, dict]) -> pd.DataFrame:
    """One row per (setting, config): its parameters (``configs[setting][name]`` is a
    :class:`~raymia.defenses.filter.FilterParams`), beside the metrics its Tune trial
    reported (``metrics``: dicts with ``setting``, ``config`` and :data:`METRIC_KEYS`)."""
    params = pd.DataFrame([{"setting": s, "config": n, "paper": paper_k(n), "n_b": q.n_b, "t_ssim": q.t_ssim,
                            "t_hash": q.t_hash, "l_sp": q.l_sp, "data_range": q.data_range}
                           for s in configs for n, q in configs[s].items()])
    return params.merge(pd.DataFrame(metrics), on=["setting", "config"], how="left")
