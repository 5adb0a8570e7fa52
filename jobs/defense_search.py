"""Defense search with the attack in the loop: a Ray Tune search over the dummy-model
defense's design (σ̃², σ², m, calibration weight, R_dmy's epochs, anchors per class,
anchor choice, combination rule), every trial training its R_dmy and running the batched
generator MIA over the α grid, scored by the evaluator actor; Optuna TPE proposes, ASHA
stops hopeless defenses after their first restart round.  Then the best defense and the
paper-recipe / calibrated baselines are checked with several seeds against the naive and
an adaptive (expectation-over-transformation) attacker.

    python jobs/defense_search.py [--preset orl] [--set search.num_samples=20] [--out DIR]
    ray job submit --working-dir . -- python jobs/defense_search.py

Resumable: both Tune experiments live under OUT/tune/ and a rerun continues them."""
import _bootstrap  # noqa: F401

import json
import math
import os
from pathlib import Path

import pandas as pd
import yaml

from raymia import cli
from raymia.artifacts import write_run_record
from raymia.config import ConfigError
from raymia.distributed import init_ray, make_evaluator_actor, resolve_out_root, run_defense_trials
from raymia.report import PAPER_DUMMY, markdown_table, pareto_plot
from raymia.search import PARAM_KEYS, baselines, pareto_front, search_space, trial_params
from train import train_base

SUMMARY_COLS = ["objective", "feasible", "best_alpha", "best_mia_success_top5", "best_ci_low", "best_ci_high",
                "best_mia_best_restart_top5", "best_accuracy", "acc_rt", "dmy_top_conf_real"]


def _frame(grid, kind: str) -> pd.DataFrame:
    rows = []
    for r in grid:
        if r.metrics is None or "objective" not in r.metrics:
            continue
        c = r.config
        params = trial_params(c)
        rows.append({"kind": kind, "trial_id": r.metrics.get("trial_id"), "defense": c.get("defense", "search"),
                     "seed": c.get("seed"), "adaptive": bool(c.get("adaptive", False)),
                     **{f"p_{k}": v for k, v in params.items()},
                     **{k: v for k, v in r.metrics.items() if k == "round" or k in SUMMARY_COLS or "@" in k}})
    return pd.DataFrame(rows)


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
    root = resolve_out_root(cfg)
    out = Path(out).expanduser().resolve() if out else root / cfg.run.name / "defense_search"
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg, {"preset": preset, "check_only": check_only, "local": local})
    if local:
        if not check_only:
            raise ConfigError("--local runs only the check (the search itself runs on Ray Tune): add --check-only")
        return _check_and_report(cfg, preset, out, _load_trials(out), run_local_check)
    train_base(cfg, address)
    init_ray(cfg, address)
    import ray
    namespace = f"raymia-search-{os.getpid()}"
    evaluator = make_evaluator_actor(cfg, 0, 0, "evaluator", namespace, sweep_anchors=False)
    try:
        trials = _load_trials(out) if check_only else search(cfg, out, namespace)
        if search_only:
            best, params = best_of(trials, cfg)
            print(f"[defense_search] best defense: {params} objective {best['objective']:.3f}; "
                  f"check it with --check-only [--local]", flush=True)
            return out
        return _check_and_report(cfg, preset, out, trials,
                                 lambda c, o, combos: run_tune_check(c, o, combos, namespace))
    finally:
        ray.kill(evaluator)


def _load_trials(out: Path) -> pd.DataFrame:
    path = out / "search_trials.parquet"
    if not path.exists():
        raise ConfigError(f"--check-only needs a finished search: {path} is missing (run without --check-only first)")
    return pd.read_parquet(path)


def search(cfg, out: Path, namespace: str) -> pd.DataFrame:
    common = {"cfg": cfg.to_dict(), "adaptive": False, "seed": cfg.run.seed}
    print(f"[defense_search] searching {cfg.search.num_samples} defenses over alphas {cfg.search.alphas}", flush=True)
    space = search_space(cfg)
    searchable = [k for k, v in space.items() if hasattr(v, "sample")]
    start = {k: v for k, v in baselines(cfg)["calibrated"].items() if k in searchable}   # TPE starts from it
    points = [start] if all(_inside(space[k], v) for k, v in start.items()) else []
    grid = run_defense_trials(cfg, {**common, **space}, out, "search", "evaluator", namespace,
                              num_samples=cfg.search.num_samples, search=True, points=points)
    trials = _frame(grid, "search")
    if trials.empty:
        raise RuntimeError("no search trial finished a round; see the Tune log under " + str(out / "tune"))
    trials.to_parquet(out / "search_trials.parquet", index=False)
    trials.to_csv(out / "search_trials.csv", index=False)      # for readers without pyarrow
    return trials


def _inside(domain, value) -> bool:
    """Whether ``value`` lies in a Tune domain (categorical, or numeric [lower, upper])."""
    if hasattr(domain, "categories"):
        return value in domain.categories
    return domain.lower <= value <= domain.upper


