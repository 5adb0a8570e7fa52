"""Dummy-model defense, combined model, generator MIA and the evaluator's scoring (no Ray)."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raymia.attacks.generator_mia import generator_mia
from raymia.config import ClassifierCfg, ConfigError, GanCfg, load_config
from raymia.data import Split
from raymia.defenses.dummy import CombinedModel, dummy_training_set, uniform_ce
from raymia.evaluation import ReconstructionScorer, bootstrap_ci, recommend, summarize
from raymia.models import build_classifier, build_generator, freeze, recalibrate_bn
from raymia.sweep import KEY, ChunkStore, chunk_id, plan_chunks, plan_rows, resolve_targets


def _tiny_nets(n_classes=6, size=16, seed=0):
    torch.manual_seed(seed)
    c = ClassifierCfg(arch="faceresnet", width=4, blocks=[1, 1], embed_dim=16, loss="cosface")
    rt = freeze(build_classifier(c, 1, size, n_classes))
    rd = freeze(build_classifier(c, 1, size, n_classes))
    G = build_generator(GanCfg(latent_dim=8, ngf=4), 1, size)
    recalibrate_bn(G, batches=4, batch_size=64, device="cpu")
    return rt, rd, freeze(G)


def test_combined_model_is_eq1():
    rt, rd, _ = _tiny_nets()
    comb = CombinedModel(rt, rd, alpha=0.3).eval()
    x = torch.rand(5, 1, 16, 16)
    pt, pd_ = F.softmax(rt(x), 1), F.softmax(rd(x), 1)
    assert torch.allclose(comb(x), 0.3 * pt + 0.7 * pd_, atol=1e-6)
    a = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.9])
    assert torch.allclose(comb(x, a), a[:, None] * pt + (1 - a[:, None]) * pd_, atol=1e-6)
    assert torch.allclose(comb(x).sum(1), torch.ones(5), atol=1e-5)       # still a confidence vector
    # to its holder it is one network: a single forward, one output head, one state dict
    assert set(k.split(".")[0] for k in comb.state_dict()) == {"alpha", "target", "dummy"}


def test_dummy_training_set_follows_the_paper():
    _, _, G = _tiny_nets()
    ds = dummy_training_set(G, n=4, m=200, sigma2=1.0, sigma_tilde2=0.0625, seed=3, device="cpu")
    assert ds["anchor_x"].shape == (4, 1, 16, 16) and ds["neighbour_x"].shape == (800, 1, 16, 16)
    assert torch.equal(ds["neighbour_y"], torch.arange(4).repeat_interleave(200))
    spread = ds["neighbour_z"] - ds["anchor_z"].repeat_interleave(200, 0)
    assert float(spread.std()) == pytest.approx(0.25, rel=0.05)          # sqrt(0.0625)
    assert float(ds["anchor_z"].std()) == pytest.approx(1.0, rel=0.3)    # sigma^2 = 1
    again = dummy_training_set(G, n=4, m=200, sigma2=1.0, sigma_tilde2=0.0625, seed=3, device="cpu")
    assert torch.equal(again["anchor_z"], ds["anchor_z"])                # seeded


def test_uniform_ce_is_zero_only_at_uniform():
    assert float(uniform_ce(torch.zeros(3, 7))) == pytest.approx(0.0, abs=1e-6)
    assert float(uniform_ce(torch.randn(3, 7) * 3)) > 0.05


def test_batched_rows_follow_their_separate_trajectories():
    """Rows with their own target, alpha and restart seed in one batch give the same
    gradients as separate runs, and (within float noise amplified by Adam) the same path."""
    rt, rd, G = _tiny_nets()
    comb = CombinedModel(rt, rd).eval()
    targets, seeds, alphas = [0, 3, 5, 3], [11, 12, 13, 14], [1.0, 0.5, 0.0, 0.25]
    batched = generator_mia(comb, G, targets, seeds, alphas, iters=1, lr=0.0)
    # one step with lr=0 leaves the start; compare per-row gradients of the summed loss
    xi = batched.latents.clone().requires_grad_(True)
    p = comb(G(xi), torch.tensor(alphas))
    (-torch.log(p[torch.arange(4), torch.tensor(targets)])).sum().backward()
    for i in range(4):
        xs = batched.latents[i:i + 1].clone().requires_grad_(True)
        ps = comb(G(xs), alphas[i])
        (-torch.log(ps[0, targets[i]])).backward()
        assert torch.allclose(xi.grad[i], xs.grad[0], rtol=1e-4, atol=1e-6)
    full = generator_mia(comb, G, targets, seeds, alphas, iters=15, lr=0.05)
    for i in range(4):
        one = generator_mia(comb, G, [targets[i]], [seeds[i]], [alphas[i]], iters=15, lr=0.05)
        assert torch.allclose(full.latents[i], one.latents[0], atol=1e-3)
        assert float(full.target_conf[i]) == pytest.approx(float(one.target_conf[0]), abs=1e-3)


def test_attack_refuses_train_mode_models():
    rt, rd, G = _tiny_nets()
    comb = CombinedModel(rt, rd)
    comb.train()
    with pytest.raises(ValueError, match="eval mode"):
        generator_mia(comb, G, [0], [0], [1.0], iters=1)


def test_attack_raises_target_confidence():
    rt, rd, G = _tiny_nets()
    comb = CombinedModel(rt, rd).eval()
    start = generator_mia(comb, G, [2, 4], [1, 2], [1.0, 1.0], iters=1, lr=0.0)
    end = generator_mia(comb, G, [2, 4], [1, 2], [1.0, 1.0], iters=60, lr=0.05)
    assert bool((end.target_conf > start.target_conf).all())
    assert float(end.latents.abs().max()) <= 3.0 + 1e-6                    # prior's range


class _Probe(nn.Module):
    """An 'evaluator' whose logits are the first n pixels of the image (and features the rest)."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.head = nn.Identity()

    def embed(self, x):
        return x.flatten(1)[:, : self.n]


