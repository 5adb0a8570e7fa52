"""Report of the similarity-filter sweep: the paper's Tables 2-6 with ours beside its
numbers (markdown), the whole grid, the experiments beyond the paper, and the figures
(detection vs FPR, per-label iterations as Figs. 6/7, the adaptive attacker's noise, detection
as curves over the attacker's noise σ).

(~520 lines: one short function per table or figure, all over the same trial and summary
frames; split further they would only import each other.)"""
from __future__ import annotations

import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..filter_sim.units import NO_FILTER, is_ablation, paper_k, paper_name  # noqa: E402
from ..paper import PAPER_CELEBA_LABELS, paper_reference  # noqa: E402
from .tables import md  # noqa: E402

# ----------------------------------------------------------------------------- tables

def _fmt_int(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(v)}"


def _fmt_pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _reported(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the reported sessions (not the calibration sessions)."""
    return df[df["role"].fillna("report") == "report"] if "role" in df else df


def _protocol(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    return df[df["protocol"].fillna("sequence") == protocol] if "protocol" in df else (
        df if protocol == "sequence" else df.iloc[0:0])


def attack_label_table(trials: pd.DataFrame, setting: str, paper_setting: str, names: list) -> str:
    """Tables 2/3: per label, attack attempts, attacks never detected (the paper's
    "Successful") and the max iterations before detection per Table 1 config, ours
    beside the paper's (per label for MNIST; CelebA's labels differ from ours)."""
    a = _reported(trials[(trials["setting"] == setting) & (trials["kind"] == "attack")])
    ks = sorted(paper_k(c) for c in a["config"].unique() if paper_k(c))
    ref = paper_reference(paper_setting)
    per_label = paper_setting == "mnist"
    header = ["label", "attempts", "undetected (" + "/".join(f"cfg {k}" for k in ks) + ")"]
    for k in ks:
        header += [f"max iter. cfg {k}"] + ([f"paper cfg {k}"] if per_label else [])
    header += ["first query R_T conf ≥ success (median)"]
    rows = []
    for lab, g in a.groupby("label"):
        lab = int(lab)
        g1 = g[g["config"] == paper_name(ks[0])] if ks else g
        und = [int((~g[g["config"] == paper_name(k)]["detected"].astype(bool)).sum()) for k in ks]
        row = [names[lab] if lab < len(names) else str(lab), len(g1), "/".join(map(str, und))]
        for k in ks:
            gk = g[g["config"] == paper_name(k)]
            row.append(_fmt_int(gk["iters_before_detection"].max()) + ("" if gk["detected"].astype(bool).all() else "*"))
            if per_label:
                row.append(ref[k]["per_label_max"][lab] if lab < 10 else "–")
        row.append(_fmt_int(g1["first_success_query"].median()))
        rows.append(row)
    tot = ["total", sum(r[1] for r in rows),
           "/".join(str(int((~a[a["config"] == paper_name(k)]["detected"].astype(bool)).sum())) for k in ks)]
    for k in ks:
        gk = a[a["config"] == paper_name(k)]
        tot.append(_fmt_int(gk["iters_before_detection"].max()))
        if per_label:
            tot.append(ref[k]["iters_max"])
    tot.append(_fmt_int(a[a["config"] == paper_name(ks[0])]["first_success_query"].median()) if ks else "–")
    out = md(header, rows + [tot])
    if not per_label:
        out += "\n\nPaper (CelebA, 4 attribute classes, 3 attempts each, 0 undetected), max iterations before " \
               "detection:\n\n" + md(["config"] + PAPER_CELEBA_LABELS,
                                      [[f"cfg {k}"] + ref[k]["per_label_max"] for k in ks])
    return out


def user_label_table(trials: pd.DataFrame, setting: str, paper_setting: str, names: list,
                     protocol: str = "sequence") -> str:
    """Tables 4/5: regular-user attempts and false detections per label and config, for
    the users of one protocol (``sequence``: sessions of several images; ``paper``: one
    test image per trial)."""
    u = _protocol(_reported(trials[(trials["setting"] == setting) & (trials["kind"] == "user")]), protocol)
    if u.empty:
        return f"(no {protocol}-protocol users)"
    ks = sorted(paper_k(c) for c in u["config"].unique() if paper_k(c))
    ref = paper_reference(paper_setting)
    per_label = paper_setting == "mnist"
    header = ["label", "user attempts", "queries each"]
    for k in ks:
        header += [f"false det. cfg {k}"] + ([f"paper cfg {k}"] if per_label else [])
    rows = []
    for lab, g in u.groupby("label"):
        lab = int(lab)
        g1 = g[g["config"] == paper_name(ks[0])] if ks else g
        row = [names[lab] if lab < len(names) else str(lab), len(g1), int(g1["n_queries"].median())]
        for k in ks:
            row.append(int(g[g["config"] == paper_name(k)]["flagged"].astype(bool).sum()))
            if per_label:
                row.append(ref[k]["per_label_fp"][lab] if lab < 10 else "–")
        rows.append(row)
    tot = ["total", sum(r[1] for r in rows), ""]
    for k in ks:
        tot.append(int(u[u["config"] == paper_name(k)]["flagged"].astype(bool).sum()))
        if per_label:
            tot.append(ref[k]["fp"])
    out = md(header, rows + [tot])
    if not per_label:
        out += "\n\nPaper (CelebA), false detections per class:\n\n" + md(
            ["config"] + PAPER_CELEBA_LABELS + ["total"],
            [[f"cfg {k}"] + ref[k]["per_label_fp"] + [ref[k]["fp"]] for k in ks])
    return out


def table6(summary: pd.DataFrame, setting: str, paper_setting: str, extra: tuple = (),
           protocol: str | None = None) -> str:
    """Table 6 (ours | paper) for the Table 1 configs, plus FPR and iterations; with
    ``protocol`` the regular users of that protocol (``paper`` / ``sequence``) are the
    negatives, else the summary's primary protocol."""
    ref = paper_reference(paper_setting)
    g = summary[summary["setting"] == setting].set_index("config")
    if protocol is not None:
        g = g.copy()
        for key in ("accuracy", "precision", "f1", "fpr", "fp", "tn"):
            if f"{protocol}_{key}" in g:
                g[key] = g[f"{protocol}_{key}"]
    header = ["config", "accuracy", "paper", "precision", "paper", "recall", "paper", "F1", "paper",
              "FPR", "paper", "max iter.", "paper", "median iter.", "TP/FN/FP/TN"]
    rows = []
    names = [paper_name(k) for k in (1, 2, 3) if paper_name(k) in g.index] + [n for n in extra if n in g.index]
    for n in dict.fromkeys(names):
        r = g.loc[n]
        k = paper_k(n)
        p = ref.get(k, {}) if k else {}
        pv = lambda key: _fmt_pct(p[key]) if p else "–"  # noqa: E731
        rows.append([n if k or is_ablation(n) else f"{n} (calibrated)", _fmt_pct(r["accuracy"]), pv("accuracy"),
                     _fmt_pct(r["precision"]), pv("precision"), _fmt_pct(r["recall"]), pv("recall"),
                     _fmt_pct(r["f1"]), pv("f1"), _fmt_pct(r["fpr"]), pv("fpr"), _fmt_int(r["iters_max"]),
                     p.get("iters_max", "–"), _fmt_int(r["iters_median"]),
                     f"{r['tp']}/{r['fn']}/{_fmt_int(r['fp'])}/{_fmt_int(r['tn'])}"])
    return md(header, rows)


