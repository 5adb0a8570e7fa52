"""The dummy-model defense end to end (Kotsuji & Nakamura): train what is missing (R_T,
R_E, G, F, R_dmy per variant), run the batched generator MIA over the α grid on Ray Tune
attack workers with an evaluator actor scoring top-5 hits, and write tables, plots and
the α recommendation.  Resumable: finished chunks of rows are kept under OUT/rows/.

``sweep.attacks`` adds the attack dimension: the same rows attacked by the EOT, black-box
and label-only attackers too, judged by every judge; α is still selected on the first
attack (the paper's white-box one), and each attack's success at α = 1 and at the selected
α, on both draws, goes to attack_summary.csv, attack_effects.csv and attack_panel.md."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import read_manifest, write_run_record
from ..config import alpha_grid
from ..data import load_bundle
from ..evaluation import (accuracy_rows, defense_effects, judge_columns, judge_names, make_scorer, paired_differences,
                          recommend, summarize, summarize_attacks)
from ..kinds import BASE_KINDS, artifact_dir, dummy_kind
from ..paper import PAPER_DUMMY, dummy_headline
from ..report import alpha_sweep_plot, markdown_table, mia_grid
from ..runtime import out_dir, pick_device
from ..sweep import (TRIAL_KEY, ChunkStore, chunk_attack, chunk_id, load_sweep_models, plan_chunks, plan_rows,
                     resolve_targets, rows_dirs)


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
    """Attack every planned (attack, variant, α, target, restart) row of ``cfg`` that is not
    done yet (Ray attack workers + the evaluator actor, resumable under OUT/rows/, one chunk
    store per attack), and return (every planned row, scored; α = 0 floors when the
    evaluator ran)."""
    from ..distributed.training import ensure_artifacts
    ensure_artifacts(cfg, BASE_KINDS, address)
    ensure_artifacts(cfg, [dummy_kind(v).name for v in cfg.sweep.variants], address, label="dummy")
    rows = plan_rows(cfg, bundle.n_private)
    chunks = plan_chunks(rows, cfg.attack.batch_rows)
    dirs = rows_dirs(cfg, out / "rows")
    stores = {k: ChunkStore(d) for k, d in dirs.items()}
    done = {k: st.done() for k, st in stores.items()}
    done_rows = sum(len(c) for c in chunks if chunk_id(c) in done[chunk_attack(c)])
    print(f"[{label}] {len(rows)} attack trials ({len(cfg.sweep.attacks)} attacks ({', '.join(cfg.sweep.attacks)}) x "
          f"{len(cfg.sweep.variants)} variants x {len(alpha_grid(cfg.sweep))} alphas x "
          f"{len(resolve_targets(cfg, bundle.n_private))} targets x {cfg.attack.restarts} restarts) in "
          f"{len(chunks)} chunks; {done_rows} rows already done", flush=True)
    floors = {}
    if done_rows < len(rows):
        from ..distributed.alpha_sweep import run_alpha_sweep
        from ..distributed.runtime import init_ray
        init_ray(cfg, address)
        floors = run_alpha_sweep(cfg, dirs, bundle.n_private, len(rows), done_rows)
    parts = [st.read_all().assign(attack=k) for k, st in stores.items()]
    trials = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()
    plan_keys = set(map(tuple, rows[TRIAL_KEY].itertuples(index=False)))
    have = set(map(tuple, trials[TRIAL_KEY].itertuples(index=False))) if len(trials) else set()
    if plan_keys - have:
        raise RuntimeError(f"{len(plan_keys - have)} planned rows are missing after the sweep; rerun to resume")
    trials = trials[[tuple(k) in plan_keys for k in trials[TRIAL_KEY].itertuples(index=False)]].reset_index(drop=True)
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
    all_trials, floors = sweep_rows(cfg, out, bundle, address)
    primary = cfg.sweep.attacks[0]          # α is selected on this attack (the paper's: whitebox)
    trials = only_attack(all_trials, primary)
    trials.to_parquet(out / "alpha_trials.parquet", index=False)
    device = pick_device(cfg.run.device)
    models = load_sweep_models(cfg, device)
    acc = accuracy_table(cfg, models, bundle, alphas, device)
    summary = summarize(trials, acc, cfg.sweep.bootstrap, cfg.run.seed)
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
    report, draws = {}, {"selection": (all_trials, acc)}
    if cfg.sweep.report_draw and any(r.get("alpha") is not None for r in rec.values()):
        rcfg = report_config(cfg, rec)
        all_rtrials, _ = sweep_rows(rcfg, out, bundle, address, label="alpha_sweep report draw")
        rtrials = only_attack(all_rtrials, primary)
        rtrials.to_parquet(out / "report_trials.parquet", index=False)
        rmodels = load_sweep_models(rcfg, device)
        racc = accuracy_table(rcfg, rmodels, bundle, alpha_grid(rcfg.sweep), device)
        draws["report"] = (all_rtrials, racc)
        rsummary = summarize(rtrials, racc, cfg.sweep.bootstrap, cfg.run.seed)
        rsummary.to_csv(out / "report_summary.csv", index=False)
        report = report_block(rec, rsummary, judges)
        report["draw"] = {"dummy.draw": rcfg.dummy.draw, "restarts": [rcfg.attack.restart_offset,
                                                                      rcfg.attack.restart_offset + rcfg.attack.restarts]}
    attack_block = attack_panel(cfg, draws, rec, judges, out)
    recommendation = {"accuracy_rt": acc_rt, "tolerance": cfg.sweep.accuracy_tolerance,
                      "accuracy_rule": cfg.sweep.accuracy_rule, "top5_chance": chance,
                      "n_eval_classes": bundle.n_eval, "selected_by": f"R_E top-5 of the {primary} attack on the "
                                                                      "selection draw",
                      "variants": rec, "report": report, "attacks": attack_block, "judges": judge_acc,
                      "dummy": info, "paper": PAPER_DUMMY}
    (out / "recommendation.json").write_text(json.dumps(recommendation, indent=2, default=float))
    alpha_sweep_plot(summary, out / "alpha_sweep.png", acc_rt, chance,
                     f"{bundle.name}: {len(targets)} targets x {cfg.attack.restarts} restarts (selection draw)")
    render_grid(cfg, models, trials, bundle, out)
    print_results(summary, rec, report, info, judge_acc, judges, acc_rt, chance)
    if len(cfg.sweep.attacks) > 1:
        print((out / "attack_panel.md").read_text())
    print(f"[alpha_sweep] outputs: {out}")
    return out


def only_attack(trials: pd.DataFrame, attack: str) -> pd.DataFrame:
    return trials[trials["attack"] == attack].reset_index(drop=True)


ATTACK_NAMES = {"whitebox": "white-box (Khosravy, gradients)", "eot": "white-box + EOT (adaptive)",
                "nes": "black-box NES (scores)", "label": "label-only (boundary repulsion)"}


def summary_columns(judge: str) -> tuple[str, str, str]:
    """A judge's (per-trial top-5, CI low, CI high) columns in a :func:`summarize` table."""
    return ("mia_success_top5", "ci_low", "ci_high") if judge == "re" else (
        f"{judge}_top5", f"{judge}_ci_low", f"{judge}_ci_high")