def test_evaluator_top5_and_rank():
    n_eval = 8
    scorer = ReconstructionScorer(_Probe(n_eval), Split(torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2])),
                                  torch.tensor([2, 5, 7]), device="cpu")
    logits = torch.tensor([[0., 1, 9, 2, 3, 4, 5, 6],       # class 2 ranked 1st
                           [9., 8, 7, 6, 5, 1, 4, 3],       # class 5 ranked 8th
                           [1., 2, 3, 9, 9, 8, 7, 6],       # class 7 ranked 5th
                           [1., 7, 3, 9, 9, 8, 7, 6]])      # class 7 ranked 6th
    imgs = torch.zeros(4, 1, 4, 4)
    imgs.view(4, -1)[:, :n_eval] = logits
    out = scorer.score(imgs, [0, 1, 2, 2])
    assert out["eval_rank"].tolist() == [1, 8, 5, 6]
    assert out["success_top1"].tolist() == [True, False, False, False]
    assert out["success_top5"].tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="outside R_T's classes"):
        scorer.score(imgs, [0, 1, 3, 0])


def test_summary_bootstrap_and_recommendation():
    rows = []
    for alpha, hit in [(1.0, [1, 1, 1, 0]), (0.5, [1, 0, 0, 0]), (0.0, [0, 0, 0, 0])]:
        for t, h in enumerate(hit):
            for r in range(2):
                rows.append({"variant": "paper", "alpha": alpha, "target": t, "restart": r,
                             "success_top5": bool(h and (r == 0 or alpha == 1.0)), "success_top1": False,
                             "dist_private": 0.5, "dist_anchor": 0.4})
    acc = pd.DataFrame({"variant": "paper", "alpha": [1.0, 0.5, 0.0], "accuracy": [0.95, 0.945, 0.4]})
    s = summarize(pd.DataFrame(rows), acc, n_boot=500)
    top = s.set_index("alpha")
    assert top.loc[1.0, "mia_success_top5"] == pytest.approx(0.75)
    assert top.loc[0.5, "mia_success_top5"] == pytest.approx(1 / 8)          # per trial
    assert top.loc[0.5, "mia_best_restart_top5"] == pytest.approx(1 / 4)     # best of restarts
    assert top.loc[1.0, "ci_low"] <= 0.75 <= top.loc[1.0, "ci_high"]
    rec = recommend(s, acc_target=0.95, tolerance=0.01)
    assert rec["paper"]["alpha"] == 0.5                                       # alpha=0 breaks accuracy
    lo, hi = bootstrap_ci(np.array([1.0, 1.0, 1.0]))
    assert lo == hi == 1.0


def test_ci_accuracy_rule_does_not_hinge_on_one_image():
    """On 60 test faces with R_T at 100%: one lost face excludes an alpha under the point rule
    (tolerance 1 point), not under the CI rule; four lost faces exclude it under both."""
    from raymia.evaluation import admissible
    rng = np.random.default_rng(0)
    rows = []
    for alpha, lost in ((1.0, 0), (0.6, 1), (0.4, 3), (0.2, 4)):
        d = np.zeros(60)
        d[rng.choice(60, lost, replace=False)] = 1.0
        lo, hi = bootstrap_ci(d, 1000, 0)
        rows.append({"variant": "calibrated", "alpha": alpha, "accuracy": 1 - lost / 60, "acc_drop_ci_low": lo,
                     "mia_success_top5": alpha})
    g = pd.DataFrame(rows)
    assert admissible(g, 1.0, 0.01, "point").tolist() == [True, False, False, False]
    assert admissible(g, 1.0, 0.01, "ci").tolist() == [True, True, True, False]
    assert recommend(g, 1.0, 0.01, "ci")["calibrated"]["alpha"] == 0.4
    with pytest.raises(ValueError, match="CI"):
        admissible(g.drop(columns="acc_drop_ci_low"), 1.0, 0.01, "ci")


