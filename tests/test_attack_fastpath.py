"""The attack engine's fast path, on CPU: BatchNorm folding and image-channel padding
leave outputs unchanged, the fast path's decisions match the fp32 run, batching stays a
pure speed-up, prepared copies are cached and refreshed, and the paper-scale stem has the
FLOPs the benchmark assumes.  (bf16 autocast runs on CPU too; torch.compile and CUDA
graphs are exercised by bench/bench_attack.py on a GPU.)"""
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from raymia.attacks.generator_mia import (FastPath, MIAResult, compare_results, generator_mia, pad_image_channels,
                                          prepare, score_latents)
from raymia.config import ClassifierCfg, ConfigError, GanCfg, load_config
from raymia.defenses.dummy import CombinedModel
from raymia.models import ProbModel, build_classifier, build_generator, fold_batchnorm, freeze


def _random_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def nets():
    """Small random R_T, R_dmy (imagenet stem, 3 channels, 32x32) and generator, eval mode,
    with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    c = ClassifierCfg(width=8, blocks=[1, 1], stem="imagenet", embed_dim=16)
    rt = freeze(_random_bn(build_classifier(c, 3, 32, 10), 1))
    rd = freeze(_random_bn(build_classifier(c, 3, 32, 10), 2))
    G = freeze(_random_bn(build_generator(GanCfg(latent_dim=16, ngf=8), 3, 32), 3))
    return CombinedModel(rt, rd).eval(), G


ROWS = dict(targets=[0, 1, 2, 3, 4, 5, 6, 7], seeds=[11, 12, 13, 14, 15, 16, 17, 18],
            alphas=[1.0, 0.5, 0.2, 1.0, 0.7, 0.0, 0.3, 0.9])


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_fold_batchnorm_keeps_classifier_outputs(stem):
    model = freeze(_random_bn(build_classifier(ClassifierCfg(width=8, blocks=[2, 1], stem=stem), 3, 32, 7), 4))
    folded = fold_batchnorm(model)
    x = torch.rand(5, 3, 32, 32)
    assert _n_bn(folded) == 0 and _n_bn(model) > 0            # a copy: the original keeps its BatchNorms
    assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert not any(p.requires_grad for p in folded.parameters())


def test_fold_batchnorm_generator_and_combined(nets):
    comb, G = nets
    z = torch.randn(4, G.latent_dim)
    fg, fc = fold_batchnorm(G), fold_batchnorm(comb)
    assert _n_bn(fg) == 0 and _n_bn(fc) == 0
    assert fg.latent_dim == G.latent_dim
    assert torch.allclose(fg(z), G(z), atol=1e-5)              # linear + BN1d and transposed convs + BN2d
    a = torch.tensor([1.0, 0.5, 0.2, 0.0])
    assert torch.allclose(fc(G(z), a), comb(G(z), a), atol=1e-5)


def test_fold_batchnorm_refuses_train_mode():
    model = build_classifier(ClassifierCfg(width=8, blocks=[1]), 1, 16, 3)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())


def test_pad_image_channels_is_exact_and_falls_back(nets):
    comb, G = nets
    m2, g2 = pad_image_channels(comb, G, "cpu")
    assert m2 is not comb and g2 is not G
    z = torch.randn(3, G.latent_dim)
    assert g2(z).shape[1] == 8 and G(z).shape[1] == 3
    assert torch.allclose(m2(g2(z)), comb(G(z)), atol=1e-6)

    class ChannelScaled(nn.Module):        # reads the image with a 3-channel constant: cannot be padded
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("scale", torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1))

        def forward(self, x):
            return self.inner(x * self.scale)

    odd = ProbModel(ChannelScaled(comb.target)).eval()
    m3, g3 = pad_image_channels(odd, G, "cpu")
    assert m3 is odd and g3 is G


def test_fast_path_matches_fp32_decisions(nets):
    comb, G = nets
    ref = generator_mia(comb, G, **ROWS, iters=25, lr=0.05)
    fast = generator_mia(comb, G, **ROWS, iters=25, lr=0.05,
                         fast=FastPath(precision="bf16", channels_last=True, fold_bn=True, pad_channels=True))
    cmp = compare_results(ref, fast, k=5)
    assert cmp["rows"] == 8 and cmp["top5_agreement"] >= 0.875 and cmp["conf_spearman"] > 0.9
    # the final numbers come from the original fp32 networks, whatever the loop ran on
    _, conf, rank = score_latents(comb, G, fast.latents, torch.tensor(ROWS["targets"]), torch.tensor(ROWS["alphas"]))
    assert torch.allclose(conf, fast.target_conf) and torch.equal(rank, fast.target_rank)
    assert (fast.target_conf > 0.1).float().mean() > (ref.target_conf > 0.1).float().mean() - 0.2
    # and the attack did something: confidence rose from the start
    start = generator_mia(comb, G, **ROWS, iters=1, lr=1e-6)
    assert float(fast.target_conf.mean()) > float(start.target_conf.mean())


def test_fast_path_batching_is_only_a_speedup(nets):
    comb, G = nets
    fp = FastPath(channels_last=True, fold_bn=True, pad_channels=True)   # fp32: trajectories comparable
    batched = generator_mia(comb, G, **ROWS, iters=15, fast=fp)
    for i in (0, 5):
        one = generator_mia(comb, G, [ROWS["targets"][i]], [ROWS["seeds"][i]], [ROWS["alphas"][i]], iters=15, fast=fp)
        assert torch.allclose(one.latents[0], batched.latents[i], atol=1e-3)
    ref = generator_mia(comb, G, **ROWS, iters=15)
    assert torch.allclose(ref.latents, batched.latents, atol=1e-3)


def test_prepared_copies_are_cached_and_refreshed(nets):
    comb, G = nets
    fp = FastPath(fold_bn=True)
    p1, p2 = prepare(comb, G, fp, "cpu"), prepare(comb, G, fp, "cpu")
    assert p1 is p2 and _n_bn(p1.model) == 0 and _n_bn(comb) > 0
    other = dataclasses.replace(fp, channels_last=True)
    assert prepare(comb, G, other, "cpu") is not p1
    with torch.no_grad():
        w = comb.target.head.weight
        w.mul_(1.0)                         # an in-place change of a weight invalidates the copy
    assert prepare(comb, G, fp, "cpu") is not p1


def test_fast_path_from_config_and_validation():
    cfg = load_config("vggface2")
    fp = FastPath.of(cfg.attack)
    assert fp == FastPath(precision="bf16", channels_last=True, fold_bn=True, compile="default", pad_channels=True)
    assert FastPath.of(None).is_reference and FastPath.of(load_config("orl").attack).is_reference
    with pytest.raises(ValueError, match="precision"):
        FastPath.of({"precision": "fp8"})
    with pytest.raises(ConfigError, match="attack.compile"):
        load_config("orl", ["attack.compile=fastest"])
    with pytest.raises(ConfigError, match="target.stem"):
        load_config("orl", ["target.stem=vit"])


def test_compare_results_counts_disagreements():
    def res(conf, rank):
        c = torch.tensor(conf)
        return MIAResult(torch.zeros(len(c), 2), torch.zeros(len(c), 1, 2, 2), -c.log(), c, 0.0, torch.tensor(rank))
    a = res([0.9, 0.5, 0.1, 0.05], [1, 1, 4, 9])
    b = res([0.8, 0.05, 0.2, 0.01], [1, 7, 3, 12])
    cmp = compare_results(a, b, k=5)
    assert cmp["top1_agreement"] == 0.75 and cmp["top5_agreement"] == 0.75
    assert cmp["top1_rate_ref"] == 0.5 and cmp["top1_rate_fast"] == 0.25
    assert cmp["median_split_agreement"] == 0.75          # fp32 median 0.3: row 1 changes side
    cmp2 = compare_results(a, b, decide=lambda imgs: [True, False, False, True])
    assert cmp2["decision_agreement"] == 1.0


def test_paper_scale_stem_flops():
    """ResNet-18 with the imagenet stem on 64x64 RGB and 2141 classes costs ~0.30 GFLOP per
    forward (the GPU probe's torchvision ResNet-18); the cifar stem ~15x that."""
    cfg = load_config("vggface2")
    x = torch.rand(1, 3, 64, 64)

    def gflop(stem):
        m = freeze(build_classifier(dataclasses.replace(cfg.target, stem=stem), 3, 64, 2141))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        return fc.get_total_flops() / 1e9
    imagenet, cifar = gflop("imagenet"), gflop("cifar")
    assert 0.28 < imagenet < 0.32
    assert 12 < cifar / imagenet < 18