def best_of(trials: pd.DataFrame, cfg) -> tuple[pd.Series, dict]:
    """The search's best defense: lowest objective among trials that ran every round
    (ASHA stops the others early), ties to the higher accuracy."""
    full = trials[trials["round"] == cfg.attack.restarts]
    pool = full if not full.empty else trials
    best = pool.sort_values(["objective", "best_accuracy"], ascending=[True, False]).iloc[0]
    return best, _params_of(best)


def check_combos(cfg, candidates: dict) -> list[dict]:
    return [{"defense": n, "params": p, "seed": s, "adaptive": a}
            for n, p in candidates.items() for s in cfg.search.seeds for a in (False, True)]


def _check_row(combo: dict, metrics: dict) -> dict:
    return {"defense": combo["defense"], "seed": combo["seed"], "attacker": "adaptive" if combo["adaptive"] else "naive",
            **{k: v for k, v in metrics.items() if k in SUMMARY_COLS or "@" in k}}


def run_tune_check(cfg, out: Path, combos: list, namespace: str) -> pd.DataFrame:
    from ray import tune
    grid = run_defense_trials(cfg, {"cfg": cfg.to_dict(), "check": tune.grid_search(combos)}, out, "check",
                              "evaluator", namespace)
    return pd.DataFrame([_check_row(r.config["check"], r.metrics) for r in grid
                         if r.metrics and "objective" in r.metrics])


def run_local_check(cfg, out: Path, combos: list) -> pd.DataFrame:
    """The check without Ray: one defense after another in this process (resumable per
    combination through OUT/check_local/)."""
    from raymia.search import DefenseEvaluator, load_base, make_scorer
    from raymia.training import pick_device
    device = pick_device(cfg.run.device)
    base = load_base(cfg, device)
    scorer = make_scorer(cfg, base.bundle, device)
    done_dir = out / "check_local"
    done_dir.mkdir(exist_ok=True)
    rows = []
    for i, combo in enumerate(combos):
        key = f"{combo['defense']}-s{combo['seed']}-{'adaptive' if combo['adaptive'] else 'naive'}"
        path = done_dir / f"{key}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        ev = DefenseEvaluator(base, combo["params"], combo["seed"], key, combo["adaptive"],
                              score=lambda imgs, t, k, a: scorer.score(imgs, t, k), add_anchors=scorer.add_anchors)
        for r in range(ev.rounds):
            ev.run_round(r)
        row = _check_row(combo, ev.result())
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
          f"Paper headline: MIA ≤ {PAPER_DUMMY['mia_success_at_recommended']:.0%} at α=0.25 with accuracy > 95% "
          f"(R_T {PAPER_DUMMY['rt_accuracy']:.1%}).", "", "## Check (mean over seeds)", "",
          markdown_table(report), "", "## Best defense", "", "```yaml", (out / "best_defense.yaml").read_text(), "```"]
    (out / "search_report.md").write_text("\n".join(md))
    print(markdown_table(report))
    print(f"[defense_search] outputs: {out}")
    return out


def summarize_check(check: pd.DataFrame, cfg) -> pd.DataFrame:
    """Mean over seeds per (defense, attacker), with the spread of the per-seed values.
    A defense is labelled 'naive-only' when the adaptive attacker's success lies above the
    upper end of the naive attacker's 95% CI (bootstrap over targets, mean over seeds)."""
    rows = []
    for (d, att), g in check.groupby(["defense", "attacker"], sort=False):
        rows.append({"defense": d, "attacker": att, "seeds": len(g), "feasible": bool(g["feasible"].all()),
                     "best_alpha": float(g["best_alpha"].median()),
                     "mia_top5": float(g["best_mia_success_top5"].mean()),
                     "mia_top5_sd": float(g["best_mia_success_top5"].std(ddof=0)),
                     "ci_low": float(g["best_ci_low"].mean()), "ci_high": float(g["best_ci_high"].mean()),
                     "mia_best_restart": float(g["best_mia_best_restart_top5"].mean()),
                     "accuracy": float(g["best_accuracy"].mean()), "acc_rt": float(g["acc_rt"].mean())})
    out = pd.DataFrame(rows)
    labels = {}
    for d, g in out.groupby("defense"):
        if {"naive", "adaptive"} <= set(g["attacker"]):
            n = g[g["attacker"] == "naive"].iloc[0]
            a = g[g["attacker"] == "adaptive"].iloc[0]
            labels[d] = "naive-only" if a["mia_top5"] > n["ci_high"] else "holds vs adaptive"
    out["label"] = out["defense"].map(labels)
    return out


def main():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output directory (default: <out_root>/<run.name>/defense_search)")
    p.add_argument("--check-only", action="store_true", help="skip the search; check the best of OUT/search_trials.parquet")
    p.add_argument("--local", action="store_true", help="with --check-only: run the check in this process, no Ray")
    p.add_argument("--search-only", action="store_true", help="stop after the search (check later with --check-only)")
    args = p.parse_args()
    run(cli.config_from_args(args), args.preset, args.out, args.address, args.check_only, args.local,
        args.search_only)


if __name__ == "__main__":
    cli.run_main(main)
