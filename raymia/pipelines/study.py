"""The study: the α sweep repeated over seeds x identity folds, pooled into estimates
with hierarchical CIs — the numbers the README reports.

Each (seed, fold) unit is a whole α sweep (its own R_T, R_E, G, F, R_dmy; selection
draw and report draw) under ``<out_root>/<run.name>-s<seed>-f<fold>/`` (the unit of the
config's own seed and fold: its own run, ``<out_root>/<run.name>/``), so the study is
resumable: a rerun reuses every finished unit.  Pooled per variant, judge and draw: the
report draw's per-target success at the α each unit selected, resampled by units and
then by targets within units (:func:`raymia.evaluation.hierarchical_bootstrap`); the
selection draw's numbers beside them show the optimism of choosing."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import pandas as pd

from ..artifacts import write_run_record
from ..config import Config
from ..evaluation import hierarchical_bootstrap, judge_names
from ..report import markdown_table
from ..runtime import out_dir
from . import alpha_sweep


def unit_config(cfg: Config, seed: int, fold: int) -> Config:
    """The α sweep of one (seed, fold) unit.  The unit equal to ``cfg`` itself (its own
    seed and fold) is ``cfg``'s run: for the default preset, exactly what ``make demo``
    ran and wrote under ``runs/orl/``, so the study reuses it instead of repeating it."""
    c = copy.deepcopy(cfg)
    same = int(seed) == cfg.run.seed and int(fold) == cfg.data.fold
    c.run.seed, c.data.fold = int(seed), int(fold)
    if same:
        return c
    c.run.name = f"{cfg.run.name}-s{seed}-f{fold}"
    c.search.seeds = [s for s in c.search.seeds if s != c.run.seed] or [c.run.seed + 1]
    return c


def _per_target(trials: pd.DataFrame, variant: str, alpha: float, col: str) -> pd.Series:
    g = trials[(trials["variant"] == variant) & (trials["alpha"] == alpha)]
    return g.groupby("target")[col].mean()


DRAWS = (("selection", "trials"), ("report", "report_trials"))


def _draw_judges(units: list[dict]):
    """(draw, its trials key, judge, the judge's top-5 column) for every draw the units carry."""
    for draw, key in DRAWS:
        if key in units[0]:
            for j in ["re"] + judge_names(units[0][key]):
                yield draw, key, j, ("success_top5" if j == "re" else f"{j}_top5")


def _pooled(groups: list, labels: list[str], n_boot: int, seed: int, **row) -> dict:
    est, lo, hi = hierarchical_bootstrap(groups, n_boot, seed)
    return {**row, "units": len(groups), "alphas": ",".join(labels), "top5": est, "ci_low": lo, "ci_high": hi}


def _paired_rows(units: list[dict], first: str, second: str, n_boot: int, seed: int) -> list[dict]:
    """The deployed defenses compared paired: per unit and target, ``second`` at its selected
    α minus ``first`` at its selected α (same targets, restarts, anchors and seeds within a
    unit), pooled with the same hierarchical bootstrap (units, then targets)."""
    rows = []
    for draw, key, j, col in _draw_judges(units):
        groups, labels = [], []
        for u in units:
            a, b = (u["rec"]["variants"].get(v, {}).get("alpha") for v in (first, second))
            if a is None or b is None or key not in u:
                continue
            d = (_per_target(u[key], second, float(b), col) - _per_target(u[key], first, float(a), col)).dropna()
            if len(d):
                groups.append(d.tolist())
                labels.append(f"{b:g}/{a:g}")
        rows.append(_pooled(groups, labels, n_boot, seed, variant=f"{second} - {first}", draw=draw, judge=j,
                            alpha="selected"))
    return rows


def pool(units: list[dict], n_boot: int, seed: int) -> pd.DataFrame:
    """One row per (variant, draw, judge): estimate and hierarchical 95% CI over units
    and targets, at the α each unit selected; plus α = 1 (undefended) for reference, and
    ``calibrated - paper`` paired (each at its selected α)."""
    rows = []
    variants = sorted({v for u in units for v in u["rec"]["variants"]})
    for v in variants:
        for draw, key, j, col in _draw_judges(units):
            for where in ("selected", "alpha=1"):
                groups, labels = [], []
                for u in units:
                    a = 1.0 if where == "alpha=1" else u["rec"]["variants"][v].get("alpha")
                    if a is None or key not in u:
                        continue
                    vals = _per_target(u[key], v, float(a), col).tolist()
                    if vals:
                        groups.append(vals)
                        labels.append(f"{float(a):g}")
                rows.append(_pooled(groups, labels, n_boot, seed, variant=v, draw=draw, judge=j, alpha=where))
    if {"paper", "calibrated"} <= set(variants):
        rows += _paired_rows(units, "paper", "calibrated", n_boot, seed)
    return pd.DataFrame(rows)


def run(cfg: Config, out: Optional[str] = None, address: Optional[str] = None) -> Path:
    """Every (seed, fold) α sweep of ``cfg.study`` (resumable), then the pooled table."""
    out = out_dir(cfg, out, "study")
    write_run_record(out, cfg, {"seeds": cfg.study.seeds, "folds": cfg.study.folds})
    units = []
    for s in cfg.study.seeds:
        for f in cfg.study.folds:
            c = unit_config(cfg, s, f)
            print(f"[study] unit seed={s} fold={f} ({c.run.name})", flush=True)
            d = alpha_sweep.run(c, address=address)
            u = {"seed": s, "fold": f, "dir": str(d), "trials": pd.read_parquet(d / "alpha_trials.parquet"),
                 "rec": json.loads((d / "recommendation.json").read_text())}
            if (d / "report_trials.parquet").exists():
                u["report_trials"] = pd.read_parquet(d / "report_trials.parquet")
            units.append(u)
    pooled = pool(units, cfg.sweep.bootstrap, cfg.run.seed)
    pooled.to_csv(out / "study_summary.csv", index=False)
    per_unit = pd.DataFrame([{"seed": u["seed"], "fold": u["fold"], "variant": v, "alpha": r.get("alpha"),
                              "selection_re_top5": r.get("mia_success_top5"),
                              "report_re_top5": u["rec"].get("report", {}).get(v, {}).get("mia_success_top5"),
                              "report_external_top5": u["rec"].get("report", {}).get(v, {}).get("external_top5"),
                              "accuracy": r.get("accuracy")}
                             for u in units for v, r in u["rec"]["variants"].items()])
    per_unit.to_csv(out / "study_units.csv", index=False)
    md = ["# Study: the α sweep over seeds x folds", "",
          f"seeds {cfg.study.seeds}, folds {cfg.study.folds}; estimates are means over units of the mean over "
          "targets; 95% CIs from a hierarchical bootstrap (units, then targets).", "",
          markdown_table(pooled), "", "## Units", "", markdown_table(per_unit)]
    (out / "study.md").write_text("\n".join(md))
    print(markdown_table(pooled))
    print(f"[study] outputs: {out}")
    return out
