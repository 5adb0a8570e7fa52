"""Models: classifiers (LeNet5, a small CNN, a ResNet-style face network) with a
CosFace or linear head, and a DCGAN-style generator/discriminator with minibatch
discrimination and differentiable augmentation (DiffAugment) for small data.

All models take images in [0, 1] (N, C, H, W); generators return images in [0, 1].

(~400 lines: every network of the pipeline and the BatchNorm folding they share, one
place to read the architectures.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ClassifierCfg, GanCfg


# ----------------------------------------------------------------------------- heads

class CosFaceHead(nn.Module):
    """Large Margin Cosine Loss head (Wang et al., 2018).

    ``forward(emb)`` returns inference logits ``s * cos(theta_j)``;
    ``margin_logits(emb, y)`` subtracts the margin ``m`` from the true class's
    cosine before scaling, which is what the training loss uses.
    """

    def __init__(self, embed_dim: int, n_classes: int, s: float, m: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, embed_dim) * 0.01)
        self.s, self.m = float(s), float(m)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.s * self.cosine(emb)

    def margin_logits(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(emb)
        return self.s * (cos - self.m * F.one_hot(y, cos.shape[1]).to(cos.dtype))


class LinearHead(nn.Linear):
    def margin_logits(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(emb)


# ----------------------------------------------------------------------------- backbones

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class FaceResNet(nn.Module):
    """ResNet-style face-identification backbone: stages of basic blocks (``blocks``
    per stage, width doubling and stride 2 from the second stage), global average
    pooling and a BatchNorm'd embedding.  ``blocks=[2,2,2,2], width=64`` is ResNet-18.
    ``stem="cifar"`` keeps full resolution (3x3 stride 1, for small images);
    ``stem="imagenet"`` downsamples by 4 first (7x7 stride 2 + max-pool), which at 64x64
    costs ~1/15 of the FLOPs (0.30 vs 4.4 GFLOP per forward for ResNet-18 with 2141 classes)."""

    def __init__(self, channels: int, width: int, blocks: list, embed_dim: int, dropout: float = 0.0,
                 stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":      # 3x3 stride 1: full resolution into the first stage
            self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        elif stem == "imagenet":  # 7x7 stride 2 + 3x3 max-pool stride 2, as torchvision's resnet18
            self.stem = nn.Sequential(nn.Conv2d(channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown FaceResNet stem {stem!r} (cifar, imagenet)")
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(int(n)):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.out_dim = embed_dim

    def forward(self, x):
        h = self.stages(self.stem(x))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self.bn(self.fc(self.drop(h)))


class SmallCNN(nn.Module):
    """Small CNN for the face / attribute setting (two conv blocks and a dense layer)."""

    def __init__(self, channels: int, size: int, width: int, embed_dim: int, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width * 16, embed_dim)
        self.out_dim = embed_dim

    def forward(self, x):
        return F.relu(self.fc(self.drop(torch.flatten(self.conv(x), 1))))


class LeNet5(nn.Module):
    """LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84); 28x28 inputs are
    padded to 32x32 as in the original."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.pad = (32 - size) // 2 if size < 32 else 0
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2))
        side = ((max(size, 32) - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Linear(16 * side * side, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh())
        self.out_dim = 84

    def forward(self, x):
        if self.pad:
            x = F.pad(x, [self.pad] * 4)
        return self.fc(torch.flatten(self.conv(x), 1))


class Classifier(nn.Module):
    """Backbone + head.  ``forward`` returns logits; ``embed`` the penultimate features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - 0.5) * 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def training_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head.margin_logits(self.embed(x), y)


def build_classifier(c: ClassifierCfg, channels: int, size: int, n_classes: int) -> Classifier:
    if c.arch == "faceresnet":
        bb = FaceResNet(channels, c.width, c.blocks, c.embed_dim, c.dropout, c.stem)
    elif c.arch == "smallcnn":
        bb = SmallCNN(channels, size, c.width, c.embed_dim, c.dropout)
    elif c.arch == "lenet5":
        bb = LeNet5(channels, size)
    else:
        raise ValueError(f"unknown classifier arch {c.arch!r}")
    head = CosFaceHead(bb.out_dim, n_classes, c.cos_s, c.cos_m) if c.loss == "cosface" \
        else LinearHead(bb.out_dim, n_classes)
    return Classifier(bb, head)


# ----------------------------------------------------------------------------- GAN

def _n_up(size: int) -> int:
    n = int(round(math.log2(size / 4)))
    if 4 * 2 ** n != size:
        raise ValueError(f"GAN image size must be 4 * 2^k, got {size}")
    return n


class Generator(nn.Module):
    """DCGAN generator: z -> 4x4 -> ... -> size x size, BatchNorm + ReLU, tanh output
    mapped to [0, 1]."""

    def __init__(self, latent_dim: int, ngf: int, channels: int, size: int):
        super().__init__()
        n = _n_up(size)
        self.latent_dim = latent_dim
        c0 = ngf * 2 ** (n - 1)
        self.fc = nn.Sequential(nn.Linear(latent_dim, c0 * 16, bias=False), nn.BatchNorm1d(c0 * 16), nn.ReLU())
        layers, c = [], c0
        for i in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.c0 = c0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4)
        return (self.net(h) + 1.0) * 0.5


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. (2016): for each sample, B features measuring how close it is to
    the other samples of the batch (L1 distance of C-dim projections)."""

    def __init__(self, in_features: int, b: int, c: int):
        super().__init__()
        self.T = nn.Parameter(torch.randn(in_features, b * c) * 0.1)
        self.b, self.c = b, c

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        m = (f @ self.T).view(-1, self.b, self.c)
        dist = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)      # (N, N, B)
        o = torch.exp(-dist).sum(1) - 1.0                          # exclude self
        return torch.cat([f, o], 1)


class Discriminator(nn.Module):
    def __init__(self, ndf: int, channels: int, size: int, mbd_b: int = 16, mbd_c: int = 8):
        super().__init__()
        n = _n_up(size)
        layers, c = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], ndf
        for i in range(n - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        self.net = nn.Sequential(*layers)
        feat = c * 16
        self.mbd = MinibatchDiscrimination(feat, mbd_b, mbd_c) if mbd_b > 0 else None
        self.out = nn.Linear(feat + (mbd_b if mbd_b > 0 else 0), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.flatten(self.net((x - 0.5) * 2.0), 1)
        if self.mbd is not None:
            f = self.mbd(f)
        return self.out(f).squeeze(1)


def build_generator(g: GanCfg, channels: int, size: int) -> Generator:
    return Generator(g.latent_dim, g.ngf, channels, size)


def build_discriminator(g: GanCfg, channels: int, size: int) -> Discriminator:
    return Discriminator(g.ndf, channels, size, g.mbd_features, g.mbd_kernel)


@torch.no_grad()
def recalibrate_bn(gen: Generator, batches: int, batch_size: int, device, generator: Optional[torch.Generator] = None):
    """Re-estimate the generator's BatchNorm running statistics from prior samples so that
    eval-mode sampling matches the train-mode images the GAN was trained on (cumulative
    average over ``batches`` batches), then leave the generator in eval mode."""
    for mod in gen.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    gen.train()
    for _ in range(batches):
        gen(torch.randn(batch_size, gen.latent_dim, device=device, generator=generator))
    gen.eval()
    return gen


# ----------------------------------------------------------------------------- DiffAugment

def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Differentiable augmentation (Zhao et al., 2020) on [0, 1] images, applied to real
    and generated images alike before the discriminator.  Policy: comma-separated subset
    of ``color``, ``translation``, ``cutout``."""
    if not policy:
        return x
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    for p in policy.split(","):
        p = p.strip()
        if p == "color":
            x = x + (torch.rand(n, 1, 1, 1, device=dev, dtype=dt) - 0.5) * 0.5          # brightness
            if x.shape[1] == 3:
                mean = x.mean(1, keepdim=True)
                x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev, dtype=dt) * 2) + mean  # saturation
            mean = x.mean(dim=[1, 2, 3], keepdim=True)
            x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev, dtype=dt) + 0.5) + mean    # contrast
        elif p == "translation":
            h, w = x.shape[2:]
            sh, sw = max(1, h // 8), max(1, w // 8)
            ty = torch.randint(-sh, sh + 1, (n, 1, 1), device=dev)
            tx = torch.randint(-sw, sw + 1, (n, 1, 1), device=dev)
            gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
            gy = torch.clamp(gy.unsqueeze(0) + ty + 1, 0, h + 1)
            gx = torch.clamp(gx.unsqueeze(0) + tx + 1, 0, w + 1)
            xp = F.pad(x, [1, 1, 1, 1])
            idx = (gy * (w + 2) + gx).view(n, 1, -1).expand(-1, x.shape[1], -1)
            x = xp.flatten(2).gather(2, idx).view_as(x)
        elif p == "cutout":
            h, w = x.shape[2:]
            ch, cw = h // 2, w // 2
            oy = torch.randint(0, h - ch + 1, (n, 1, 1), device=dev)
            ox = torch.randint(0, w - cw + 1, (n, 1, 1), device=dev)
            gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
            inside = (gy >= oy) & (gy < oy + ch) & (gx >= ox) & (gx < ox + cw)
            x = x * (~inside).unsqueeze(1).to(dt)
        elif p:
            raise ValueError(f"unknown DiffAugment policy {p!r} (color, translation, cutout)")
    return x


class ProbModel(nn.Module):
    """A logit classifier seen as a released confidence-vector model:
    ``forward(x, alpha=None)`` returns softmax probabilities (alpha is ignored, so it
    drops in wherever a :class:`~raymia.defenses.dummy.CombinedModel` goes)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor, alpha=None) -> torch.Tensor:
        return torch.softmax(self.classifier(x).float(), 1)


def victim_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """R_T's penultimate features of ``x``, unit length, (B, embed_dim): the view of a query
    the robust detector's feature rule compares (:mod:`raymia.defenses.filter.robust`).
    ``model``: a :class:`Classifier`, a :class:`ProbModel` or a
    :class:`~raymia.defenses.dummy.CombinedModel` (its R_T branch)."""
    inner = next((m for m in (getattr(model, "classifier", None), getattr(model, "target", None))
                  if m is not None), model)
    if not hasattr(inner, "embed"):
        raise TypeError(f"{type(model).__name__} has no R_T with an embed() method")
    with torch.inference_mode():
        return F.normalize(inner.embed(x).float(), dim=1)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the state every model is in during attacks
    (train-mode BatchNorm would couple the rows of a batch)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- BatchNorm folding

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _bn_pairs(module: nn.Module) -> Optional[list[tuple[str, str]]]:
    """(producer, batchnorm) submodule names where the BatchNorm's only input is the
    producer's output and nothing else reads that output, found by tracing ``module``
    with torch.fx; None when ``module`` cannot be traced."""
    import torch.fx
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:   # data-dependent control flow etc.: the caller tries the children
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = module.get_submodule(node.target)
        src = node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(src, torch.fx.Node) \
                or src.op != "call_module" or len(src.users) != 1:
            continue
        prod = module.get_submodule(src.target)
        if isinstance(prod, _FOLDABLE) and calls[src.target] == 1 and calls[node.target] == 1:
            pairs.append((src.target, node.target))
    return pairs


def _fold_pair(prod: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> bool:
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False
    transpose = isinstance(prod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if transpose and prod.groups != 1:
        return False
    w_bn = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    b_bn = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        if isinstance(prod, nn.Linear):
            w, b = fuse_linear_bn_weights(prod.weight, prod.bias, bn.running_mean, bn.running_var, bn.eps, w_bn, b_bn)
        else:
            w, b = fuse_conv_bn_weights(prod.weight, prod.bias, bn.running_mean, bn.running_var, bn.eps, w_bn, b_bn,
                                        transpose=transpose)
    prod.weight = nn.Parameter(w.detach(), requires_grad=prod.weight.requires_grad)
    prod.bias = nn.Parameter(b.detach(), requires_grad=prod.weight.requires_grad)
    return True


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``model`` with every BatchNorm that directly follows a
    conv / transposed conv / linear layer folded into that layer's weight and bias (and
    replaced by ``nn.Identity``).  Outputs equal the original's up to float rounding;
    the module classes and attributes stay the same.  Used by the attack's fast path on
    frozen networks (the BatchNorm work disappears from forward and backward)."""
    import copy
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (train-mode BatchNorm uses batch statistics)")
    out = copy.deepcopy(model)

    def visit(mod: nn.Module) -> None:
        pairs = _bn_pairs(mod)
        if pairs is None:
            for child in mod.children():
                visit(child)
            return
        for prod_name, bn_name in pairs:
            if _fold_pair(mod.get_submodule(prod_name), mod.get_submodule(bn_name)):
                parent_name, _, leaf = bn_name.rpartition(".")
                setattr(mod.get_submodule(parent_name) if parent_name else mod, leaf, nn.Identity())

    visit(out)
    return out