def attack_panel(cfg, draws: dict, rec: dict, judges: list, out: Path) -> dict:
    """The sweep's attack dimension: every attack of ``sweep.attacks`` summarised per draw
    (``attack_summary.csv``: one row per draw, attack, variant and α, every judge), the
    deployed defense's effect per attack (``attack_effects.csv``: at each variant's selected
    α minus α = 1, paired over the same targets and restarts) and ``attack_panel.md``.
    Returns the block for recommendation.json: per attack and variant, each draw's numbers
    at the selected α and at α = 1."""
    chosen = {v: r["alpha"] for v, r in rec.items() if r.get("alpha") is not None}
    summaries, effects = [], []
    for draw, (trials, acc) in draws.items():
        summaries.append(summarize_attacks(trials, acc, cfg.sweep.bootstrap, cfg.run.seed).assign(draw=draw))
        effects.append(defense_effects(trials, chosen, judges, cfg.sweep.bootstrap, cfg.run.seed).assign(draw=draw))
    summ = pd.concat(summaries, ignore_index=True)
    eff = pd.concat(effects, ignore_index=True)
    front = ["draw"]
    summ[front + [c for c in summ.columns if c not in front]].to_csv(out / "attack_summary.csv", index=False)
    if len(eff):
        eff[front + [c for c in eff.columns if c not in front]].to_csv(out / "attack_effects.csv", index=False)
    cols = judge_columns(judges)
    block = {}
    for (draw, attack, variant), g in summ.groupby(["draw", "attack", "variant"], sort=False):
        for label, a in (("alpha_1", 1.0), ("selected", chosen.get(variant))):
            row = g[g["alpha"] == a] if a is not None else g.iloc[:0]
            if not len(row):
                continue
            r = row.iloc[0]
            cell = {"alpha": float(a), "accuracy": float(r["accuracy"])}
            for j in cols:
                top5, lo, hi = summary_columns(j)
                cell[j] = {"top5": float(r[top5]), "ci": [float(r[lo]), float(r[hi])]}
            if "queries_mean" in r and pd.notna(r["queries_mean"]):
                cell["queries_mean"] = float(r["queries_mean"])
            block.setdefault(attack, {}).setdefault(variant, {}).setdefault(draw, {})[label] = cell
    (out / "attack_panel.md").write_text(attack_panel_md(summ, eff, chosen, cols))
    return block