def test_plan_chunks_store_resume(tmp_path):
    cfg = load_config("smoke", ["attack.restarts=2"])
    rows = plan_rows(cfg, 5)
    assert len(rows) == 2 * 4 * 5 * 2 and not rows.duplicated(KEY).any()      # variants x alphas x targets x restarts
    chunks = plan_chunks(rows, 7)
    assert all(c["variant"].nunique() == 1 for c in chunks)
    assert [chunk_id(c) for c in chunks] == [chunk_id(c) for c in plan_chunks(plan_rows(cfg, 5), 7)]
    store = ChunkStore(tmp_path)
    for c in chunks[:3]:
        store.write(chunk_id(c), c.assign(success_top5=True))
    store.write(chunk_id(chunks[0]), chunks[0].assign(success_top5=False))   # a retried chunk
    assert store.done() == {chunk_id(c) for c in chunks[:3]}
    got = store.read_all()
    assert len(got) == sum(len(c) for c in chunks[:3]) and not got.duplicated(KEY).any()
    # a half-written shard (killed writer) is never taken for a finished chunk
    (tmp_path / f".{chunk_id(chunks[4])}.123.tmp").write_bytes(b"partial")
    assert chunk_id(chunks[4]) not in store.done()


def test_unknown_target_is_a_clear_error():
    cfg = load_config("smoke", ["attack.targets=[0, 99]"])
    with pytest.raises(ConfigError, match=r"unknown target\(s\) \[99\]"):
        resolve_targets(cfg, 5)


def test_gated_rule_passes_real_faces_and_yields_to_a_confident_dummy():
    rt, rd, _ = _tiny_nets()
    comb = CombinedModel(rt, rd, alpha=0.25, rule="gated", gate_tau=0.5, gate_temp=0.05)
    p_t = F.softmax(torch.randn(3, 6), 1)
    unsure = torch.full((3, 6), 1 / 6)                              # R_dmy on a real face (calibrated)
    sure = F.one_hot(torch.tensor([1, 2, 3]), 6).float() * 0.97 + 0.005   # R_dmy near its anchors
    assert torch.allclose(comb.mix(p_t, unsure, 0.25), p_t, atol=1e-3)
    assert torch.allclose(comb.mix(p_t, sure, 0.25), 0.25 * p_t + 0.75 * sure, atol=1e-3)
    assert torch.allclose(comb.mix(p_t, sure, 1.0), p_t)            # alpha = 1 is R_T alone
    a = torch.tensor([1.0, 0.5, 0.0])
    w = comb.dummy_weight(sure, a)[:, 0]
    assert torch.allclose(w, (1 - a) * torch.sigmoid(torch.tensor((0.975 - 0.5) / 0.05)), atol=1e-4)
    with pytest.raises(ValueError, match="combination rule"):
        CombinedModel(rt, rd, rule="max")


def test_several_and_far_anchors():
    rt, _, G = _tiny_nets()
    real = torch.rand(12, 1, 16, 16)
    real_feats = F.normalize(rt.embed(real), dim=1)
    ds = dummy_training_set(G, n=3, m=5, sigma2=1.0, sigma_tilde2=0.0625, seed=0, device="cpu",
                            anchors_per_class=2)
    assert ds["anchor_y"].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(ds["neighbour_y"], ds["anchor_y"].repeat_interleave(5))
    closest = lambda x: float((F.normalize(rt.embed(x), dim=1) @ real_feats.T).max(1).values.mean())
    rnd = dummy_training_set(G, n=6, m=1, sigma2=1.0, sigma_tilde2=0.0625, seed=1, device="cpu")
    far = dummy_training_set(G, n=6, m=1, sigma2=1.0, sigma_tilde2=0.0625, seed=1, device="cpu",
                             anchor_choice="far", anchor_pool=8, embed=rt.embed, real_feats=real_feats)
    assert closest(far["anchor_x"]) < closest(rnd["anchor_x"])
    with pytest.raises(ValueError, match="far"):
        dummy_training_set(G, n=2, m=1, sigma2=1.0, sigma_tilde2=0.1, seed=0, device="cpu", anchor_choice="far")
