"""Simulations of the similarity-filter paper: live attack trials through the filter,
the bank of configurations, regular users, the Sybil attacker, the metrics (Eqs. 2-5)
and a tiny filter sweep job through Ray."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from raymia.attacks.fredrikson import fredrikson_attack
from raymia.cli import filter_sweep
from raymia.config import ConfigError, config_from_dict, load_config
from raymia.defenses.filter import ClientFilterState, FilterParams
from raymia.filter_sim import (NO_FILTER, SimContext, Unit, calibrate, detection_metrics, main_units, run_unit,
                               setting_key, sweep_configs)
from raymia.filter_sim.units import calib_images_disjoint, calib_units, is_window_ablation
from raymia.pipelines.filter_sweep import main_bank
from raymia.paper import paper_reference
from raymia.training import train_classifier

SMALL = ["data.train_per_id=60", "data.test_per_id=20", "target.epochs=3", "evaluator.epochs=3",
         "filter_sim.labels=[0,1]", "filter_sim.trials_per_label=1", "filter_sim.user_trials_per_label=1",
         "filter_sim.user_queries=20", "filter_sim.max_iters=150", "filter_sweep.grid_n_b=[10]",
         "filter_sweep.grid_t_ssim=[0.99]", "filter_sweep.grid_t_hash=[0.001]", "filter_sim.noise_grid=[0.001]",
         "filter_sim.sybil_k=[3]", "filter_sim.extra_labels=1", "filter_sweep.ablation_data_range=0"]


@pytest.fixture(scope="module")
def mnist_ctx():
    """LeNet5 R_T and R_E trained briefly on 60 MNIST-5k digits per class (~2 s)."""
    torch.set_num_threads(1)
    cfg = load_config("filter_mnist", SMALL)
    from raymia.data import load_bundle
    b = load_bundle(cfg.data)
    rt, m = train_classifier(cfg.target, b.private_train, b.private_test, b.n_private, "cpu", seed=0)
    re, _ = train_classifier(cfg.evaluator, b.eval_train, b.eval_test, b.n_eval, "cpu", seed=1)
    assert m["test_acc"] > 0.6, m
    return SimContext(cfg, "cpu", bundle=b, target=rt, evaluator=re)


def test_short_attack_trial_gets_blocked(mnist_ctx):
    ctx = mnist_ctx
    st = ClientFilterState(FilterParams.paper(3))
    res = fredrikson_attack(ctx.target, 1, ctx.shape, iters=300, lr=0.1, noise_std=1e-4, seed=0,
                            gate=lambda q: st.check(q.numpy()).safe)
    assert res.blocked_at is not None and res.blocked_at < 300
    assert res.queries == res.blocked_at - 1 == st.n_queries - 1
    assert st.blocked and st.count == 4 and len(st) == min(10, res.queries)


def test_bank_equals_one_live_filter_per_config(mnist_ctx):
    """Every config of a bank blocks at the query where a server running only that
    config blocks the same attack; the no-filter reference runs to max_iters."""
    ctx = mnist_ctx
    configs = sweep_configs(ctx.cfg)
    names = ["paper-1", "paper-2", "paper-3"]
    u = Unit("filter_mnist", "noise", 0, 0, 1e-4, 1, tuple(names) + (NO_FILTER,))
    df = run_unit(ctx, u, configs).set_index("config")
    seed = ctx.seed("attack", 0, 0, 1e-4)
    for n in names:
        st = ClientFilterState(configs[n])
        res = fredrikson_attack(ctx.target, 0, ctx.shape, iters=ctx.sim.max_iters, lr=ctx.cfg.attack.fredrikson_lr,
                                noise_std=1e-4, seed=seed, gate=lambda q, st=st: st.check(q.numpy()).safe)
        if res.blocked_at is None:
            assert not df.loc[n, "detected"]
        else:
            assert df.loc[n, "blocked_at"] == res.blocked_at
            assert df.loc[n, "iters_before_detection"] == res.queries
            assert df.loc[n, "x_conf_at_stop"] == pytest.approx(res.target_conf, abs=1e-5)
        # the image at the block, judged by R_E and the independent judges (digits: eigenfaces + SVM)
        v = ctx.judge_images([res.image.cpu()], 0)
        for k in ("re_top5", "re_rank", "classical_top5", "classical_rank"):
            assert df.loc[n, f"{k}_at_stop"] == v[k][0], (n, k)
    assert df.loc[NO_FILTER, "answered"] == ctx.sim.max_iters and not df.loc[NO_FILTER, "detected"]
    assert len(df.loc[NO_FILTER, "ssim_prev"]) == ctx.sim.max_iters - 1
    assert df.loc["paper-3", "detected"] and df.loc["paper-3", "iters_before_detection"] < 50


def test_regular_users_pass_and_sybil_needs_the_cross_client_check(mnist_ctx):
    ctx = mnist_ctx
    configs = sweep_configs(ctx.cfg)
    names = ("paper-1", "paper-3")
    users = run_unit(ctx, Unit("filter_mnist", "user", 0, 0, 0.0, 1, names), configs)
    assert (~users["flagged"]).all() and (users["n_queries"] == 20).all() and (users["count"] == 0).all()
    syb = run_unit(ctx, Unit("filter_mnist", "sybil", 0, 0, 1e-4, 3, ("paper-3",)), configs).set_index("config")
    own, glob = syb.loc["paper-3"], syb.loc["paper-3+global"]
    assert glob["detected"] and glob["by_global"] >= 1
    assert glob["answered"] < own["answered"] or not own["detected"]
    assert own["by_global"] == 0 and (not own["detected"] or own["ids_blocked"] == 3)


def test_user_protocols_and_held_out_calibration_sessions(mnist_ctx):
    """Both user protocols run; the sequence sessions keep the ids they had before the
    protocols existed; the paper protocol sends one held-out test image per trial; the
    calibration sessions use other attack seeds and other images than the reported ones."""
    ctx = mnist_ctx
    cfg, configs, key = ctx.cfg, sweep_configs(ctx.cfg), ctx.key
    assert cfg.filter_sim.user_protocol == "both"
    units = main_units("filter_mnist", cfg.filter_sim, 10, main_bank(configs))
    seq = [u for u in units if u.kind == "user" and u.user_protocol == "sequence"]
    assert [u.uid(key, configs) for u in seq] == ["filter_mnist-user-ef56d21fe2654375",
                                                 "filter_mnist-user-b4bb1bad5dc9fdfc"]
    paper = [u for u in units if u.user_protocol == "paper" and u.kind == "user"]
    assert len(paper) == 1 and paper[0].uid(key, configs) != seq[0].uid(key, configs)
    names = ("paper-1", "paper-3")
    rows = run_unit(ctx, Unit("filter_mnist", "user", -1, 0, 0.0, 2, names, "paper"), configs)
    assert len(rows) == 2 * 2 * 2 and set(rows["protocol"]) == {"paper"} and (rows["n_queries"] == 1).all()
    assert set(rows["role"]) == {"report"} and sorted(rows["label"].unique()) == [0, 1]
    test = {lab: ctx.test_pools[lab].reshape(len(ctx.test_pools[lab]), -1) for lab in (0, 1)}

    def index(lab, im):                       # position of a trial's image among the label's test images
        hit = np.flatnonzero((test[lab] == im.reshape(1, -1)).all(1))
        assert hit.size, "paper-protocol image is not a held-out test image of its label"
        return int(hit[0])
    rep_idx = {index(lab, im) for lab, _, im in ctx.paper_trials(0, 10) if lab == 0}
    cal_idx = {index(lab, im) for lab, _, im in ctx.paper_trials(1, 10) if lab == 0}
    assert rep_idx and cal_idx and not rep_idx & cal_idx
    # calibration: other attack seeds, the label's next disjoint slice of images for sequence users
    cal = calib_units("filter_mnist", cfg.filter_sim, cfg.filter_sweep, 10, list(configs))
    assert {u.role for u in cal} == {"calib"} and {u.rep for u in cal if u.kind == "attack"} == {1000}
    assert not {u.uid(key, configs) for u in cal} & {u.uid(key, configs) for u in units}
    a, b = ctx.user_session(0, 0), ctx.user_session(0, 1)
    assert len(a) == len(b) == 20
    assert not ({x.tobytes() for x in a} & {x.tobytes() for x in b})
    assert calib_images_disjoint(cfg.filter_sim, cfg.filter_sweep, {0: 80}, {0: 20}) == {"sequence": True,
                                                                                      "paper": True}
    orl = load_config("filter_orl")                  # 10 photos per person, one user: the same photos again
    assert calib_images_disjoint(orl.filter_sim, orl.filter_sweep, {0: 10}, {0: 3})["sequence"] is False


def test_calibration_chosen_on_calibration_sessions_reported_on_held_out():
    s = pd.DataFrame([
        {"setting": "x", "config": "a", "fpr": 0.0, "recall": 1.0, "iters_max": 5.0, "iters_median": 2.0,
         "cal_attack_trials": 2, "cal_fpr": 0.0, "cal_recall": 1.0, "cal_iters_max": 40.0, "cal_iters_median": 9.0},
        {"setting": "x", "config": "b", "fpr": 0.5, "recall": 0.5, "iters_max": 50.0, "iters_median": 20.0,
         "cal_attack_trials": 2, "cal_fpr": 0.0, "cal_recall": 1.0, "cal_iters_max": 20.0, "cal_iters_median": 9.0},
        {"setting": "x", "config": "c", "fpr": 0.0, "recall": 1.0, "iters_max": 1.0, "iters_median": 1.0,
         "cal_attack_trials": 2, "cal_fpr": 0.5, "cal_recall": 1.0, "cal_iters_max": 1.0, "cal_iters_median": 1.0},
    ])
    cal = calibrate(s, 0.05)["x"]
    assert cal["config"] == "b" and cal["selected_on"].startswith("calibration sessions")
    assert cal["selection"]["iters_max"] == 20.0 and cal["selection"]["fpr"] == 0.0
    assert cal["report"]["fpr"] == cal["fpr"] == 0.5 and cal["report"]["recall"] == 0.5


def test_metrics_reproduce_the_papers_table6_from_its_counts():
    """Eqs. 2-5 on the paper's own counts (30 attacks all detected, FP from Table 4)."""
    for setting, n in (("mnist", 30), ("celeba", 12)):
        ref = paper_reference(setting)
        for k, r in ref.items():
            a = pd.DataFrame({"detected": [True] * n, "iters_before_detection": [1.0] * n,
                              "reached_target": [False] * n, "re_top1_at_stop": [False] * n})
            u = pd.DataFrame({"flagged": [True] * r["fp"] + [False] * (n - r["fp"])})
            m = detection_metrics(a, u)
            for key in ("accuracy", "precision", "recall", "f1"):
                assert m[key] == pytest.approx(r[key], abs=6e-5), (setting, k, key)
    a = pd.DataFrame({"detected": [True, True, False], "iters_before_detection": [5.0, 9.0, math.nan],
                      "reached_target": [True, False, True], "re_top1_at_stop": [False, False, True]})
    m = detection_metrics(a, pd.DataFrame({"flagged": [False, True]}))
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["iters_max"] == 9 and m["iters_median"] == 7 and m["fpr"] == 0.5


