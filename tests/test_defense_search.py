"""The defense search job on the smoke preset: Tune search (Optuna + ASHA) with the attack
in the loop, the multi-seed check against the naive and the adaptive attacker, outputs,
and the best defense as a preset the α sweep accepts."""

import json

import pandas as pd
import pytest
import torch

from raymia.attacks.adaptive import EOTModel, random_transform
from raymia.config import load_config
from raymia.search import apply_params, objective, pareto_front

from raymia.pipelines import defense_search


def test_apply_params_and_objective():
    cfg = load_config("smoke")
    c = apply_params(cfg, {"sigma_tilde2": 0.1, "m": 7.0, "rule": "gated", "anchor_choice": "far"})
    assert c.dummy.sigma_tilde2 == 0.1 and c.dummy.m == 7 and isinstance(c.dummy.m, int)
    assert c.combine.rule == "gated" and c.dummy.anchor_choice == "far" and cfg.combine.rule == "linear"
    with pytest.raises(KeyError, match="unknown defense parameter"):
        apply_params(cfg, {"lr": 1.0})
    s = pd.DataFrame({"variant": "x", "alpha": [1.0, 0.5, 0.1], "mia_success_top5": [0.8, 0.3, 0.1],
                      "ci_low": 0, "ci_high": 1, "mia_best_restart_top5": 0.5, "best_ci_low": 0, "best_ci_high": 1,
                      "mia_success_top1": 0.1, "accuracy": [0.98, 0.975, 0.5]})
    o = objective(s, acc_rt=0.98, tolerance=0.01)
    assert o["feasible"] and o["best_alpha"] == 0.5 and o["objective"] == pytest.approx(0.3)
    bad = objective(s.assign(accuracy=0.9), acc_rt=0.98, tolerance=0.01)
    assert not bad["feasible"] and bad["objective"] == pytest.approx(1.07)


def test_pareto_front():
    pts = pd.DataFrame({"mia_success_top5": [0.1, 0.2, 0.3, 0.15], "accuracy": [0.5, 0.9, 0.95, 0.4]})
    assert pareto_front(pts).index.tolist() == [0, 1, 2]


def test_eot_model_averages_transforms():
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    y = random_transform(x, shift=2, noise=0.0)
    assert y.shape == x.shape
    y.sum().backward()
    assert float(x.grad.abs().sum()) > 0
    const = torch.nn.Module()
    const.forward = lambda inp, a=None: torch.softmax(inp.flatten(1)[:, :4] * 0 + torch.arange(4.0), 1)
    eot = EOTModel(const, samples=3)
    assert torch.allclose(eot(torch.rand(2, 1, 8, 8), torch.tensor([1.0, 0.5])), torch.softmax(torch.arange(4.0), 0).expand(2, 4))


@pytest.fixture(scope="module")
def smoke_search(ray_session, smoke_runs):
    # the check's attackers: the naive (white-box) and adaptive (EOT) ones, and the label-only attack
    cfg = load_config("smoke", [f"run.out_root={smoke_runs}", "attack.restarts=2",
                                "search.check_attacks=[whitebox,eot,label]", "query_attack.label_budget=100",
                                "query_attack.label_init_budget=64"])
    out = defense_search.run(cfg, "smoke")
    return cfg, out, defense_search


def test_search_outputs(smoke_search):
    cfg, out, _ = smoke_search
    for f in ("search_trials.parquet", "check_trials.parquet", "check_summary.csv", "pareto.png",
              "best_defense.yaml", "search_report.md", "config.yaml", "run.json"):
        assert (out / f).exists(), f
    trials = pd.read_parquet(out / "search_trials.parquet")
    assert len(trials) == cfg.search.num_samples
    assert trials["round"].between(1, cfg.attack.restarts).all()
    check = pd.read_csv(out / "check_summary.csv")
    assert set(check["defense"]) == {"best", "paper", "calibrated"}
    assert set(check["attacker"]) == {"naive", "adaptive", "label"}
    assert check["label"].notna().all()
    # every attacker is reported at the α deployed against the naive one, by every judge
    for d, g in check.groupby("defense"):
        assert g["deployed_alpha"].nunique() == 1, d
    assert check[["mia_top5_deployed", "external_top5_deployed", "classical_top5_deployed"]].notna().all().all()


def test_best_defense_is_a_preset(smoke_search):
    cfg, out, _ = smoke_search
    best = load_config(str(out / "best_defense.yaml"))
    assert best.data.private_ids == cfg.data.private_ids           # extends the searched preset
    assert best.sweep.variants == [best.dummy.variant] and best.serve.alpha in cfg.search.alphas


def test_rerun_resumes_the_finished_search(smoke_search):
    cfg, out, job = smoke_search
    before = pd.read_parquet(out / "search_trials.parquet")
    job.run(cfg, "smoke")
    after = pd.read_parquet(out / "search_trials.parquet")
    assert sorted(after["trial_id"]) == sorted(before["trial_id"])  # restored, not searched again


def test_local_check_without_ray_matches_the_tune_check(smoke_search):
    """The check's Ray-free path (for a GPU box without Ray) gives the same decisions.  The
    baselines' combinations are handed over as finished (the local check resumes per
    combination), so only the best defense's three (one per attacker) are recomputed here."""
    cfg, out, job = smoke_search
    tune_check = pd.read_csv(out / "check_summary.csv")
    local_out = out / "local"
    (local_out / "check_local").mkdir(parents=True, exist_ok=True)
    (local_out / "search_trials.parquet").write_bytes((out / "search_trials.parquet").read_bytes())
    for _, r in pd.read_parquet(out / "check_trials.parquet").iterrows():
        if r["defense"] != "best":
            (local_out / "check_local" / f"{r['defense']}-s{r['seed']}-{r['attacker']}.json").write_text(
                json.dumps(r.to_dict(), default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o)))
    job.run(cfg, "smoke", out=local_out, check_only=True, local=True)
    assert len(list((local_out / "check_local").glob("best-*.json"))) == 3      # computed here
    local = pd.read_csv(local_out / "check_summary.csv")
    merged = tune_check.merge(local, on=["defense", "attacker"], suffixes=("_tune", "_local"))
    assert len(merged) == 9
    best = merged[merged["defense"] == "best"]
    assert (best["best_alpha_tune"] == best["best_alpha_local"]).mean() >= 0.5
    assert (best["mia_top5_tune"] - best["mia_top5_local"]).abs().max() <= 0.2
    rest = merged[merged["defense"] != "best"]                                  # resumed: identical
    assert (rest["mia_top5_tune"] - rest["mia_top5_local"]).abs().max() < 1e-9
    from raymia.config import ConfigError
    with pytest.raises(ConfigError, match="--check-only"):
        job.run(cfg, "smoke", out=out / "local", local=True)


def test_eot_transforms_are_reproducible():
    m = torch.nn.Module()
    m.forward = lambda inp, a=None: torch.softmax(inp.flatten(1)[:, :5] * 50, 1)
    x = torch.rand(4, 1, 8, 8)
    a, b = EOTModel(m, samples=3, seed=7), EOTModel(m, samples=3, seed=7)
    torch.manual_seed(0); ya = a(x)
    torch.manual_seed(1); yb = b(x)               # the process RNG does not matter
    assert torch.equal(ya, yb) and not torch.equal(a(x), ya)   # but successive calls draw anew
