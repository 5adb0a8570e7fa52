"""The α sweep's attack dimension without Ray: planning (paired rows, one chunk store per
attack, the white-box rows untouched by adding attacks) and ``attack_chunk`` running every
attack of ``sweep.attacks`` on the smoke R_T inside a released two-branch model."""
import numpy as np
import pytest
import torch

from raymia.config import ConfigError, SWEEP_ATTACKS, load_config
from raymia.defenses.dummy import CombinedModel
from raymia.models import build_classifier, freeze
from raymia.sweep import (KEY, TRIAL_KEY, SweepModels, attack_chunk, chunk_attack, chunk_id, plan_chunks, plan_rows,
                          rows_key)

pytestmark = pytest.mark.unit


def test_rows_are_paired_across_attacks_and_whitebox_chunks_keep_their_ids():
    one = load_config("smoke")
    four = load_config("smoke", [f"sweep.attacks=[{','.join(SWEEP_ATTACKS)}]"])
    rows = plan_rows(four, 5)
    assert not rows.duplicated(TRIAL_KEY).any()
    by = {a: g[KEY + ["seed"]].reset_index(drop=True) for a, g in rows.groupby("attack")}
    assert set(by) == set(SWEEP_ATTACKS)
    for a in SWEEP_ATTACKS:                     # same (variant, α, target, restart) and the same seeds
        assert by[a].equals(by["whitebox"]), a
    chunks = plan_chunks(rows, 7)
    assert all(c["attack"].nunique() == 1 and c["variant"].nunique() == 1 for c in chunks)
    assert sum(len(c) for c in chunks) == len(rows)
    # adding attacks never re-runs the white-box rows: same chunks, same ids, same store
    wb = [chunk_id(c) for c in chunks if chunk_attack(c) == "whitebox"]
    assert wb == [chunk_id(c) for c in plan_chunks(plan_rows(one, 5), 7)]
    assert rows_key(four, "whitebox") == rows_key(one, "whitebox") == rows_key(one)
    assert len({rows_key(four, a) for a in SWEEP_ATTACKS}) == 4


@pytest.mark.parametrize("override, changed, same", [
    ("query_attack.budget=100", {"nes", "label"}, {"whitebox", "eot"}),
    ("query_attack.forward_batch=8", set(), set(SWEEP_ATTACKS)),      # pieces of a forward: same answers
    ("search.eot_samples=3", {"eot"}, {"whitebox", "nes", "label"}),
    ("attack.latent_bound=2.0", set(SWEEP_ATTACKS), set()),
])
def test_each_attacks_rows_key_covers_its_own_settings(override, changed, same):
    base = load_config("smoke")
    other = load_config("smoke", [override])
    for a in changed:
        assert rows_key(other, a) != rows_key(base, a), (override, a)
    for a in same:
        assert rows_key(other, a) == rows_key(base, a), (override, a)


def test_bad_attack_names_are_config_errors():
    with pytest.raises(ConfigError, match="sweep.attacks"):
        load_config("smoke", ["sweep.attacks=[whitebox,whitebox]"])
    with pytest.raises(ConfigError, match="sweep.attacks"):
        load_config("smoke", ["sweep.attacks=[fgsm]"])
    with pytest.raises(ConfigError, match="check_attacks"):
        load_config("smoke", ["search.check_attacks=[nes]"])


@pytest.fixture(scope="module")
def released(smoke_attack_models):
    """R_T of the smoke preset inside a two-branch released model (the second branch an
    untrained network of R_T's shape: at α = 1 the model is R_T exactly)."""
    m = smoke_attack_models()
    cfg, b = m["cfg"], m["bundle"]
    torch.manual_seed(0)
    dummy = freeze(build_classifier(cfg.target, b.channels, b.private_train.x.shape[-1], b.n_private))
    comb = CombinedModel(freeze(m["rt"]), dummy, alpha=1.0).eval()
    return cfg, SweepModels({"paper": comb}, freeze(m["F"]), {}, {}, {}, torch.device("cpu")), comb, m["F"]


@pytest.mark.parametrize("attack", SWEEP_ATTACKS)
def test_attack_chunk_runs_every_attack_and_scores_under_the_released_model(released, attack):
    cfg0, models, comb, F_ = released
    cfg = load_config("smoke", [f"run.out_root={cfg0.run.out_root}", "attack.iters=30", "query_attack.budget=120",
                                "query_attack.label_budget=150", "query_attack.label_init_budget=64",
                                "search.eot_samples=2", "sweep.alphas=[1.0,0.5]", "attack.restarts=2",
                                f"sweep.attacks=[{attack}]", "sweep.variants=[paper]"])
    chunk = plan_rows(cfg, 5)
    out, images = attack_chunk(cfg, models, chunk)
    assert len(out) == len(chunk) and images.shape[0] == len(chunk)
    assert (out[TRIAL_KEY + ["seed"]].to_numpy() == chunk[TRIAL_KEY + ["seed"]].to_numpy()).all()
    # the row's confidence is R' (not an EOT average, not the oracle's masked answer) at the row's α
    z = torch.tensor(np.stack(out["latent"].to_list()))
    with torch.no_grad():
        x = F_(z)
        p = comb(x, torch.tensor(out["alpha"].to_numpy(), dtype=torch.float32))
    conf = p.gather(1, torch.tensor(out["target"].to_numpy())[:, None])[:, 0].numpy()
    np.testing.assert_allclose(out["target_conf"].to_numpy(), conf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(images.numpy(), x.numpy(), atol=1e-6)
    assert (np.abs(np.stack(out["latent"].to_list())) <= cfg.attack.latent_bound + 1e-6).all()
    if attack == "nes":
        assert (out["queries"] == 120).all()               # exact: the budget, never above
    elif attack == "label":
        assert (out["queries"] <= 150).all() and (out["queries"] > 0).all()
    else:
        assert "queries" not in out
    # every attack raises R_T's confidence in the target over the rows' starting latents
    from raymia.attacks.generator_mia import initial_latents
    with torch.no_grad():
        p0 = comb(F_(initial_latents(chunk["seed"].tolist(), F_.latent_dim).clamp(-3, 3)), 1.0)
    start = p0.gather(1, torch.tensor(chunk["target"].to_numpy())[:, None])[:, 0].numpy()
    at1 = (out["alpha"] == 1.0).to_numpy()
    assert conf[at1].mean() > start[at1].mean() + 0.05, (attack, conf[at1].mean(), start[at1].mean())