def judged_table(summary: pd.DataFrame, setting: str, extra: tuple = ()) -> str:
    """What the attacker's image had reached when it was blocked (or after the last query
    when never blocked), per config, reported attack trials: R_T's confidence (the
    attacker's own signal) and identification by R_E and the independent judges."""
    g = summary[summary["setting"] == setting].set_index("config")
    names = [paper_name(k) for k in (1, 2, 3) if paper_name(k) in g.index] + [n for n in extra if n in g.index]
    cols = [("reached_target_before_block", "R_T conf ≥ success before the block"),
            ("re_top1_at_stop", "R_E top-1"), ("re_top5_at_stop", "R_E top-5"),
            ("classical_top5_at_stop", "eigenfaces+SVM top-5"), ("external_top5_at_stop", "external (dlib) top-5")]
    cols = [(k, h) for k, h in cols if k in g and g[k].notna().any()]
    rows = [[n if paper_k(n) or is_ablation(n) else f"{n} (calibrated)"] + [_fmt_pct(g.loc[n, k]) for k, _ in cols]
            for n in dict.fromkeys(names)]
    return md(["config"] + [h for _, h in cols], rows)


def calibration_table(calibration: dict, setting: str) -> str:
    """The calibrated config's numbers where it was chosen (selection) and on the
    reported sessions, which played no part in the choice (report)."""
    cal = calibration.get(setting, {})
    if not cal.get("config"):
        return f"No calibrated config: {cal.get('reason', '–')}."
    sel, rep = cal.get("selection", {}), cal.get("report", {})
    rows = []
    for name, d in (("selection (" + cal.get("selected_on", "?") + ")", sel), ("report (reported sessions)", rep)):
        rows.append([name, f"{_fmt_int(d.get('attack_trials'))} / {_fmt_int(d.get('user_trials'))}",
                     _fmt_pct(d.get("recall")), _fmt_pct(d.get("fpr")), _fmt_pct(d.get("paper_fpr")),
                     _fmt_pct(d.get("sequence_fpr")), _fmt_int(d.get("iters_max")), _fmt_int(d.get("iters_median"))])
    return (f"Calibrated config `{cal['config']}` (FPR ≤ {cal.get('fpr_target', 0):.0%}):\n\n" +
            md(["sessions", "attack / user trials", "recall", "FPR", "FPR paper users", "FPR sequence users",
                "max iter.", "median iter."], rows))


