"""The dummy-model defense end to end (Kotsuji & Nakamura): train what is missing (R_T,
R_E, G, F, R_dmy per variant), run the batched generator MIA over the α grid on Ray Tune
attack workers with an evaluator actor scoring top-5 hits, and write tables, plots and
the α recommendation.  Resumable: finished chunks of rows are kept under OUT/rows/."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import read_manifest, write_run_record
from ..config import alpha_grid
from ..data import load_bundle
from ..evaluation import accuracy_rows, judge_names, make_scorer, paired_differences, recommend, summarize
from ..kinds import BASE_KINDS, artifact_dir, dummy_kind
from ..paper import PAPER_DUMMY, dummy_headline
from ..report import alpha_sweep_plot, markdown_table, mia_grid
from ..runtime import out_dir, pick_device
from ..sweep import KEY, ChunkStore, chunk_id, load_sweep_models, plan_chunks, plan_rows, resolve_targets, rows_key


def render_grid(cfg, models, trials: pd.DataFrame, bundle, out: Path) -> Path:
    alphas_avail = sorted(trials["alpha"].unique(), reverse=True)
    grid_alphas = []
    for a in cfg.sweep.grid_alphas:       # nearest alpha of the grid actually swept
        near = min(alphas_avail, key=lambda x: abs(x - a))
        if near not in grid_alphas:
            grid_alphas.append(near)
    targets = sorted(trials["target"].unique())[:10]
    sel = trials[(trials["restart"] == 0) & trials["alpha"].isin(grid_alphas) & trials["target"].isin(targets)]
    recon = {}
    with torch.no_grad():
        for r in sel.itertuples():
            z = torch.tensor(r.latent, dtype=torch.float32)[None].to(models.device)   # a copy: parquet arrays are read-only
            recon[(r.variant, r.alpha, r.target)] = models.attacker_gen(z)[0].cpu()
    real = {t: bundle.private_train.x[bundle.private_train.y == t][0] for t in targets}
    anchors = {v: {t: x[models.anchor_labels[v] == t][0] for t in targets} for v, x in models.anchors.items()}
    return mia_grid(out / "mia_grid.png", targets, real, anchors, recon, grid_alphas,
                    list(cfg.sweep.variants), {t: bundle.class_names[t] for t in targets})


def sweep_rows(cfg, out: Path, bundle, address=None, label: str = "alpha_sweep") -> tuple[pd.DataFrame, dict]:
    """Attack every planned (variant, α, target, restart) row of ``cfg`` that is not done
    yet (Ray attack workers + the evaluator actor, resumable under OUT/rows/), and return
    (every planned row, scored; α = 0 floors when the evaluator ran)."""
    from ..distributed.training import ensure_artifacts
    ensure_artifacts(cfg, BASE_KINDS, address)
    ensure_artifacts(cfg, [dummy_kind(v).name for v in cfg.sweep.variants], address, label="dummy")
    rows = plan_rows(cfg, bundle.n_private)
    chunks = plan_chunks(rows, cfg.attack.batch_rows)
    rows_dir = out / "rows" / rows_key(cfg)
    store = ChunkStore(rows_dir)
    done = store.done()
    done_rows = sum(len(c) for c in chunks if chunk_id(c) in done)
    print(f"[{label}] {len(rows)} attack trials ({len(cfg.sweep.variants)} variants x {len(alpha_grid(cfg.sweep))} "
          f"alphas x {len(resolve_targets(cfg, bundle.n_private))} targets x {cfg.attack.restarts} restarts) in "
          f"{len(chunks)} chunks; {done_rows} rows already done", flush=True)
    floors = {}
    if done_rows < len(rows):
        from ..distributed.alpha_sweep import run_alpha_sweep
        from ..distributed.runtime import init_ray
        init_ray(cfg, address)
        floors = run_alpha_sweep(cfg, rows_dir, bundle.n_private, len(rows), done_rows)
    trials = store.read_all()
    plan_keys = set(map(tuple, rows[KEY].itertuples(index=False)))
    have = set(map(tuple, trials[KEY].itertuples(index=False))) if len(trials) else set()
    if plan_keys - have:
        raise RuntimeError(f"{len(plan_keys - have)} planned rows are missing after the sweep; rerun to resume")
    trials = trials[[tuple(k) in plan_keys for k in trials[KEY].itertuples(index=False)]].reset_index(drop=True)
    return trials, floors


def accuracy_table(cfg: Config, models, bundle, alphas, device) -> pd.DataFrame:
    """Accuracy of R' on R_T's held-out faces (the paper's test set) per (variant, α), with
    its drop against R_T and the drop's paired bootstrap CI."""
    return pd.DataFrame([{"variant": v, **r} for v, comb in models.combined.items()
                         for r in accuracy_rows(comb, bundle.private_test, alphas, device, cfg.sweep.bootstrap,
                                                cfg.run.seed)])


def report_config(cfg, rec: dict):
    """The report draw: a fresh R_dmy (``dummy.draw=1``: new anchors, new training seed)
    and restarts the selection never ran, at α = 1 and each variant's selected α."""
    c = copy.deepcopy(cfg)
    c.dummy.draw = cfg.dummy.draw + 1
    c.attack.restart_offset = cfg.attack.restart_offset + cfg.attack.restarts
    chosen = {1.0} | {float(r["alpha"]) for r in rec.values() if r.get("alpha") is not None}
    c.sweep.alphas = sorted(chosen, reverse=True)
    return c


def report_block(rec: dict, summary: pd.DataFrame, judges: list) -> dict:
    """Per variant: the report draw's numbers at the α the selection draw chose."""
    out = {}
    cols = ["mia_success_top5", "ci_low", "ci_high", "mia_best_restart_top5", "mia_success_top1", "accuracy"]
    cols += [f"{j}_{k}" for j in judges for k in ("top5", "ci_low", "ci_high", "best_restart_top5", "top1")]
    for v, r in rec.items():
        if r.get("alpha") is None:
            continue
        row = summary[(summary["variant"] == v) & (summary["alpha"] == float(r["alpha"]))]
        if len(row):
            out[v] = {"alpha": float(r["alpha"]), **{k: float(row.iloc[0][k]) for k in cols if k in row}}
    return out


def run(cfg, out=None, address=None) -> Path:
    """Run the whole α sweep for ``cfg`` (training what is missing); returns the output dir.

    The selection draw sweeps every α and picks one per variant; with
    ``sweep.report_draw`` the chosen α (and α = 1) are then measured again on a fresh
    draw (new R_dmy seed, new restarts): ``report_*`` files, and both numbers in
    recommendation.json, so the optimism of choosing is visible."""
    out = out_dir(cfg, out, "alpha_sweep")
    bundle = load_bundle(cfg.data)
    targets = resolve_targets(cfg, bundle.n_private)
    alphas = alpha_grid(cfg.sweep)
    write_run_record(out, cfg, {"targets": targets, "alphas": alphas})

    # every model both draws need, in one training phase (R_dmy starts as soon as G is done)
    from ..distributed.training import ensure_artifacts
    ensure_artifacts(cfg, list(BASE_KINDS) + [dummy_kind(v).name for v in cfg.sweep.variants], address,
                     draws=[cfg.dummy.draw + 1] if cfg.sweep.report_draw else [])
    trials, floors = sweep_rows(cfg, out, bundle, address)
    trials.to_parquet(out / "alpha_trials.parquet", index=False)
    device = pick_device(cfg.run.device)
    models = load_sweep_models(cfg, device)
    summary = summarize(trials, accuracy_table(cfg, models, bundle, alphas, device), cfg.sweep.bootstrap, cfg.run.seed)
    summary.to_csv(out / "alpha_summary.csv", index=False)
    judges = judge_names(trials)

    acc_rt = read_manifest(artifact_dir(cfg, "target"))["metrics"]["test_acc"]
    chance = min(1.0, 5.0 / bundle.n_eval)
    rec = recommend(summary, acc_rt, cfg.sweep.accuracy_tolerance, cfg.sweep.accuracy_rule)
    scorer = make_scorer(cfg, bundle, device, models.anchors, models.anchor_labels, judges=bool(judges))
    if not floors:
        floors = {v: scorer.anchor_floor(v) for v in cfg.sweep.variants}
    judge_acc = {n: j.accuracy(bundle.eval_test) for n, j in scorer.judges.items()}
    judge_acc["re"] = {"top1": float(read_manifest(artifact_dir(cfg, "evaluator"))["metrics"]["test_acc"]),
                       "n": len(bundle.eval_test)}
    info = {v: {"dmy_top_conf_real": models.dummy_meta[v]["metrics"]["dmy_top_conf_real"],
                "uniform_conf": models.dummy_meta[v]["metrics"]["uniform_conf"],
                "dmy_top_conf_anchor": models.dummy_meta[v]["metrics"]["dmy_top_conf_anchor"],
                "alpha0_floor_top5": floors.get(v)} for v in cfg.sweep.variants}
    paired = paired_differences(trials, cfg.sweep.variants, judges, cfg.sweep.bootstrap, cfg.run.seed)
    if len(paired):
        paired.to_csv(out / "paired_differences.csv", index=False)
    report = {}
    if cfg.sweep.report_draw and any(r.get("alpha") is not None for r in rec.values()):
        rcfg = report_config(cfg, rec)
        rtrials, _ = sweep_rows(rcfg, out, bundle, address, label="alpha_sweep report draw")
        rtrials.to_parquet(out / "report_trials.parquet", index=False)
        rmodels = load_sweep_models(rcfg, device)
        rsummary = summarize(rtrials, accuracy_table(rcfg, rmodels, bundle, alpha_grid(rcfg.sweep), device),
                             cfg.sweep.bootstrap, cfg.run.seed)
        rsummary.to_csv(out / "report_summary.csv", index=False)
        report = report_block(rec, rsummary, judges)
        report["draw"] = {"dummy.draw": rcfg.dummy.draw, "restarts": [rcfg.attack.restart_offset,
                                                                      rcfg.attack.restart_offset + rcfg.attack.restarts]}
    recommendation = {"accuracy_rt": acc_rt, "tolerance": cfg.sweep.accuracy_tolerance,
                      "accuracy_rule": cfg.sweep.accuracy_rule, "top5_chance": chance,
                      "n_eval_classes": bundle.n_eval, "selected_by": "R_E top-5 on the selection draw",
                      "variants": rec, "report": report, "judges": judge_acc, "dummy": info, "paper": PAPER_DUMMY}
    (out / "recommendation.json").write_text(json.dumps(recommendation, indent=2, default=float))
    alpha_sweep_plot(summary, out / "alpha_sweep.png", acc_rt, chance,
                     f"{bundle.name}: {len(targets)} targets x {cfg.attack.restarts} restarts (selection draw)")
    render_grid(cfg, models, trials, bundle, out)
    print_results(summary, rec, report, info, judge_acc, judges, acc_rt, chance)
    print(f"[alpha_sweep] outputs: {out}")
    return out


def print_results(summary, rec, report, info, judge_acc, judges, acc_rt, chance) -> None:
    cols = ["variant", "alpha", "mia_success_top5", "ci_low", "ci_high"] + [f"{j}_top5" for j in judges] + [
        "mia_best_restart_top5", "accuracy", "dist_private", "dist_anchor"]
    print(markdown_table(summary[[c for c in cols if c in summary]]))
    print(f"[alpha_sweep] R_T accuracy {acc_rt:.3f}; top-5 chance {chance:.3f}; {dummy_headline()}")
    print("[alpha_sweep] judges on held-out real faces: " + "; ".join(
        f"{n} top-1 {a['top1']:.1%}" + (f" top-5 {a['top5']:.1%}" if "top5" in a else "") for n, a in judge_acc.items()))
    for v, r in rec.items():
        conf = info[v]["dmy_top_conf_real"]
        if r.get("alpha") is None:
            print(f"[alpha_sweep] {v}: {r['reason']} (R_dmy top confidence on real faces {conf:.3f})")
            continue
        sel = "; ".join([f"R_E {r['mia_success_top5']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}]"] +
                        [f"{j} {r[f'{j}_top5']:.1%} [{r[f'{j}_ci_low']:.1%}, {r[f'{j}_ci_high']:.1%}]" for j in judges])
        print(f"[alpha_sweep] {v}: selected alpha={r['alpha']:.2f} (accuracy {r['accuracy']:.1%}); MIA top-5 on the "
              f"selection draw: {sel}; R_dmy top confidence on real faces {conf:.3f} (1/n = {info[v]['uniform_conf']:.3f})")
        if v in report:
            q = report[v]
            rep = "; ".join([f"R_E {q['mia_success_top5']:.1%} [{q['ci_low']:.1%}, {q['ci_high']:.1%}]"] +
                            [f"{j} {q[f'{j}_top5']:.1%} [{q[f'{j}_ci_low']:.1%}, {q[f'{j}_ci_high']:.1%}]" for j in judges])
            print(f"[alpha_sweep] {v}: REPORT draw at alpha={q['alpha']:.2f} (accuracy {q['accuracy']:.1%}): {rep}")
