"""Defense search with the attack in the loop: a Ray Tune search over the dummy-model
defense's design (σ̃², σ², m, calibration weight, R_dmy's epochs, anchors per class,
anchor choice, combination rule), every trial training its R_dmy and running the batched
generator MIA over the α grid, scored by the evaluator actor; Optuna TPE proposes, ASHA
stops hopeless defenses after their first restart round.  Then the best defense and the
paper-recipe / calibrated baselines are checked with several seeds against the naive and
an adaptive (expectation-over-transformation) attacker.  Resumable: both Tune
experiments live under OUT/tune/ and a rerun continues them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..artifacts import write_run_record
from ..config import ConfigError
from ..evaluation import hierarchical_bootstrap, make_scorer
from ..kinds import BASE_KINDS
from ..paper import dummy_headline
from ..report import markdown_table, pareto_plot
from ..runtime import out_dir, pick_device
from ..search import PARAM_KEYS, SUMMARY_COLS, DefenseEvaluator, baselines, load_base, pareto_front

def _params_of(row: pd.Series) -> dict:
    out = {}
    for k in PARAM_KEYS:
        v = row.get(f"p_{k}")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def best_defense_yaml(preset: str, params: dict, alpha: float, path: Path) -> None:
    """A preset the α sweep and the Serve app accept: the orl (or given) preset plus the
    defense found, serving at its best α."""
    dummy = {k: params[k] for k in ("variant", "sigma2", "sigma_tilde2", "m", "calib_weight", "epochs",
                                    "anchors_per_class", "anchor_choice") if k in params}
    doc = {"extends": preset, "dummy": dummy,
           "combine": {"rule": params.get("rule", "linear"), "gate_tau": float(params.get("gate_tau", 0.5))},
           "sweep": {"variants": [params.get("variant", "calibrated")]},
           "serve": {"variant": params.get("variant", "calibrated"), "alpha": float(alpha)}}
    header = ("# Found by jobs/defense_search.py: use with --preset PATH (alpha sweep, Serve app).\n")
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))


def run(cfg, preset: str = "orl", out=None, address=None, check_only: bool = False, local: bool = False,
        search_only: bool = False) -> Path:
    """Search (Tune), then check the best defense and the baselines over seeds and
    attackers.  ``check_only`` reuses OUT/search_trials.parquet; ``local`` runs the check
    in this process without Ray (same library code; e.g. on a GPU box without Ray);
    ``search_only`` stops after the search."""
    if cfg.run.seed in cfg.search.seeds:
        raise ConfigError(f"search.seeds {cfg.search.seeds} must not contain run.seed {cfg.run.seed}: the check "
                          "reports on seeds the search did not select on")
    out = out_dir(cfg, out, "defense_search")
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg, {"preset": preset, "check_only": check_only, "local": local})
    if local:
        if not check_only:
            raise ConfigError("--local runs only the check (the search itself runs on Ray Tune): add --check-only")
        return _check_and_report(cfg, preset, out, _load_trials(out), run_local_check)
    from ..distributed import defense_search as dist
    from ..distributed.training import ensure_artifacts
    ensure_artifacts(cfg, BASE_KINDS, address)
    with dist.evaluator_session(cfg, address) as namespace:
        trials = _load_trials(out) if check_only else _save_trials(dist.run_search(cfg, out, namespace), out)
        if search_only:
            best, params = best_of(trials, cfg)
            print(f"[defense_search] best defense: {params} objective {best['objective']:.3f}; "
                  f"check it with --check-only [--local]", flush=True)
            return out
        return _check_and_report(cfg, preset, out, trials,
                                 lambda c, o, combos: dist.run_check(c, o, combos, namespace, check_row))


def _save_trials(trials: pd.DataFrame, out: Path) -> pd.DataFrame:
    trials.to_parquet(out / "search_trials.parquet", index=False)
    trials.to_csv(out / "search_trials.csv", index=False)      # for readers without pyarrow
    return trials


def _load_trials(out: Path) -> pd.DataFrame:
    path = out / "search_trials.parquet"
    if not path.exists():
        raise ConfigError(f"--check-only needs a finished search: {path} is missing (run without --check-only first)")
    return pd.read_parquet(path)


def best_of(trials: pd.DataFrame, cfg) -> tuple[pd.Series, dict]:
    """The search's best defense: lowest objective among trials that ran every round
    (ASHA stops the others early), ties to the higher accuracy."""
    full = trials[trials["round"] == cfg.attack.restarts]
    pool = full if not full.empty else trials
    best = pool.sort_values(["objective", "best_accuracy"], ascending=[True, False]).iloc[0]
    return best, _params_of(best)


#: the check's name of each attacker (``search.check_attacks``): the paper's white-box attack is the
#: 'naive' one the deployed α is chosen against, its EOT version the 'adaptive' one
ATTACKER = {"whitebox": "naive", "eot": "adaptive", "nes": "nes", "label": "label"}


def check_combos(cfg, candidates: dict) -> list[dict]:
    return [{"defense": n, "params": p, "seed": s, "attack": a}
            for n, p in candidates.items() for s in cfg.search.seeds for a in cfg.search.check_attacks]


def check_row(combo: dict, metrics: dict) -> dict:
    return {"defense": combo["defense"], "seed": combo["seed"], "attacker": ATTACKER[combo["attack"]],
            **{k: v for k, v in metrics.items() if k in SUMMARY_COLS or "@" in k}}


def run_local_check(cfg, out: Path, combos: list) -> pd.DataFrame:
    """The check without Ray: one defense after another in this process (resumable per
    combination through OUT/check_local/)."""
    device = pick_device(cfg.run.device)
    base = load_base(cfg, device)
    scorer = make_scorer(cfg, base.bundle, device)
    done_dir = out / "check_local"
    done_dir.mkdir(exist_ok=True)
    rows = []
    for i, combo in enumerate(combos):
        key = f"{combo['defense']}-s{combo['seed']}-{ATTACKER[combo['attack']]}"
        path = done_dir / f"{key}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        ev = DefenseEvaluator(base, combo["params"], combo["seed"], key, combo["attack"],
                              score=lambda imgs, t, k, a: scorer.score(imgs, t, k), add_anchors=scorer.add_anchors)
        for r in range(ev.rounds):
            ev.run_round(r)
        row = check_row(combo, ev.result())
        path.write_text(json.dumps(row, default=float))
        rows.append(row)
        print(f"[defense_search] check {i + 1}/{len(combos)} {key}: objective {row['objective']:.3f} "
              f"(alpha {row['best_alpha']})", flush=True)
    return pd.DataFrame(rows)


def _check_and_report(cfg, preset: str, out: Path, trials: pd.DataFrame, runner) -> Path:
    best, best_params = best_of(trials, cfg)
    print(f"[defense_search] best defense: {best_params} objective {best['objective']:.3f}", flush=True)
    combos = check_combos(cfg, {"best": best_params, **baselines(cfg)})
    print(f"[defense_search] checking {len(combos)} (defense, seed, attacker) combinations", flush=True)
    check = runner(cfg, out, combos)
    check.to_parquet(out / "check_trials.parquet", index=False)
    report = summarize_check(check, cfg)
    report.to_csv(out / "check_summary.csv", index=False)

    points = []
    for df, label in ((trials, "search"), (check[check["attacker"] == "naive"], "check")):
        for _, r in df.iterrows():
            for a in cfg.search.alphas:
                k = f"{a:g}"
                if f"mia_top5@{k}" in r and not pd.isna(r[f"mia_top5@{k}"]):
                    points.append({"source": label, "defense": r.get("defense", "search"), "alpha": a,
                                   "mia_success_top5": r[f"mia_top5@{k}"], "accuracy": r[f"acc@{k}"]})
    points = pd.DataFrame(points)
    front = pareto_front(points)
    acc_rt = float(trials["acc_rt"].iloc[0])
    pareto_plot(points, front, out / "pareto.png", acc_rt, cfg.sweep.accuracy_tolerance)
    checked = check[(check["defense"] == "best") & (check["attacker"] == "naive")]["best_alpha"].dropna()
    alpha = float(checked.median()) if len(checked) else (   # the check's seeds decide the served α
        float(best["best_alpha"]) if not pd.isna(best["best_alpha"]) else float(cfg.search.alphas[0]))
    alpha = min(cfg.search.alphas, key=lambda a: abs(a - alpha))
    best_defense_yaml(preset, best_params, alpha, out / "best_defense.yaml")
    md = ["# Defense search", "", f"R_T accuracy {acc_rt:.3f}; objective: per-trial top-5 MIA success at the best α "
          f"with accuracy ≥ R_T − {cfg.sweep.accuracy_tolerance:.2f}.", "",
          f"Paper headline ({dummy_headline()}).", "", "## Check (mean over seeds)", "",
          markdown_table(report), "", "## Best defense", "", "```yaml", (out / "best_defense.yaml").read_text(), "```"]
    (out / "search_report.md").write_text("\n".join(md))
    print(markdown_table(report))
    print(f"[defense_search] outputs: {out}")
    return out


def summarize_check(check: pd.DataFrame, cfg) -> pd.DataFrame:
    """Per (defense, attacker) over the check's seeds (disjoint from the search's seed).

    ``mia_top5`` with ``ci_low/ci_high``: success at each seed's own best α, the CI a
    hierarchical bootstrap (seeds, then targets within seeds).  ``deployed_alpha``: the α
    the defender deploys, chosen against the naive attacker (median of its per-seed best
    α, on the grid); every attacker -- the adaptive one too -- is reported there as well
    (``*_deployed``), by R_E and by each independent judge.  A defense is labelled
    'naive-only' when the adaptive attacker's success at the deployed α lies above the
    upper end of the naive attacker's CI there."""
    alphas = list(cfg.search.alphas)
    deployed = {}
    for d, g in check[check["attacker"] == "naive"].groupby("defense"):
        a = g["best_alpha"].dropna()
        deployed[d] = min(alphas, key=lambda x: abs(x - float(a.median()))) if len(a) else float(alphas[0])
    judges = sorted({c.split("_targets@")[0] for c in check.columns if "_targets@" in c})
    rows = []
    for (d, att), g in check.groupby(["defense", "attacker"], sort=False):
        own = [np.asarray(r[f"targets@{r['best_alpha']:g}"], float) for _, r in g.iterrows()
               if not pd.isna(r["best_alpha"]) and isinstance(r.get(f"targets@{r['best_alpha']:g}"), (list, np.ndarray))]
        est, lo, hi = hierarchical_bootstrap(own, cfg.sweep.bootstrap, cfg.run.seed)
        dep = deployed.get(d, float(alphas[0]))
        row = {"defense": d, "attacker": att, "seeds": len(g), "feasible": bool(g["feasible"].all()),
               "best_alpha": float(g["best_alpha"].median()),
               "mia_top5": float(g["best_mia_success_top5"].mean()),
               "mia_top5_sd": float(g["best_mia_success_top5"].std(ddof=0)), "ci_low": lo, "ci_high": hi,
               "mia_best_restart": float(g["best_mia_best_restart_top5"].mean()),
               "accuracy": float(g["best_accuracy"].mean()), "acc_rt": float(g["acc_rt"].mean()),
               "deployed_alpha": dep}
        for judge, col in [("re", "targets"), *[(j, f"{j}_targets") for j in judges]]:
            per_seed = [np.asarray(v, float) for v in g.get(f"{col}@{dep:g}", pd.Series(dtype=object))
                        if isinstance(v, (list, np.ndarray))]
            e, l, h = hierarchical_bootstrap(per_seed, cfg.sweep.bootstrap, cfg.run.seed)
            name = "mia_top5" if judge == "re" else f"{judge}_top5"
            row.update({f"{name}_deployed": e, f"{name}_deployed_ci_low": l, f"{name}_deployed_ci_high": h})
        rows.append(row)
    out = pd.DataFrame(rows)
    labels = {}
    for d, g in out.groupby("defense"):
        if {"naive", "adaptive"} <= set(g["attacker"]):
            n = g[g["attacker"] == "naive"].iloc[0]
            a = g[g["attacker"] == "adaptive"].iloc[0]
            labels[d] = ("naive-only" if a["mia_top5_deployed"] > n["mia_top5_deployed_ci_high"]
                         else "holds vs adaptive")
    out["label"] = out["defense"].map(labels)
    return out