def attack_panel_md(summ: pd.DataFrame, eff: pd.DataFrame, chosen: dict, cols: dict) -> str:
    """The attack panel as markdown: per draw, per attack and variant, each judge's per-trial
    top-5 [95% CI] at α = 1 and at the selected α, and the paired difference."""
    names = {"re": "R_E", "external": "external", "classical": "classical"}
    lines = ["# The α sweep's attack panel", "",
             "Per-trial top-5 success [95% bootstrap CI over targets] at α = 1 (R_T alone) and at each variant's "
             "selected α; Δ = selected minus α = 1, paired over the same targets and restarts.", ""]
    for draw, sd in summ.groupby("draw", sort=False):
        lines += [f"## {draw} draw", "",
                  "| attack | variant | α | queries/row | " + " | ".join(
                      f"{names.get(j, j)}: α = 1 → α | {names.get(j, j)} Δ" for j in cols) + " |",
                  "|---|---|---|---|" + "---|---|" * len(cols)]
        ed = eff[eff["draw"] == draw] if len(eff) else eff
        for (attack, variant), g in sd.groupby(["attack", "variant"], sort=False):
            a = chosen.get(variant)
            one, sel = g[g["alpha"] == 1.0], g[g["alpha"] == a] if a is not None else g.iloc[:0]
            if not len(one) or not len(sel):
                continue
            o, s_ = one.iloc[0], sel.iloc[0]
            q = s_.get("queries_mean")
            cells = [ATTACK_NAMES.get(attack, attack), variant, f"{a:g}", "–" if q is None or pd.isna(q) else f"{q:.0f}"]
            for j in cols:
                top5, lo, hi = summary_columns(j)
                cells.append(f"{o[top5]:.1%} [{o[lo]:.1%}, {o[hi]:.1%}] → {s_[top5]:.1%} [{s_[lo]:.1%}, {s_[hi]:.1%}]")
                e = ed[(ed["attack"] == attack) & (ed["variant"] == variant) & (ed["judge"] == j)] if len(ed) else ed
                cells.append(f"{e.iloc[0]['diff_top5']:+.1%} [{e.iloc[0]['ci_low']:+.1%}, {e.iloc[0]['ci_high']:+.1%}]"
                             if len(e) else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
