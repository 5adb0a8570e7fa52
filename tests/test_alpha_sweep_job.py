"""The α sweep job end to end on the smoke preset, through Ray Tune trials, attack workers
and the evaluator actor: outputs, honesty checks, resume without duplicates, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raymia.config import load_config
from raymia.pipelines import alpha_sweep
from raymia.sweep import KEY, plan_rows, rows_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, smoke_runs):
    cfg = load_config("smoke", [f"run.out_root={smoke_runs}"])
    out = alpha_sweep.run(cfg)
    return cfg, out, alpha_sweep


def test_outputs_are_complete(smoke_sweep):
    cfg, out, _ = smoke_sweep
    for f in ("alpha_trials.parquet", "alpha_summary.csv", "alpha_sweep.png", "mia_grid.png",
              "recommendation.json", "config.yaml", "run.json"):
        assert (out / f).exists(), f
    trials = pd.read_parquet(out / "alpha_trials.parquet")
    plan = plan_rows(cfg, 5)
    assert len(trials) == len(plan) and not trials.duplicated(KEY).any()
    for col in ("success_top1", "success_top5", "target_conf", "eval_rank", "dist_private", "dist_anchor",
                "final_loss"):
        assert col in trials and trials[col].notna().all(), col
    summary = pd.read_csv(out / "alpha_summary.csv")
    assert set(summary["variant"]) == {"paper", "calibrated"} and len(summary) == 8
    assert {"mia_success_top5", "ci_low", "ci_high", "mia_success_top1", "accuracy"} <= set(summary.columns)
    # accuracy drop against R_T on the same faces, with its paired CI; none at alpha = 1 (R' = R_T)
    one = summary[summary["alpha"] == 1.0]
    assert (one["acc_drop"] == 0).all() and (one["acc_drop_ci_low"] == 0).all() and (one["acc_drop_ci_high"] == 0).all()
    assert (summary["acc_drop_ci_low"] <= summary["acc_drop"]).all() and (summary["acc_drop"] <= summary["acc_drop_ci_high"]).all()
    rec = json.loads((out / "recommendation.json").read_text())
    assert set(rec["variants"]) == {"paper", "calibrated"} and rec["paper"]["rt_accuracy"] == 0.958
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == cfg.run.seed and run["versions"]["torch"] and run["versions"]["machine"]["arch"]


def test_attack_beats_chance_on_the_undefended_model(smoke_sweep):
    """At alpha=1 the released model is R_T alone: the generator MIA must beat R_E's chance."""
    _, out, _ = smoke_sweep
    trials = pd.read_parquet(out / "alpha_trials.parquet")
    undefended = trials[trials["alpha"] == 1.0]
    n_eval = 20
    assert undefended["success_top1"].mean() >= 3 * (1 / n_eval), undefended["success_top1"].mean()
    assert undefended["target_conf"].median() > 0.5          # the attack did optimise R'


def test_every_row_is_judged_by_independent_judges(smoke_sweep):
    _, out, _ = smoke_sweep
    trials = pd.read_parquet(out / "alpha_trials.parquet")
    for j in ("external", "classical"):
        for c in ("rank", "top1", "top5", "dist"):
            assert trials[f"{j}_{c}"].notna().all(), (j, c)
    summary = pd.read_csv(out / "alpha_summary.csv")
    assert {"external_top5", "external_ci_low", "classical_top5"} <= set(summary.columns)
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["judges"]["external"]["top5"] >= 0.85 and rec["judges"]["classical"]["top5"] >= 0.85


