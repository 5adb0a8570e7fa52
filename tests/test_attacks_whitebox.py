"""The white-box attack panel's pieces on the smoke models: priors (eigenfaces, mixed,
pixels) and their projection, the regularised attack (the plain attack when every option is
off, batched rows = separate rows with augmentation), the attacker's pick of restarts,
PGD adversarial training, and the panel pipeline end to end."""
import numpy as np
import pytest
import torch

from raymia.attacks.generator_mia import generator_mia
from raymia.attacks.priors import LinearPrior, MixedPrior, PixelPrior, project
from raymia.attacks.whitebox import WhiteBoxOpts, augment, pick_restarts, total_variation, whitebox_mia
from raymia.models import ProbModel, freeze


@pytest.fixture(scope="module")
def wmodels(smoke_attack_models):
    m = smoke_attack_models()
    return {**m, "model": freeze(ProbModel(m["rt"]))}


def test_whitebox_with_every_option_off_is_the_plain_attack(wmodels):
    m, F = wmodels["model"], wmodels["F"]
    t, s = [0, 1, 2, 3], [11, 12, 13, 14]
    ref = generator_mia(m, F, t, s, iters=15, lr=0.05, bound=3.0)
    res = whitebox_mia(m, F, t, s, opts=WhiteBoxOpts(iters=15, lr=0.05, bound=3.0))
    assert torch.allclose(ref.latents, res.latents, atol=1e-5)
    assert torch.allclose(ref.target_conf, res.target_conf, atol=1e-5)
    assert res.aug_conf.shape == (4,) and bool(((res.aug_conf >= 0) & (res.aug_conf <= 1)).all())


def test_batched_rows_equal_separate_rows_with_augmentation_and_regularisers(wmodels):
    """Each row draws its augmentations from its own seed: alone or in a batch, the same latent."""
    m, F = wmodels["model"], wmodels["F"]
    o = WhiteBoxOpts(iters=8, aug_samples=3, tv_weight=0.3, norm_weight=0.1, select_samples=4)
    t, s = [0, 2, 4], [101, 102, 103]
    batch = whitebox_mia(m, F, t, s, opts=o)
    for i in range(3):
        alone = whitebox_mia(m, F, [t[i]], [s[i]], opts=o)
        assert torch.allclose(batch.latents[i], alone.latents[0], atol=1e-4)
        assert torch.allclose(batch.aug_conf[i], alone.aug_conf[0], atol=1e-5)
    # the regularisers change the trajectory (they are in the loss, not decoration)
    plain = whitebox_mia(m, F, t, s, opts=WhiteBoxOpts(iters=8))
    assert not torch.allclose(plain.latents, batch.latents, atol=1e-3)


def test_augment_is_seeded_per_row_and_keeps_pixels_in_range(wmodels):
    x = wmodels["bundle"].aux.x[:2]
    g1 = [torch.Generator().manual_seed(k) for k in (5, 6)]
    g2 = [torch.Generator().manual_seed(k) for k in (5, 6)]
    a, b = augment(x, 4, g1, 2.0, True, 0.05), augment(x, 4, g2, 2.0, True, 0.05)
    assert a.shape == (8, *x.shape[1:]) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a[0], a[1])                  # different draws per copy
    assert float((augment(x, 1, [torch.Generator().manual_seed(0)] * 2, 0.0, False, 0.0) - x).abs().max()) < 1e-5
    assert float(total_variation(torch.zeros(1, 1, 8, 8))) == 0.0


def test_linear_prior_expresses_its_own_faces_and_projects_unseen_ones(wmodels):
    b = wmodels["bundle"]
    aux = b.aux.x
    full = LinearPrior.fit(aux, aux.shape[0] - 1)
    rec = full(full.encode(aux))
    assert float((rec - aux).abs().max()) < 1e-3           # the full basis reproduces its images
    with pytest.raises(ValueError, match="components"):
        LinearPrior.fit(aux, aux.shape[0])
    small = LinearPrior.fit(aux, 20)
    faces = b.private_train.x[:6]                          # people the attacker never saw
    z = project(small, faces, iters=50)
    mse = float((small(z) - faces).pow(2).mean())
    mean_mse = float((small.mean.view(1, *faces.shape[1:]) - faces).pow(2).mean())
    assert mse < 0.5 * mean_mse
    px = PixelPrior(faces.shape[1:])
    assert float((px(project(px, faces, iters=5)) - faces).abs().max()) < 1e-5
    mixed = freeze(MixedPrior(wmodels["F"], small, 0.5))
    zm = project(mixed, faces, iters=40, restarts=2)
    f_only = project(wmodels["F"], faces, iters=40, restarts=2)
    assert float((mixed(zm) - faces).pow(2).mean()) < float((wmodels["F"](f_only) - faces).pow(2).mean())


