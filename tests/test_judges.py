"""Judges independent of the victim, and the statistics the reports rest on."""
import numpy as np
import pytest
import torch

from raymia.evaluation import hierarchical_bootstrap, paired_bootstrap_diff, paired_differences
from raymia.judges import ClassicalJudge, ExternalFaceJudge, build_judges
from raymia.kinds import dummy_kind


@pytest.fixture(scope="module")
def judges(orl_smoke):
    cfg, b = orl_smoke
    return build_judges(cfg, b), b


def test_judges_identify_real_held_out_faces_far_above_chance(judges):
    """The judges' own accuracy on the evaluator's held-out real faces (20 identities:
    top-1 chance 5%, top-5 chance 25%)."""
    js, b = judges
    assert set(js) == {"external", "classical"}
    for name, j in js.items():
        acc = j.accuracy(b.eval_test)
        assert acc["top1"] >= 0.6 and acc["top5"] >= 0.85, (name, acc)


def test_judge_ranks_the_target_first_and_reports_knn_distance(judges):
    js, b = judges
    x, y = b.eval_test.x[:12], b.eval_test.y[:12]
    for name, j in js.items():
        v = j.judge(x, y.tolist())
        assert set(v) == {f"{name}_rank", f"{name}_top1", f"{name}_top5", f"{name}_dist"}
        assert v[f"{name}_rank"].min() >= 1 and (v[f"{name}_rank"] == 1).mean() >= 0.5
        wrong = j.judge(x, ((y + 1) % b.n_eval).tolist())        # the same images claimed as someone else
        assert (wrong[f"{name}_rank"] > v[f"{name}_rank"]).mean() >= 0.7
        assert np.median(wrong[f"{name}_dist"]) > np.median(v[f"{name}_dist"])


def test_noise_is_not_identified(judges):
    """Random images land near chance: a judge that said yes to anything would fail here."""
    js, b = judges
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(40, *b.eval_test.x.shape[1:], generator=g)
    t = torch.arange(40) % b.n_eval
    for name, j in js.items():
        top5 = j.judge(noise, t.tolist())[f"{name}_top5"].mean()
        assert top5 <= 0.5, (name, top5)                             # chance 0.25


def test_external_judge_needs_faces_not_digits():
    from raymia.config import load_config
    from raymia.data import load_bundle
    cfg = load_config("mnist", ["data.private_ids=3"])
    b = load_bundle(cfg.data)
    assert list(build_judges(cfg, b)) == ["classical"]           # digits: the non-CNN judge only
    assert ExternalFaceJudge.name == "external" and ClassicalJudge.name == "classical"


def test_hierarchical_bootstrap_covers_at_its_nominal_rate():
    """Synthetic multi-seed experiments (seed effect + Bernoulli targets) with a known
    mean: the 95% interval covers it in about 95% of repetitions."""
    rng = np.random.default_rng(0)
    true, reps, hits = 0.4, 150, 0
    for r in range(reps):
        seeds = [rng.binomial(1, np.clip(true + rng.normal(0, 0.05), 0, 1), 20).astype(float) for _ in range(5)]
        est, lo, hi = hierarchical_bootstrap(seeds, n_boot=300, seed=r)
        hits += lo <= true <= hi
    assert 0.88 <= hits / reps <= 0.995, hits / reps


def test_paired_difference_and_its_ci():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], float)
    d, lo, hi = paired_bootstrap_diff(a, a, 200)
    assert d == 0 and lo == 0 and hi == 0                          # the same defense: no difference
    b = a * 0
    d, lo, hi = paired_bootstrap_diff(a, b, 500)
    assert d == pytest.approx(-0.7) and lo < d < hi < 0
    with pytest.raises(ValueError):
        paired_bootstrap_diff(a, a[:3])


def test_paired_differences_pairs_targets_and_restarts():
    import pandas as pd
    rows = [{"variant": v, "alpha": 0.5, "target": t, "restart": r, "success_top5": float(v == "paper"),
             "external_top5": 0.0} for v in ("paper", "calibrated") for t in range(4) for r in range(2)]
    out = paired_differences(pd.DataFrame(rows), ["paper", "calibrated"], ["external"], 100)
    re = out[out["judge"] == "re"].iloc[0]
    assert re["diff_top5"] == -1.0 and re["n_targets"] == 4
    assert out[out["judge"] == "external"].iloc[0]["diff_top5"] == 0.0


def test_variants_share_their_anchor_seed():
    """Paired design: paper and calibrated R_dmy are drawn with the same seed (same
    anchors and neighbours) and differ only in their objective; a report draw differs."""
    assert dummy_kind("paper").seed(0) == dummy_kind("calibrated").seed(0)
    assert dummy_kind("paper").seed(0, draw=1) != dummy_kind("paper").seed(0)


def test_study_pools_units_at_their_selected_alpha():
    import pandas as pd
    from raymia.pipelines.study import pool

    def unit(alpha, hit):
        t = pd.DataFrame([{"variant": "calibrated", "alpha": a, "target": t, "restart": 0,
                           "success_top5": float(a == 1.0 or hit), "external_top5": 0.0, "external_top1": 0.0,
                           "external_rank": 9, "external_dist": 1.0} for a in (1.0, alpha) for t in range(5)])
        return {"trials": t, "report_trials": t, "rec": {"variants": {"calibrated": {"alpha": alpha}}}}
    out = pool([unit(0.5, True), unit(0.3, False)], 200, 0)
    sel = out[(out["draw"] == "report") & (out["judge"] == "re") & (out["alpha"] == "selected")].iloc[0]
    assert sel["units"] == 2 and sel["alphas"] == "0.5,0.3" and sel["top5"] == pytest.approx(0.5)
    assert sel["ci_low"] == 0.0 and sel["ci_high"] == 1.0             # two units that disagree: a wide CI
    und = out[(out["draw"] == "selection") & (out["judge"] == "re") & (out["alpha"] == "alpha=1")].iloc[0]
    assert und["top5"] == 1.0
    assert set(out["judge"]) == {"re", "external"}


def test_study_compares_the_deployed_defenses_paired():
    """calibrated - paper, each at its own selected α, per target within a unit: target t's
    difference is -(t % 2), whatever the targets' order, so the pooled estimate is -2/5 in
    both units and its CI is the targets' spread, not zero."""
    import pandas as pd
    from raymia.pipelines.study import pool

    def unit(a_cal, a_pap):
        rows = []
        for v, a_sel in (("calibrated", a_cal), ("paper", a_pap)):
            for a in (1.0, a_sel):
                for t in (4, 0, 3, 1, 2):
                    hit = 1.0 if a == 1.0 else (0.0 if v == "calibrated" else float(t % 2))
                    rows.append({"variant": v, "alpha": a, "target": t, "restart": 0, "success_top5": hit})
        t = pd.DataFrame(rows)
        return {"trials": t, "report_trials": t,
                "rec": {"variants": {"calibrated": {"alpha": a_cal}, "paper": {"alpha": a_pap}}}}
    out = pool([unit(0.2, 0.6), unit(0.4, 0.6)], 500, 0)
    d = out[(out["variant"] == "calibrated - paper") & (out["draw"] == "report")].iloc[0]
    assert d["units"] == 2 and d["alphas"] == "0.2/0.6,0.4/0.6" and d["judge"] == "re"
    assert d["top5"] == pytest.approx(-0.4)
    assert -1.0 <= d["ci_low"] < -0.4 < d["ci_high"] <= 0.0