def grid_table(summary: pd.DataFrame, setting: str) -> str:
    g = summary[summary["setting"] == setting].copy()
    g = g.sort_values(["fpr", "recall", "iters_max"], ascending=[True, False, True])
    cols = ["config", "n_b", "t_ssim", "t_hash", "l_sp", "recall", "fpr", "FPR paper users", "f1", "iters_median",
            "iters_max", "reached_target_before_block", "calib. recall", "calib. FPR", "calib. max iter."]
    get = lambda r, k: getattr(r, k, math.nan)  # noqa: E731
    rows = [[r.config, r.n_b, f"{r.t_ssim:g}", f"{r.t_hash:g}", r.l_sp, _fmt_pct(r.recall), _fmt_pct(r.fpr),
             _fmt_pct(get(r, "paper_fpr")), _fmt_pct(r.f1), _fmt_int(r.iters_median), _fmt_int(r.iters_max),
             _fmt_pct(r.reached_target_before_block), _fmt_pct(get(r, "cal_recall")), _fmt_pct(get(r, "cal_fpr")),
             _fmt_int(get(r, "cal_iters_max"))]
            for r in g.itertuples()]
    return md(cols, rows)


def noise_table(trials: pd.DataFrame, setting: str) -> str:
    """Adaptive attacker: detection and what the attack had achieved when stopped."""
    n = trials[(trials["setting"] == setting) & (trials["kind"] == "noise")]
    rows = []
    jcols = [(c, h) for c, h in (("re_top5_at_stop", "R_E top-5 at stop"),
                                 ("classical_top5_at_stop", "eigenfaces+SVM top-5 at stop"),
                                 ("external_top5_at_stop", "external top-5 at stop"))
             if c in n and n[c].notna().any()]
    mean = lambda v: _fmt_pct(v.dropna().astype(float).mean()) if v.notna().any() else "–"  # noqa: E731
    for (cfg_name, sigma), g in n.groupby(["config", "noise"], sort=True):
        rows.append([cfg_name, f"{sigma:g}", f"{int(g['detected'].astype(bool).sum())}/{len(g)}",
                     _fmt_int(g["iters_before_detection"].median()), _fmt_int(g["answered"].median()),
                     _fmt_pct(g["reached_target"].astype(float).mean()), _fmt_pct(g["x_conf_at_stop"].mean()),
                     _fmt_pct(g["re_top1_at_stop"].astype(float).mean())] + [mean(g[c]) for c, _ in jcols])
    return md(["config", "noise σ", "detected", "median iter. before det.", "median answered",
                "reached R_T conf ≥ success", "R_T conf of x at stop (mean)", "R_E top-1 at stop"]
              + [h for _, h in jcols], rows)


