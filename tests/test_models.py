import pytest
import torch
import torch.nn.functional as F

from raymia.config import ClassifierCfg, GanCfg
from raymia.models import (CosFaceHead, MinibatchDiscrimination, build_classifier, build_discriminator,
                           build_generator, diff_augment, recalibrate_bn)


def test_cosface_head_margin_and_scale():
    torch.manual_seed(0)
    head = CosFaceHead(16, 5, s=10.0, m=0.3)
    emb, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    plain, margin = head(emb), head.margin_logits(emb, y)
    diff = plain - margin
    onehot = F.one_hot(y, 5).bool()
    assert torch.allclose(diff[onehot], torch.full((8,), 3.0), atol=1e-5)   # s * m on the true class
    assert torch.allclose(diff[~onehot], torch.zeros(32), atol=1e-6)        # nothing elsewhere
    assert plain.abs().max() <= 10.0 + 1e-5                                 # |s cos| <= s
    # the margin makes the loss strictly larger: the true class must win by m
    assert F.cross_entropy(margin, y) > F.cross_entropy(plain, y)
    # scale invariance of the embedding: cosine logits ignore the norm
    assert torch.allclose(head(emb * 7.0), plain, atol=1e-5)


@pytest.mark.parametrize("arch, size, ch", [("faceresnet", 32, 1), ("faceresnet", 64, 3),
                                            ("smallcnn", 32, 3), ("lenet5", 28, 1), ("lenet5", 32, 1)])
def test_classifier_shapes(arch, size, ch):
    c = ClassifierCfg(arch=arch, width=8, loss="ce" if arch == "lenet5" else "cosface")
    m = build_classifier(c, ch, size, 7).eval()
    assert m(torch.rand(3, ch, size, size)).shape == (3, 7)


@pytest.mark.parametrize("size, ch", [(32, 1), (64, 3)])
def test_gan_shapes_and_range(size, ch):
    g = GanCfg(latent_dim=12, ngf=8, ndf=8)
    G, D = build_generator(g, ch, size), build_discriminator(g, ch, size)
    with torch.no_grad():
        x = G(torch.randn(4, 12))
    assert x.shape == (4, ch, size, size) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert D(x).shape == (4,)


def test_minibatch_discrimination_sees_the_batch():
    torch.manual_seed(0)
    mbd = MinibatchDiscrimination(6, b=4, c=3)
    f = torch.randn(5, 6)
    same = mbd(f.repeat(1, 1)[[0, 0, 0, 0, 0]])   # five identical samples: each has 4 exact twins
    assert torch.allclose(same[:, 6:], torch.full((5, 4), 4.0), atol=1e-5)
    spread = mbd(f * 100)                          # far apart: closeness features ~ 0
    assert float(spread[:, 6:].max().detach()) < 1e-3


def test_diffaugment_policies_are_differentiable():
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, "color,translation,cutout")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, "rotate")


def test_recalibrated_generator_eval_matches_train_statistics():
    torch.manual_seed(0)
    G = build_generator(GanCfg(latent_dim=8, ngf=8), 1, 16)
    with torch.no_grad():                     # running stats far from the truth, as after training
        for m in G.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
    z = torch.randn(256, 8)
    G.train()
    with torch.no_grad():
        train_mean = G(z).mean()
    G.eval()
    with torch.no_grad():
        before = G(z).mean()
    recalibrate_bn(G, batches=10, batch_size=256, device="cpu")
    with torch.no_grad():
        after = G(z).mean()
    assert not G.training
    assert abs(float(after - train_mean)) < 0.02 < abs(float(before - train_mean))