def test_calibration_picks_fastest_full_recall_config_under_fpr_target():
    s = pd.DataFrame([
        {"setting": "x", "config": "a", "fpr": 0.0, "recall": 1.0, "iters_max": 50.0, "iters_median": 10.0},
        {"setting": "x", "config": "b", "fpr": 0.0, "recall": 1.0, "iters_max": 20.0, "iters_median": 15.0},
        {"setting": "x", "config": "c", "fpr": 0.2, "recall": 1.0, "iters_max": 2.0, "iters_median": 2.0},
        {"setting": "x", "config": "d", "fpr": 0.0, "recall": 0.5, "iters_max": 1.0, "iters_median": 1.0},
        {"setting": "x", "config": "paper-1-L255", "fpr": 0.0, "recall": 1.0, "iters_max": 1.0, "iters_median": 1.0},
        {"setting": "y", "config": "e", "fpr": 0.5, "recall": 1.0, "iters_max": 1.0, "iters_median": 1.0},
    ])
    cal = calibrate(s, 0.05)
    assert cal["x"]["config"] == "b" and cal["y"]["config"] is None


def test_setting_key_and_unit_ids_keep_their_values():
    """The cache keys of the units under OUT/units/ are those of runs made before the
    filter config was split into filter / filter_sim / filter_sweep (same settings,
    same key: finished units are found again)."""
    assert setting_key(load_config("filter_mnist")) == "e377a3e120fc"
    assert setting_key(load_config("filter_orl")) == "191d1de731f2"
    cfg = load_config("filter_mnist", SMALL)
    key, configs = setting_key(cfg), sweep_configs(cfg)
    assert key == "e378825ddf0c"
    assert list(configs) == ["paper-1", "paper-2", "paper-3", "paper-1-G11", "paper-2-G11", "paper-3-G11",
                             "nb10-s0.99-h0.001-l4"]
    assert configs["paper-2-G11"].ssim_window == "gaussian11" and is_window_ablation("paper-2-G11")
    bank = main_bank(configs)                # the SSIM-window ablation has units of its own
    assert bank == ["paper-1", "paper-2", "paper-3", "nb10-s0.99-h0.001-l4"]
    units = main_units("filter_mnist", cfg.filter_sim, 10, bank)
    assert [u.uid(key, configs) for u in units[:2]] == ["filter_mnist-attack-d40dbcab87e6e626",
                                                        "filter_mnist-attack-47460a52601b323b"]
    # sweep-only settings do not enter the key; simulation settings do
    assert setting_key(load_config("filter_mnist", SMALL + ["filter_sweep.fpr_target=0.1",
                                                            "filter_sim.sybil_k=[2]"])) == key
    assert setting_key(load_config("filter_mnist", SMALL + ["filter_sim.max_iters=151"])) != key