def test_selection_and_report_draws_are_disjoint(smoke_sweep):
    """α is chosen on one draw and reported on another: other restarts (other seeds) and
    a freshly drawn R_dmy (other anchors) for each variant."""
    cfg, out, _ = smoke_sweep
    sel = pd.read_parquet(out / "alpha_trials.parquet")
    rep = pd.read_parquet(out / "report_trials.parquet")
    assert not set(sel["restart"]) & set(rep["restart"])
    assert not set(sel["seed"]) & set(rep["seed"])
    rec = json.loads((out / "recommendation.json").read_text())
    chosen = {v: r["alpha"] for v, r in rec["variants"].items() if r.get("alpha") is not None}
    assert set(rep["alpha"]) == {1.0} | set(chosen.values())
    for v, a in chosen.items():
        assert rec["report"][v]["alpha"] == a and "external_top5" in rec["report"][v]
    from raymia.defenses.dummy import dummy_artifact_dir, load_dummy
    report_cfg = alpha_sweep.report_config(cfg, rec["variants"])
    for v in cfg.sweep.variants:
        _, a_sel, m_sel = load_dummy(dummy_artifact_dir(cfg, v))
        _, a_rep, m_rep = load_dummy(dummy_artifact_dir(report_cfg, v))
        assert m_sel["seed"] != m_rep["seed"] and not (a_sel["x"] == a_rep["x"]).all()


def test_variants_are_paired_on_identical_anchors(smoke_sweep):
    cfg, _, _ = smoke_sweep
    from raymia.defenses.dummy import dummy_artifact_dir, load_dummy
    _, paper, _ = load_dummy(dummy_artifact_dir(cfg, "paper"))
    _, calibrated, _ = load_dummy(dummy_artifact_dir(cfg, "calibrated"))
    assert (paper["x"] == calibrated["x"]).all() and (paper["y"] == calibrated["y"]).all()


def test_defense_lowers_re_success_and_keeps_accuracy(smoke_sweep):
    """On smoke: with the calibrated R_dmy, R_E's success at the recommended α lies below
    α = 1 (the undefended model), and accuracy there stays within the tolerance."""
    _, out, _ = smoke_sweep
    summary = pd.read_csv(out / "alpha_summary.csv")
    rec = json.loads((out / "recommendation.json").read_text())
    r = rec["variants"]["calibrated"]
    assert r["alpha"] is not None and r["alpha"] < 1.0
    undefended = summary[(summary["variant"] == "calibrated") & (summary["alpha"] == 1.0)].iloc[0]
    assert r["mia_success_top5"] < undefended["mia_success_top5"]
    assert r["accuracy"] >= rec["accuracy_rt"] - rec["tolerance"] - 1e-9
    # and on the fresh report draw (new restarts, new R_dmy seed) it still lies below alpha = 1
    rep = pd.read_csv(out / "report_summary.csv").set_index(["variant", "alpha"]).mia_success_top5
    assert rec["report"]["calibrated"]["alpha"] == r["alpha"]
    assert rep[("calibrated", r["alpha"])] < rep[("calibrated", 1.0)]


def test_calibration_lowers_dummy_confidence_on_real_faces(smoke_sweep):
    _, out, _ = smoke_sweep
    dummy = json.loads((out / "recommendation.json").read_text())["dummy"]
    assert dummy["calibrated"]["dmy_top_conf_real"] < dummy["paper"]["dmy_top_conf_real"]