def test_pick_restarts_takes_the_highest_score_per_target():
    assert pick_restarts([3, 3, 1, 1, 1], torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7])).tolist() == [1, 4]


def test_pgd_stays_in_its_ball_and_raises_the_loss(wmodels):
    import torch.nn.functional as nnf

    from raymia.training import pgd_l2
    rt, b = wmodels["rt"], wmodels["bundle"]
    x, y = b.private_train.x[:8], b.private_train.y[:8]
    adv = pgd_l2(rt, x, y, eps=0.5, steps=4)
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-4
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert nnf.cross_entropy(rt.training_logits(adv, y), y) > nnf.cross_entropy(rt.training_logits(x, y), y)


def test_whitebox_panel_pipeline_on_smoke(wmodels, smoke_runs, tmp_path):
    import pandas as pd

    from raymia.config import ConfigError, load_config
    from raymia.kinds import artifact_dir
    from raymia.pipelines import whitebox_panel as wp
    from raymia.progress import quiet
    from raymia.training import train_artifact
    panel = ('whitebox.panel={"F": [], "eigenfaces 20": ["whitebox.prior=linear", "whitebox.components=20"], '
             '"adversarial victim": ["target.adv_eps=0.5", "target.adv_steps=2", "target.epochs=6"]}')
    cfg = load_config("smoke", [f"run.out_root={smoke_runs}", "whitebox.iters=20", "whitebox.restarts=2",
                                "whitebox.project_iters=20", "whitebox.select_samples=4", panel])
    victims = [wp.attempt_config(cfg, ov) for ov in cfg.whitebox.panel.values()]
    for v in victims:                 # in this process (cached under smoke_runs): the job starts no Ray
        train_artifact(v, "target", wmodels["bundle"], quiet)
    assert artifact_dir(victims[2], "target") != artifact_dir(victims[0], "target")
    out = wp.run(cfg, str(tmp_path / "wb"))
    for f in ("whitebox_panel.md", "whitebox_summary.csv", "whitebox_trials.csv", "ceilings.csv", "config.yaml"):
        assert (out / f).exists(), f
    s = pd.read_csv(out / "whitebox_summary.csv")
    n_t = len(wp.targets_of(cfg, wmodels["bundle"]))
    assert list(s.attempt[s.draw == 0]) == ["F", "eigenfaces 20", "adversarial victim"]
    assert (s.draw == 1).sum() in (1, 2) and "F" in set(s.attempt[s.draw == 1])   # best + reference, fresh restarts
    for col in ("external_trial", "R_E_picked", "classical_picked"):
        assert ((s[col + "_lo"] <= s[col] + 1e-9) & (s[col] <= s[col + "_hi"] + 1e-9)).all()
    tr = pd.read_csv(out / "whitebox_trials.csv")
    assert (tr.groupby(["attempt", "draw"]).size() == 2 * n_t).all()
    assert (tr.groupby(["attempt", "draw", "target"]).picked.sum() == 1).all()
    sel, rep = tr[(tr.attempt == "F") & (tr.draw == 0)], tr[(tr.attempt == "F") & (tr.draw == 1)]
    assert set(sel.seed).isdisjoint(rep.seed)               # the report draw's restarts are new
    c = pd.read_csv(out / "ceilings.csv")
    own = int(torch.isin(wmodels["bundle"].private_train.y, torch.tensor(wp.targets_of(cfg, wmodels["bundle"]))).sum())
    assert list(c.prior) == ["gan", "linear"] and (c.images == own).all()
    with pytest.raises(ConfigError, match="whitebox.panel"):
        load_config("smoke", ['whitebox.panel={"a": ["no equals sign"]}'])
    with pytest.raises(ConfigError, match="whitebox: components"):      # an attempt is checked as a whole
        wp.attempt_config(cfg, ["whitebox.iters=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        wp.attempt_config(cfg, ["whitebox.bogus=1"])