def test_config_saved_before_the_split_still_loads():
    """Artifacts' manifests and run records written with the old flat ``filter`` section
    load as the same config (same artifact, same setting key)."""
    new = load_config("filter_mnist", SMALL).to_dict()
    flat = {k: v for k, v in new.items() if k not in ("filter_sim", "filter_sweep")}
    flat["filter"] = {**new["filter"], **new["filter_sim"], **new["filter_sweep"]}
    cfg = config_from_dict(flat)
    assert cfg.to_dict() == new and setting_key(cfg) == "e378825ddf0c"


def test_filter_config_sections():
    cfg = load_config("filter_orl")
    assert FilterParams.from_config(cfg.filter) == FilterParams(l_sp=8)
    assert cfg.filter_sim.paper_setting == "celeba" and sweep_configs(cfg)["paper-1"].l_sp == 8
    for bad, word in (("filter.t_ssim=2", "filter: invalid filter parameters"),
                      ("filter_sim.paper_setting=faces", "filter_sim.paper_setting must be one of"),
                      ("filter_sim.user_pool=train", "filter_sim.user_pool must be one of"),
                      ("filter_sweep.paper_configs=[4]", "filter_sweep.paper_configs"),
                      ("filter.max_iters=10", "unknown config key 'filter.max_iters'")):
        with pytest.raises(ConfigError, match=word):
            load_config("filter_mnist", [bad])