def test_rerun_resumes_without_duplicates(smoke_sweep):
    cfg, out, job = smoke_sweep
    rows_dir = out / "rows" / rows_key(cfg)
    shards = sorted(rows_dir.glob("*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    # a worker killed mid-chunk: its shard never got written (and a temp file is left behind)
    lost = shards[0]
    lost.unlink()
    (rows_dir / f".{lost.stem}.999.tmp").write_bytes(b"half-written")
    job.run(cfg)
    after = sorted(rows_dir.glob("*.parquet"))
    assert [p.name for p in after] == [p.name for p in shards]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in after if p != lost)   # only the lost chunk reran
    trials = pd.read_parquet(out / "alpha_trials.parquet")
    assert len(trials) == len(plan_rows(cfg, 5)) and not trials.duplicated(KEY).any()


def test_changed_config_never_reuses_rows(smoke_sweep):
    cfg, _, _ = smoke_sweep
    same = load_config("smoke", [f"run.out_root={cfg.run.out_root}", "attack.batch_rows=7"])
    assert rows_key(same) == rows_key(cfg)                       # chunking does not change a row
    for override in ("attack.iters=50", "dummy.m=3", "combine.rule=gated", "target.epochs=2"):
        other = load_config("smoke", [f"run.out_root={cfg.run.out_root}", override])
        assert rows_key(other) != rows_key(cfg), override


@pytest.mark.parametrize("job, override, needle", [
    ("alpha_sweep.py", "attack.targets=[0,99]", "unknown target(s) [99]"),
    ("alpha_sweep.py", "sweep.alphas=[1.2]", "outside [0, 1]"),
    ("train.py", "target.epoch=3", "unknown config key 'target.epoch'"),
])
def test_bad_input_is_one_clear_line(job, override, needle, tmp_path):
    env = {**os.environ, "RAYMIA_OUT_ROOT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--preset", "smoke", "--set", override],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_attack_dimension_adds_attacks_without_touching_the_whitebox_rows(smoke_sweep):
    """``sweep.attacks``: the same sweep with the black-box and label-only attacks added
    reuses every white-box chunk (same store, files untouched), selects α on the white-box
    attack exactly as before, attacks the same (variant, α, target, restart, seed) rows with
    every attack on both draws, judges them all, and reports each attack's paired defense
    effect.  (EOT goes through the same ``attack_chunk`` as the defense check's adaptive
    attacker, in a Ray trial in tests/test_defense_search.py, and in tests/test_sweep_attacks.py.)"""
    cfg, out, job = smoke_sweep
    before_rec = json.loads((out / "recommendation.json").read_text())
    before_trials = pd.read_parquet(out / "alpha_trials.parquet")
    wb_dir = out / "rows" / rows_key(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in wb_dir.glob("*.parquet")}
    cfg4 = load_config("smoke", [f"run.out_root={cfg.run.out_root}", "sweep.attacks=[whitebox,nes,label]",
                                 "query_attack.budget=60", "query_attack.label_budget=60",
                                 "query_attack.label_init_budget=32"])
    job.run(cfg4, out=out)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())       # white-box rows reused as they were
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["variants"] == before_rec["variants"] and rec["report"] == before_rec["report"]
    trials = pd.read_parquet(out / "alpha_trials.parquet")
    cols = ["variant", "alpha", "target", "restart", "seed", "success_top5", "external_top5"]
    assert trials[cols].equals(before_trials[cols])
    summ = pd.read_csv(out / "attack_summary.csv")
    assert set(summ["attack"]) == {"whitebox", "nes", "label"} and set(summ["draw"]) == {"selection", "report"}
    for draw, g in summ.groupby("draw"):
        keys = {a: set(map(tuple, s[["variant", "alpha"]].to_numpy())) for a, s in g.groupby("attack")}
        assert all(k == keys["whitebox"] for k in keys.values()), draw          # paired grid
    q = summ[summ["attack"].isin(["nes", "label"])]["queries_mean"]
    assert q.notna().all() and (q <= 60).all()
    assert summ["external_top5"].notna().all() and summ["classical_top5"].notna().all()
    eff = pd.read_csv(out / "attack_effects.csv")
    assert set(eff["judge"]) == {"re", "external", "classical"}
    chosen = {v: r["alpha"] for v, r in rec["variants"].items() if r.get("alpha") is not None}
    for _, e in eff.iterrows():
        assert e["alpha"] == chosen[e["variant"]] and e["ci_low"] <= e["diff_top5"] <= e["ci_high"]
        assert e["diff_top5"] == pytest.approx(e["top5_alpha"] - e["top5_alpha1"])
    assert set(rec["attacks"]) == {"whitebox", "nes", "label"}
    assert rec["attacks"]["nes"]["calibrated"]["report"]["selected"]["alpha"] == chosen["calibrated"]
    assert "| black-box NES (scores) | calibrated |" in (out / "attack_panel.md").read_text()
