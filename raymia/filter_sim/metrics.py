"""Detection metrics of the filter paper (Eqs. 2-5): an attack trial is a positive, a
regular-user trial a negative; TP = attack trials blocked, FN = attack trials never
blocked within ``filter_sim.max_iters``, FP = users blocked, TN = users never blocked.
Plus the calibration: the configuration that detects soonest under an FPR target, chosen
on calibration sessions and reported on the held-out reported sessions."""
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


#: judges of the attacker's image at the stop: R_E and the independent judges (raymia.judges)
JUDGES = ("re", "external", "classical")
_PROTO_KEYS = ("fp", "tn", "user_trials", "fpr", "accuracy", "precision", "f1")
_CAL_KEYS = ("attack_trials", "user_trials", "tp", "fn", "fp", "tn", "recall", "fpr", "iters_max", "iters_median")


def _sel(df: pd.DataFrame, kind: str, role: str, protocol: str | None = None) -> pd.DataFrame:
    if df.empty or "kind" not in df:
        return df.iloc[0:0]
    m = df["kind"] == kind
    m &= (df["role"] if "role" in df else pd.Series("report", index=df.index)).fillna("report") == role
    if protocol is not None:
        m &= (df["protocol"] if "protocol" in df else pd.Series("sequence", index=df.index)).fillna("sequence") == protocol
    return df[m]


def config_metrics(df: pd.DataFrame, protocols=("paper", "sequence")) -> dict:
    """What one configuration's Tune trial reports, from its rows (attack and user units,
    reported and calibration sessions):

    * the paper's metrics (:func:`detection_metrics`) on the reported sessions, with the
      regular users of the primary protocol (``sequence`` when run, else ``paper``);
    * per protocol ``<protocol>_fpr`` etc. (reported sessions; NaN when not run);
    * ``cal_*``: recall, FPR (the largest over the protocols run), iterations before
      detection on the calibration sessions (NaN when there are none), and per protocol
      ``cal_<protocol>_fpr``."""
    att = _sel(df, "attack", "report")
    users = {p: _sel(df, "user", "report", p) for p in protocols}
    primary = "sequence" if len(users.get("sequence", ())) else "paper"
    out = detection_metrics(att, users.get(primary, df.iloc[0:0]))
    out["primary_protocol"] = primary
    for j in JUDGES:                      # what the attacker's image at the block (or the end) reveals
        for k in ("top1", "top5"):
            col = f"{j}_{k}_at_stop"
            v = att[col].dropna().astype(float) if col in att else pd.Series(dtype=float)
            out[col] = float(v.mean()) if len(v) else math.nan
    for p in ("paper", "sequence"):
        u = users.get(p)
        m = detection_metrics(att, u) if u is not None and len(u) else {}
        for k in _PROTO_KEYS:
            out[f"{p}_{k}"] = m.get(k, math.nan)
    cal_att = _sel(df, "attack", "calib")
    cal_users = {p: _sel(df, "user", "calib", p) for p in protocols}
    ran = {p: u for p, u in cal_users.items() if len(u)}
    first = ran.get("sequence", next(iter(ran.values()), df.iloc[0:0]))   # cal_fp / cal_tn: the primary protocol
    m = detection_metrics(cal_att, first) if len(cal_att) else {}
    for k in _CAL_KEYS:
        out[f"cal_{k}"] = m.get(k, math.nan)
    fprs = {p: detection_metrics(cal_att, u)["fpr"] for p, u in ran.items()}
    out["cal_fpr"] = max(fprs.values()) if fprs else math.nan
    out["cal_user_trials"] = sum(len(u) for u in ran.values()) if ran else math.nan
    for p in ("paper", "sequence"):
        out[f"cal_{p}_fpr"] = fprs.get(p, math.nan)
    return out