CHOSEN_SIGMA_NOTE = ("chosen to match the paper (the largest round level at which config 2 can still detect, "
                     "so that its 100% recall can be reproduced); not a default and not a property of the filter")


def _curve_configs(n: pd.DataFrame) -> list:
    """The configs of the noise experiment, Table 1 first (no-filter reference excluded)."""
    names = [c for c in dict.fromkeys(n["config"]) if c != NO_FILTER]
    return sorted(names, key=lambda c: (0, paper_k(c)) if paper_k(c) else (1, c))


def noise_curve_table(trials: pd.DataFrame, setting: str, chosen: float) -> str:
    """Detection as a function of the attacker's noise σ: one row per config (Table 1's
    and the calibrated one), one column per σ with recall (detected / trials) and the
    median / max iterations before detection.  The σ of the main tables is marked as
    chosen to match the paper."""
    n = trials[(trials["setting"] == setting) & (trials["kind"] == "noise")]
    if n.empty:
        return "(noise experiment not run)"
    sig = sorted(n["noise"].unique())
    header = ["config"] + [f"σ={s:g}" + (" (chosen to match the paper)" if math.isclose(s, chosen) else "")
                           for s in sig]
    rows = []
    for c in _curve_configs(n):
        row = [c]
        for s in sig:
            g = n[(n["config"] == c) & (n["noise"] == s)]
            det = g["detected"].astype(bool)
            it = g.loc[det, "iters_before_detection"]
            row.append(f"{100 * det.mean():.0f}% ({det.sum()}/{len(g)}); "
                       f"{_fmt_int(it.median()) if len(it) else '–'} / {_fmt_int(it.max()) if len(it) else '–'}")
        rows.append(row)
    return ("Recall (detected/trials); median / max iterations before detection.\n\n" + md(header, rows))


