"""The threat panel (raymia/pipelines/threat_panel.py) on the smoke models: paired rows in
every setting, exact budgets unfiltered, a filter that refuses ends the row at the block
(and one that refuses nothing leaves the attack unchanged), the summary and report."""
import numpy as np
import pandas as pd
import pytest
import torch

from raymia.config import ConfigError, load_config
from raymia.pipelines import threat_panel as tp


@pytest.fixture(scope="module")
def panel(smoke_attack_models):
    from raymia.defenses.dummy import combined_model
    from raymia.evaluation import make_scorer
    from raymia.models import ProbModel, build_classifier, freeze
    m = smoke_attack_models()
    cfg, bundle, rt, F = m["cfg"], m["bundle"], freeze(m["rt"]), freeze(m["F"])
    torch.manual_seed(0)
    dm = freeze(build_classifier(cfg.target, 1, cfg.data.image_size, bundle.n_private))
    models = {"target": ProbModel(rt).eval(), "dummy": combined_model(cfg, rt, dm, 0.5)}
    gates = {f: tp.gate_factory(cfg, f) for f in ("raha1", "robust")}
    targets = list(range(bundle.n_private))
    seeds = [20_000 + 10 * t for t in targets]
    settings = ["none", "dummy", "raha1", "robust", "dummy+robust"]
    rows = tp.panel_rows(models, gates, F, make_scorer(cfg, bundle, "cpu"), targets, seeds, settings,
                         ["nes", "label"], [40, 120], cfg.query_attack, cfg.attack.latent_bound,
                         bundle.n_private, "cpu")
    return cfg, bundle, pd.DataFrame(rows), settings


def test_rows_are_paired_and_unfiltered_budgets_exact(panel):
    cfg, bundle, df, settings = panel
    n = bundle.n_private
    assert len(df) == 2 * len(settings) * 2 * n
    for _, g in df.groupby(["attack", "setting", "budget"]):
        assert g["target"].tolist() == list(range(n)) and g["seed"].nunique() == n
    nes = df[(df.attack == "nes") & df.setting.isin(["none", "dummy"])]
    assert (nes["answered"] == nes["budget"]).all() and (nes["blocked_at"] == 0).all()
    lab = df[(df.attack == "label") & df.setting.isin(["none", "dummy"])]
    assert (lab["answered"] <= lab["budget"]).all() and (lab["blocked_at"] == 0).all()


def test_a_refusing_filter_ends_rows_at_the_block_and_a_silent_one_changes_nothing(panel):
    _, _, df, _ = panel
    rob = df[(df.attack == "nes") & (df.setting == "robust")]
    # NES asks about sigma-perturbations of one latent: near-duplicates the robust detector blocks
    assert (rob["blocked_at"] > 0).all()
    assert (rob["blocked_at"] == rob["answered"] + 1).all() and (rob["answered"] < rob["budget"]).all()
    # rows that Algorithm 2 (Table 1, config 1) never refused got exactly the undefended answers
    key = ["attack", "budget", "row"]
    none = df[df.setting == "none"].set_index(key)
    raha = df[(df.setting == "raha1") & (df.blocked_at == 0)].set_index(key)
    assert len(raha) > 0
    cols = [c for c in df.columns if c.endswith("top5")] + ["answered"]
    pd.testing.assert_frame_equal(raha[cols], none.loc[raha.index, cols])


def test_summary_and_report(panel):
    cfg, bundle, df, settings = panel
    s = tp.summarize(df, 200, 0)
    assert len(s) == 2 * len(settings) * 2
    r = s[(s.attack == "nes") & (s.setting == "robust") & (s.budget == 120)].iloc[0]
    assert r["blocked"] == bundle.n_private and r["answered_median"] < 120
    assert (s["R_E_lo"] <= s["R_E"]).all() and (s["R_E"] <= s["R_E_hi"]).all()
    md = tp.report(s, cfg, {"variant": "calibrated", "alpha": 0.5, "alpha_source": "test"}, 5 / bundle.n_eval)
    assert "## black-box (NES)" in md and "## label-only" in md and "| dummy+robust |" in md
    assert np.isclose(s[(s.attack == "nes") & (s.setting == "none")]["blocked"], 0).all()
    pr = tp.paired_vs_none(df, 200, 0)
    assert len(pr) == 2 * (len(settings) - 1) * 2 and (pr["R_E_diff_lo"] <= pr["R_E_diff_hi"]).all()
    # a setting whose every row got the undefended answers differs from none by exactly 0
    for (a, b), g in df[df.setting == "raha1"].groupby(["attack", "budget"]):
        if (g["blocked_at"] == 0).all():
            r = pr[(pr.attack == a) & (pr.setting == "raha1") & (pr.budget == b)].iloc[0]
            assert r["R_E_diff"] == 0 and r["external_diff"] == 0
    md = tp.report(s, cfg, None, 5 / bundle.n_eval, pr)
    assert "## Paired against no defense, 120 queries" in md


def test_settings_are_validated():
    assert tp.split_setting("dummy+raha3") == (True, "raha3") and tp.split_setting("none") == (False, None)
    for bad in (["threat_panel.settings=[dummy+none]"], ["threat_panel.settings=[raha4]"],
                ["threat_panel.budgets=[1]"], ["threat_panel.attacks=[whitebox]"], ["threat_panel.budgets=[]"]):
        with pytest.raises(ConfigError, match="threat_panel"):
            load_config("smoke", bad)
