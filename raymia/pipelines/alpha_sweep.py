"""The dummy-model defense end to end (Kotsuji & Nakamura): train what is missing (R_T,
R_E, G, F, R_dmy per variant), run the batched generator MIA over the α grid on Ray Tune
attack workers with an evaluator actor scoring top-5 hits, and write tables, plots and
the α recommendation.  Resumable: finished chunks of rows are kept under OUT/rows/."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import read_manifest, write_run_record
from ..config import alpha_grid
from ..data import load_bundle
from ..evaluation import accuracy_by_alpha, make_scorer, recommend, summarize
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
            z = torch.as_tensor(r.latent, dtype=torch.float32)[None].to(models.device)
            recon[(r.variant, r.alpha, r.target)] = models.attacker_gen(z)[0].cpu()
    real = {t: bundle.private_train.x[bundle.private_train.y == t][0] for t in targets}
    anchors = {v: {t: x[models.anchor_labels[v] == t][0] for t in targets} for v, x in models.anchors.items()}
    return mia_grid(out / "mia_grid.png", targets, real, anchors, recon, grid_alphas,
                    list(cfg.sweep.variants), {t: bundle.class_names[t] for t in targets})


def run(cfg, out=None, address=None) -> Path:
    """Run the whole α sweep for ``cfg`` (training what is missing); returns the output dir."""
    out = out_dir(cfg, out, "alpha_sweep")
    bundle = load_bundle(cfg.data)
    targets = resolve_targets(cfg, bundle.n_private)
    alphas = alpha_grid(cfg.sweep)
    write_run_record(out, cfg, {"targets": targets, "alphas": alphas})

    from ..distributed.training import ensure_artifacts
    ensure_artifacts(cfg, BASE_KINDS, address)
    ensure_artifacts(cfg, [dummy_kind(v).name for v in cfg.sweep.variants], address, label="dummy")

    rows = plan_rows(cfg, bundle.n_private)
    chunks = plan_chunks(rows, cfg.attack.batch_rows)
    rows_dir = out / "rows" / rows_key(cfg)
    store = ChunkStore(rows_dir)
    done = store.done()
    done_rows = sum(len(c) for c in chunks if chunk_id(c) in done)
    print(f"[alpha_sweep] {len(rows)} attack trials ({len(cfg.sweep.variants)} variants x {len(alphas)} alphas x "
          f"{len(targets)} targets x {cfg.attack.restarts} restarts) in {len(chunks)} chunks; "
          f"{done_rows} rows already done", flush=True)
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
    trials.to_parquet(out / "alpha_trials.parquet", index=False)

    device = pick_device(cfg.run.device)
    models = load_sweep_models(cfg, device)
    acc_rows = []
    for v, comb in models.combined.items():
        for a, acc in accuracy_by_alpha(comb, bundle.private_test, alphas, device).items():
            acc_rows.append({"variant": v, "alpha": a, "accuracy": acc})
    summary = summarize(trials, pd.DataFrame(acc_rows), cfg.sweep.bootstrap, cfg.run.seed)
    summary.to_csv(out / "alpha_summary.csv", index=False)

    acc_rt = read_manifest(artifact_dir(cfg, "target"))["metrics"]["test_acc"]
    chance = min(1.0, 5.0 / bundle.n_eval)
    rec = recommend(summary, acc_rt, cfg.sweep.accuracy_tolerance)
    if not floors:
        scorer = make_scorer(cfg, bundle, device, models.anchors, models.anchor_labels)
        floors = {v: scorer.anchor_floor(v) for v in cfg.sweep.variants}
    info = {v: {"dmy_top_conf_real": models.dummy_meta[v]["metrics"]["dmy_top_conf_real"],
                "uniform_conf": models.dummy_meta[v]["metrics"]["uniform_conf"],
                "dmy_top_conf_anchor": models.dummy_meta[v]["metrics"]["dmy_top_conf_anchor"],
                "alpha0_floor_top5": floors.get(v)} for v in cfg.sweep.variants}
    recommendation = {"accuracy_rt": acc_rt, "tolerance": cfg.sweep.accuracy_tolerance, "top5_chance": chance,
                      "n_eval_classes": bundle.n_eval, "variants": rec, "dummy": info, "paper": PAPER_DUMMY}
    (out / "recommendation.json").write_text(json.dumps(recommendation, indent=2, default=float))
    alpha_sweep_plot(summary, out / "alpha_sweep.png", acc_rt, chance,
                     f"{bundle.name}: {len(targets)} targets x {cfg.attack.restarts} restarts, R_E top-5")
    render_grid(cfg, models, trials, bundle, out)

    cols = ["variant", "alpha", "mia_success_top5", "ci_low", "ci_high", "mia_best_restart_top5",
            "mia_success_top1", "accuracy", "dist_private", "dist_anchor"]
    print(markdown_table(summary[cols]))
    print(f"[alpha_sweep] R_T accuracy {acc_rt:.3f}; top-5 chance {chance:.3f}; {dummy_headline()}")
    for v, r in rec.items():
        conf = info[v]["dmy_top_conf_real"]
        if r.get("alpha") is None:
            print(f"[alpha_sweep] {v}: {r['reason']} (R_dmy top confidence on real faces {conf:.3f})")
        else:
            print(f"[alpha_sweep] {v}: recommended alpha={r['alpha']:.2f}: MIA top-5 {r['mia_success_top5']:.1%} "
                  f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}], accuracy {r['accuracy']:.1%}; "
                  f"R_dmy top confidence on real faces {conf:.3f} (1/n = {info[v]['uniform_conf']:.3f})")
    print(f"[alpha_sweep] outputs: {out}")
    return out