def test_filter_sweep_job_runs_and_resumes(ray_session, tmp_path, capsys):
    """The whole job on a tiny grid (MNIST, 2 labels, 4 configs) on the test's Ray;
    a second run finds every unit done and recomputes nothing."""
    out = tmp_path / "out"
    argv = ["--preset", "filter_mnist", "--out", str(out),
            "--set", f"run.out_root={tmp_path / 'runs'}"] + [a for s in SMALL for a in ("--set", s)]
    filter_sweep(argv)
    first = capsys.readouterr().out
    assert "(0 already done)" in first
    for f in ("filter_trials.parquet", "filter_summary.csv", "tables.md", "calibration.json",
              "detection_vs_fpr.png", "noise.png", "max_iters_per_label_filter_mnist.png"):
        assert (out / f).exists(), f
    summ = pd.read_csv(out / "filter_summary.csv")
    assert set(summ["config"]) == {"paper-1", "paper-2", "paper-3", "nb10-s0.99-h0.001-l4", "paper-1-G11",
                                   "paper-2-G11", "paper-3-G11"}
    trials = pd.read_parquet(out / "filter_trials.parquet")
    assert set(trials["kind"]) == {"attack", "user", "noise", "sybil", "population"}
    att = trials[trials["kind"] == "attack"]
    assert len(att[att["role"] == "report"]) == 2 * 7                 # 2 labels x 1 trial x 7 configs
    assert len(att[att["role"] == "calib"]) == 2 * 4                  # the calibration sessions
    users = trials[trials["kind"] == "user"]
    assert set(users["protocol"]) == {"paper", "sequence"} and set(users["role"]) == {"report", "calib"}
    by = summ.set_index("config")
    assert by.loc["paper-3-G11", "recall"] == 1.0 and by.loc["paper-3-G11", "attack_trials"] == 2
    assert by["classical_top5_at_stop"].between(0, 1).all() and by["re_top5_at_stop"].between(0, 1).all()
    p3 = by.loc["paper-3"]
    assert p3["recall"] == 1.0 and p3["fpr"] == 0.0 and p3["paper_fpr"] == 0.0 and p3["cal_attack_trials"] == 2
    text = (out / "tables.md").read_text()
    for words in ("Table 6: defense performance (%), regular users of the paper protocol",
                  "regular users of the sequence protocol", "chosen to match the paper",
                  "Detection vs the attacker's noise σ", "Calibration: chosen on calibration sessions",
                  "| paper-3-G11 |", "What the attacker had reached at the block"):
        assert words in text, words
    assert (out / "detection_vs_noise.png").exists()
    cal = json.loads((out / "calibration.json").read_text())["filter_mnist"]
    assert cal["selected_on"].startswith("calibration sessions") and {"selection", "report"} <= set(cal)
    assert cal["calibration_sessions"]["user_images_disjoint_from_report"] == {"sequence": True, "paper": True}
    units = {p: p.stat().st_mtime_ns for p in (out / "units").glob("*.parquet")}
    filter_sweep(argv)
    second = capsys.readouterr().out
    # reported: 2 attack + 2 sequence users + 1 paper-protocol unit, the same for the G11 ablation and
    # for the calibration
    assert "(15 already done)" in second
    assert {p: p.stat().st_mtime_ns for p in (out / "units").glob("*.parquet")} == units
    pd.testing.assert_frame_equal(pd.read_csv(out / "filter_summary.csv"), summ)