def noise_curve_plot(trials: pd.DataFrame, titles: dict, chosen: dict, max_iters: dict, path) -> None:
    """Recall and iterations before detection against the attacker's noise σ, one
    curve per config; the σ of the main tables marked as chosen to match the paper."""
    n = trials[trials["kind"] == "noise"]
    settings = list(dict.fromkeys(n["setting"]))
    fig, axes = plt.subplots(2, len(settings), figsize=(6.2 * len(settings), 7.2), squeeze=False)
    for j, s in enumerate(settings):
        g = n[n["setting"] == s]
        sig = sorted(g["noise"].unique())
        pos = [v for v in sig if v > 0]
        xs = {v: (v if v > 0 else (min(pos) if pos else 1e-5) / 3) for v in sig}
        for c in _curve_configs(g):
            gc = g[g["config"] == c]
            det = gc["detected"].astype(float).groupby(gc["noise"]).mean()
            it = gc[gc["detected"].astype(bool)].groupby("noise")["iters_before_detection"]
            lab = f"cfg {paper_k(c)}" if paper_k(c) else f"{c} (calibrated)"
            axes[0, j].plot([xs[v] for v in det.index], det.values, marker="o", ms=3, label=lab)
            med = it.median()
            axes[1, j].plot([xs[v] for v in med.index], med.values, marker="o", ms=3, label=f"{lab}: median")
            mx = it.max()
            axes[1, j].plot([xs[v] for v in mx.index], mx.values, ls=":", marker="^", ms=3,
                            color=axes[1, j].lines[-1].get_color(), label=f"{lab}: max")
        for ax in axes[:, j]:
            ax.axvline(chosen[s], color="crimson", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.set_xlabel("attacker noise σ (leftmost point: σ = 0)")
        axes[0, j].text(chosen[s], 0.5, f" σ={chosen[s]:g}: chosen to\n match the paper", color="crimson",
                        fontsize=7)
        axes[0, j].set_ylim(-0.03, 1.03)
        axes[0, j].set_ylabel("recall (attack trials detected)")
        axes[0, j].set_title(f"{titles.get(s, s)}: detection vs attacker noise", fontsize=9)
        axes[1, j].set_yscale("log")
        axes[1, j].axhline(max_iters[s], color="gray", lw=0.6, ls=":")
        axes[1, j].set_ylabel(f"iterations before detection (detected trials; cap {max_iters[s]})")
        axes[0, j].legend(fontsize=6)
        axes[1, j].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sybil_table(trials: pd.DataFrame, setting: str) -> str:
    s = trials[(trials["setting"] == setting) & (trials["kind"] == "sybil")]
    rows = []
    for (base, glob, k), g in s.groupby(["base_config", "global", "k"], sort=True):
        rows.append([base, "yes" if glob else "no", int(k), f"{int(g['detected'].astype(bool).sum())}/{len(g)}",
                     _fmt_int(g["first_id_blocked_at"].median()), _fmt_int(g["answered"].median()),
                     _fmt_pct(g["reached_target"].astype(float).mean()),
                     _fmt_pct(g["re_top1_at_stop"].astype(float).mean())])
    return md(["config", "cross-client", "ids k", "attack stopped", "first id blocked at (median)",
                "queries answered (median)", "reached R_T conf ≥ success", "R_E top-1 at stop"], rows)


def population_table(trials: pd.DataFrame, setting: str) -> str:
    p = trials[(trials["setting"] == setting) & (trials["kind"] == "population")]
    rows = [[r.config, int(r.users), int(r.queries), int(r.blocked_client), int(r.blocked_global),
             _fmt_pct(r.fpr_with_global)] for r in p.itertuples()]
    return md(["config", "users", "queries", "blocked by own filter", "blocked by cross-client check",
                "FPR with cross-client check"], rows)


# ----------------------------------------------------------------------------- figures

def detection_fpr_plot(summary: pd.DataFrame, calibration: dict, paper_settings: dict, titles: dict,
                       max_iters: dict, path) -> None:
    """Worst-case iterations before detection vs false-positive rate, every config of
    the grid; Table 1 configs labelled, the paper's own points as stars."""
    settings = list(dict.fromkeys(summary["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(8.2 * len(settings), 4.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, s in zip(axes[0], settings):
        g = summary[summary["setting"] == s]
        ts = sorted(g.loc[~g["config"].map(is_ablation), "t_ssim"].unique())
        markers = {nb: m for nb, m in zip(sorted(g["n_b"].unique()), "os^Dv<>")}
        cap = max_iters[s]
        for r in g.itertuples():
            full = r.recall >= 1.0
            y = r.iters_max if full else cap * 1.15
            if is_ablation(r.config):
                ax.scatter(r.fpr, y, marker="x", s=40, color="gray")
                tag = f"L={r.data_range:g}" if r.config.split("-")[2].startswith("L") else r.config.split("-")[2]
                ax.annotate(f"cfg {r.config.split('-')[1]}, {tag}", (r.fpr, y), textcoords="offset points",
                            xytext=(5, -9), fontsize=7, color="gray")
                continue
            c = cmap(ts.index(r.t_ssim) / max(1, len(ts) - 1))
            ax.scatter(r.fpr, y, marker=markers[r.n_b], s=26 + 60 * math.log10(r.t_hash / 1e-5 + 1) / 3,
                       facecolors=c if full else "none", edgecolors=c, alpha=0.8)
            if r.paper:
                ax.annotate(f"cfg {r.paper}", (r.fpr, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ref = paper_reference(paper_settings[s])
        for k, v in ref.items():
            ax.scatter(v["fpr"], v["iters_max"], marker="*", s=150, color="crimson", zorder=5)
            ax.annotate(f"paper cfg {k}", (v["fpr"], v["iters_max"]), textcoords="offset points", xytext=(6, -10),
                        fontsize=8, color="crimson")
        cal = calibration.get(s, {})
        if cal.get("config"):
            ax.scatter(cal["fpr"], cal["iters_max"], marker="o", s=260, facecolors="none", edgecolors="red", lw=1.5)
            ax.annotate("calibrated", (cal["fpr"], cal["iters_max"]), textcoords="offset points", xytext=(8, 8),
                        fontsize=8, color="red")
        ax.axhline(cap * 1.15, color="gray", lw=0.6, ls=":", label=f"hollow, on this line: an attack undetected "
                   f"after {cap} queries")
        ax.set_yscale("log")
        ax.set_xlabel("false-positive rate (regular users blocked)")
        ax.set_ylabel("max iterations before detection")
        ax.set_title(titles.get(s, s), fontsize=10)
        ax.grid(alpha=0.3)
        for i, t in enumerate(ts):
            ax.scatter([], [], color=cmap(i / max(1, len(ts) - 1)), label=f"T_ssim={t:g}")
        for nb, m in markers.items():
            ax.scatter([], [], marker=m, color="gray", label=f"N_B={nb}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_label_plot(trials: pd.DataFrame, setting: str, paper_setting: str, names: list, title: str, path) -> None:
    """Figs. 6/7: max iterations before detection per label for the Table 1 configs,
    ours (bars) beside the paper's."""
    a = _reported(trials[(trials["setting"] == setting) & (trials["kind"] == "attack")])
    ks = sorted(paper_k(c) for c in a["config"].unique() if paper_k(c))
    labels = sorted(int(v) for v in a["label"].unique())
    ref = paper_reference(paper_setting)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [max(4, len(labels)), 4]})
    w = 0.8 / max(1, len(ks))
    for i, k in enumerate(ks):
        g = a[a["config"] == paper_name(k)].groupby("label")["iters_before_detection"].max()
        axes[0].bar(np.arange(len(labels)) + i * w, [g.get(lab, np.nan) for lab in labels], w, label=f"cfg {k}")
    axes[0].set_xticks(np.arange(len(labels)) + w * (len(ks) - 1) / 2)
    axes[0].set_xticklabels([names[lab] if lab < len(names) else str(lab) for lab in labels], rotation=60, fontsize=7)
    axes[0].set_title(f"ours: {title}", fontsize=9)
    plabels = [str(i) for i in range(10)] if paper_setting == "mnist" else PAPER_CELEBA_LABELS
    for i, k in enumerate(ks):
        axes[1].bar(np.arange(len(plabels)) + i * w, ref[k]["per_label_max"], w, label=f"cfg {k}")
    axes[1].set_xticks(np.arange(len(plabels)) + w * (len(ks) - 1) / 2)
    axes[1].set_xticklabels(plabels, rotation=60, fontsize=7)
    axes[1].set_title(f"paper ({paper_setting})", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("max iterations before detection")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def noise_plot(trials: pd.DataFrame, titles: dict, thresholds: dict, path, chosen: dict | None = None) -> None:
    """Adaptive attacker: (top) SSIM between consecutive queries along the attack for
    each noise level, with the configs' T_ssim; (bottom) detection rate and the
    attack's progress at the stop, against the noise level."""
    n = trials[trials["kind"] == "noise"]
    settings = list(dict.fromkeys(n["setting"]))
    fig, axes = plt.subplots(2, len(settings), figsize=(6.2 * len(settings), 7.6), squeeze=False)
    cmap = plt.get_cmap("plasma")
    for j, s in enumerate(settings):
        g = n[n["setting"] == s]
        ref = g[g["config"] == NO_FILTER]
        sig = sorted(ref["noise"].unique())
        ax = axes[0, j]
        first = int(ref["label"].min())
        for i, sg in enumerate(sig):
            row = ref[(ref["noise"] == sg) & (ref["label"] == first)]
            if len(row) and row.iloc[0]["ssim_prev"] is not None:
                tr = 1.0 - np.asarray(row.iloc[0]["ssim_prev"], float)
                ax.plot(np.arange(2, len(tr) + 2), np.maximum(tr, 1e-9), color=cmap(i / max(1, len(sig) - 1)),
                        lw=0.8, label=f"σ={sg:g}")
        for name, t in thresholds[s].items():
            ax.axhline(1 - t, color="k", lw=0.6, ls="--")
            ax.text(1, (1 - t) * 1.1, f"{name}: 1−T_ssim", fontsize=7)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("attack iteration (query)")
        ax.set_ylabel("1 − SSIM(query, previous query)")
        ax.set_title(f"{titles.get(s, s)}: label {first}", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        ax = axes[1, j]
        if chosen and s in chosen:
            ax.axvline(chosen[s], color="crimson", lw=0.8, ls="--")
        xs = {sg: (sg if sg > 0 else min([v for v in sig if v > 0] or [1e-5]) / 3) for sg in sig}
        for name, gg in g[g["config"] != NO_FILTER].groupby("config"):
            r = gg["detected"].astype(float).groupby(gg["noise"]).mean()
            ax.plot([xs[v] for v in r.index], r.values, marker="o", ms=3, label=f"detected: {name}")
        r = ref.groupby("noise")
        ax.plot([xs[v] for v in r.groups], r["re_top1_at_stop"].apply(lambda v: v.astype(float).mean()).values, "k--",
                marker="s", ms=3,
                label=f"R_E top-1 of x, no filter (after {int(ref['answered'].max())} queries)")
        ax.plot([xs[v] for v in r.groups], r["x_conf_at_stop"].mean().values, "k:", marker="^", ms=3,
                label="R_T conf of x, no filter")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("attacker noise σ (leftmost point: σ = 0)")
        ax.set_ylabel("rate")
        ax.set_title("vs σ; dashed red: the main tables' σ\n(chosen to match the paper)", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the sweep's report

PROTOCOL_TEXT = {"paper": "paper protocol: per trial one random held-out test image of the label (section 4.5), "
                          "the setting's trials in one client session",
                 "sequence": "sequence protocol: per user a session of several distinct images of the label"}


def _user_sections(trials, summary, s, paper_setting, names, c, configs, cal) -> list:
    from ..filter_sim.units import user_protocols
    extra = tuple([cal] if cal else []) + tuple(n for n in configs if n.startswith("paper-") and not paper_k(n))
    out = []
    for p in user_protocols(c.filter_sim):
        out += [f"### Table 4/5: regular users, {PROTOCOL_TEXT[p]}", "",
                user_label_table(trials, s, paper_setting, names, p), ""]
    for p in user_protocols(c.filter_sim):
        out += [f"### Table 6: defense performance (%), regular users of the {PROTOCOL_TEXT[p]}", "",
                table6(summary, s, paper_setting, extra, protocol=p), ""]
    return out


def sweep_tables(cfgs: dict, configs: dict, names: dict, trials: pd.DataFrame, summary: pd.DataFrame,
                 calibration: dict, titles: dict) -> str:
    """``tables.md`` of the filter sweep: per setting ({setting: Config} ``cfgs``, its
    configurations ``configs[setting]`` and class ``names[setting]``) Tables 2-6 beside
    the paper's, the calibrated config, the experiments beyond the paper and the grid."""
    ps = {s: c.filter_sim.paper_setting for s, c in cfgs.items()}
    out = [f"# Similarity filter sweep ({time.strftime('%Y-%m-%d')})", ""]
    for s, c in cfgs.items():
        sim = c.filter_sim
        cal = calibration.get(s, {}).get("config")
        out += [f"## {titles.get(s, s)} (`{s}`; compared with the paper's {ps[s]})", "",
                f"Attacker noise σ = {sim.noise_std:g} in the Table 2-6 trials: {CHOSEN_SIGMA_NOTE}. "
                "Detection as a function of σ: *Detection vs the attacker's noise σ* below and "
                "`detection_vs_noise.png`.", "",
                f"At most {sim.max_iters} queries per attack trial, "
                f"{sim.trials_per_label} attack / {sim.user_trials_per_label} regular-user trial(s) per label.", "",
                "### Table 2/3: attack attempts (`*`: some attempt never detected)", "",
                attack_label_table(trials, s, ps[s], names[s]), "",
                *_user_sections(trials, summary, s, ps[s], names[s], c, configs[s], cal),
                "### What the attacker had reached at the block (or at the end), judged", "",
                "The attacker's image when its config blocked it (after the last query when never blocked), "
                "reported attack trials (%); R_E and the independent judges identify it among the evaluator's "
                "identities.", "",
                judged_table(summary, s, tuple([cal] if cal else []) + tuple(
                    n for n in configs[s] if n.startswith("paper-") and not paper_k(n))), "",
                "### Calibration: chosen on calibration sessions, reported on held-out sessions", "",
                calibration_table(calibration, s), "",
                f"### Detection vs the attacker's noise σ (first {sim.extra_labels} label(s), 1 trial each)", "",
                noise_curve_table(trials, s, sim.noise_std), "",
                "### Adaptive attacker (noise): what the attack had reached", "", noise_table(trials, s), "",
                "### Sybil attacker (round-robin over k client ids)", "", sybil_table(trials, s), "",
                "### Regular users with the cross-client check", "", population_table(trials, s), "",
                "### Whole grid", "", grid_table(summary, s), ""]
    return "\n".join(out)


def sweep_figures(out, cfgs: dict, configs: dict, names: dict, trials: pd.DataFrame, summary: pd.DataFrame,
                  calibration: dict, titles: dict) -> None:
    """The sweep's figures in ``out``: max_iters_per_label_<setting>.png per setting,
    detection_vs_fpr.png and, when the noise experiment ran, noise.png."""
    ps = {s: c.filter_sim.paper_setting for s, c in cfgs.items()}
    for s in cfgs:
        per_label_plot(trials, s, ps[s], names[s], titles.get(s, s), out / f"max_iters_per_label_{s}.png")
    detection_fpr_plot(summary, calibration, ps, titles, {s: c.filter_sim.max_iters for s, c in cfgs.items()},
                       out / "detection_vs_fpr.png")
    thresholds = {s: {n: configs[s][n].t_ssim for n in configs[s] if paper_k(n)} for s in cfgs}
    if (trials["kind"] == "noise").any():
        noise_plot(trials, titles, thresholds, out / "noise.png", {s: c.filter_sim.noise_std for s, c in cfgs.items()})
        noise_curve_plot(trials, titles, {s: c.filter_sim.noise_std for s, c in cfgs.items()},
                         {s: c.filter_sim.max_iters for s, c in cfgs.items()}, out / "detection_vs_noise.png")