METRIC_KEYS = tuple(config_metrics(pd.DataFrame({
    "kind": ["attack", "user"], "role": ["report", "report"], "protocol": [None, "sequence"],
    "detected": [True, False], "iters_before_detection": [1.0, math.nan], "reached_target": [True, False],
    "re_top1_at_stop": [True, False], "flagged": [False, False]})))


def _plain(v):
    return v.item() if hasattr(v, "item") else v


#: what calibration.json keeps of a config's numbers, for selection and for the report
CAL_REPORT_KEYS = ("recall", "fpr", "iters_max", "iters_median", "attack_trials", "user_trials", "tp", "fn", "fp",
                   "tn", "paper_fpr", "sequence_fpr")


def calibrate(summary: pd.DataFrame, fpr_target: float) -> dict:
    """Per setting: among configs with FPR <= target, the one that detects every attack
    trial soonest (rank: recall high, worst-case iterations before detection low,
    median low, FPR low).  None when no config meets the FPR target.

    The choice is made on the calibration sessions (the summary's ``cal_*`` columns:
    other attack seeds, other regular users) when they ran, and the chosen config's
    numbers are reported on the reported sessions, which played no part in the choice;
    both sets are returned (``selection``, ``report``; the top-level numbers are the
    report's).  Without calibration sessions the choice falls back to the reported
    sessions (``selected_on: "report sessions (not held out)"``)."""
    out = {}
    for setting, g in summary.groupby("setting", sort=False):
        cand = g[~g["config"].map(is_ablation)]          # ablations have no calibration sessions
        held_out = "cal_attack_trials" in g and len(cand) and bool((cand["cal_attack_trials"].fillna(0) > 0).all())
        pre = "cal_" if held_out else ""
        ok = g[(g[f"{pre}fpr"] <= fpr_target + 1e-12) & ~g["config"].map(is_ablation)].copy()
        if ok.empty:
            out[setting] = {"config": None, "reason": f"no configuration has FPR <= {fpr_target:.0%}"
                            + (" on the calibration sessions" if held_out else "")}
            continue
        ok["_rec"] = ok[f"{pre}recall"]
        ok["_max"] = ok[f"{pre}iters_max"].fillna(math.inf)
        ok["_med"] = ok[f"{pre}iters_median"].fillna(math.inf)
        ok["_fpr"] = ok[f"{pre}fpr"]
        best = ok.sort_values(["_rec", "_max", "_med", "_fpr"], ascending=[False, True, True, True]).iloc[0]
        row = best.drop(["_rec", "_max", "_med", "_fpr"])
        sel = {k: _plain(row.get(f"{pre}{k}", math.nan)) for k in CAL_REPORT_KEYS}
        if held_out:
            sel.update({"paper_fpr": _plain(row.get("cal_paper_fpr", math.nan)),
                        "sequence_fpr": _plain(row.get("cal_sequence_fpr", math.nan))})
        out[setting] = {"config": best["config"], "fpr_target": fpr_target,
                        "selected_on": "calibration sessions (held out from the report)" if held_out
                        else "report sessions (not held out)",
                        **{k: _plain(v) for k, v in row.items() if not str(k).startswith("cal_")},
                        "selection": sel, "report": {k: _plain(row.get(k, math.nan)) for k in CAL_REPORT_KEYS}}
    return out


def sweep_summary(metrics: list[dict], configs: dict[str, dict]) -> pd.DataFrame:
    """One row per (setting, config): its parameters (``configs[setting][name]`` is a
    :class:`~raymia.defenses.filter.FilterParams`), beside the metrics its Tune trial
    reported (``metrics``: dicts with ``setting``, ``config`` and :data:`METRIC_KEYS`)."""
    params = pd.DataFrame([{"setting": s, "config": n, "paper": paper_k(n), "n_b": q.n_b, "t_ssim": q.t_ssim,
                            "t_hash": q.t_hash, "l_sp": q.l_sp, "data_range": q.data_range}
                           for s in configs for n, q in configs[s].items()])
    return params.merge(pd.DataFrame(metrics), on=["setting", "config"], how="left")
