"""Dummy-model defense (Kotsuji & Nakamura, VISAPP 2025).

* :func:`dummy_training_set` draws n anchors z_i ~ N(0, sigma2 I) and m neighbours
  z_il ~ N(z_i, sigma_tilde2 I) each, and renders them with the defender's generator G
  (paper §4.2).
* :func:`train_dummy` trains R_dmy (R_T's architecture and loss) to give class i to
  G(z_il) (Eq. 4).  ``variant="calibrated"`` (beyond the paper) adds
  ``calib_weight * CE(uniform, R_dmy(x_real))`` on the defender's own real training
  faces, pushing R_dmy towards 1/n on real faces, which the paper assumes (§4.1) but
  which does not hold by itself on small data.
* :class:`CombinedModel` is the released model y = alpha R_T(x) + (1 - alpha) R_dmy(x)
  on confidence vectors (Eq. 1); alpha may be a scalar or one value per batch row.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import artifacts
from ..config import Config
from ..data import Bundle, Split
from ..models import Generator, build_classifier
from ..kinds import artifact_dir, dummy_kind
from ..progress import ProgressFn
from ..runtime import pick_device
from ..training import augment_batch, load_classifier, load_generator, load_net, predict_logits, train_classifier


@torch.no_grad()
def _render(G: Generator, lat: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    return torch.cat([G(lat[i:i + batch].to(device)).float().cpu() for i in range(0, lat.shape[0], batch)])


@torch.no_grad()
def choose_far_anchors(G: Generator, candidates: torch.Tensor, k: int, embed, real_feats: torch.Tensor,
                       device) -> torch.Tensor:
    """From candidate latents keep the ``k`` whose images are least similar (max cosine
    similarity in ``embed``'s feature space) to every real face in ``real_feats``."""
    feats = F.normalize(embed(_render(G, candidates, device).to(device)).float(), dim=1).cpu()
    closest = (feats @ real_feats.T).max(1).values
    return candidates[closest.argsort()[:k]]


@torch.no_grad()
def dummy_training_set(G: Generator, n: int, m: int, sigma2: float, sigma_tilde2: float, seed: int,
                       device, anchors_per_class: int = 1, anchor_choice: str = "random", anchor_pool: int = 8,
                       embed=None, real_feats: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Anchors and neighbours of the dummy model's training set D_dmy (paper §4.2).

    Paper: one anchor z_i ~ N(0, sigma2 I) per class and m neighbours z_il ~ N(z_i,
    sigma_tilde2 I).  Beyond the paper: ``anchors_per_class`` anchors per class (class of
    anchor j is j // anchors_per_class), and ``anchor_choice="far"``, which draws
    ``anchor_pool`` candidates per anchor and keeps those farthest from the real faces
    (``embed`` = R_T's feature map, ``real_feats`` = normalised features of D)."""
    g = torch.Generator().manual_seed(seed)
    k = n * anchors_per_class
    if anchor_choice == "far":
        if embed is None or real_feats is None:
            raise ValueError("anchor_choice='far' needs R_T's embed function and the real faces' features")
        pool = torch.randn(k * anchor_pool, G.latent_dim, generator=g) * sigma2 ** 0.5
        z = choose_far_anchors(G, pool, k, embed, real_feats, device)
        z = z[torch.randperm(k, generator=g)]
    elif anchor_choice == "random":
        z = torch.randn(k, G.latent_dim, generator=g) * sigma2 ** 0.5
    else:
        raise ValueError(f"unknown anchor choice {anchor_choice!r} (random, far)")
    zl = z.repeat_interleave(m, 0) + torch.randn(k * m, G.latent_dim, generator=g) * sigma_tilde2 ** 0.5
    G.eval()
    anchor_y = torch.arange(n).repeat_interleave(anchors_per_class)
    return {"anchor_z": z, "anchor_x": _render(G, z, device), "anchor_y": anchor_y,
            "neighbour_z": zl, "neighbour_x": _render(G, zl, device), "neighbour_y": anchor_y.repeat_interleave(m)}


def dummy_artifact_dir(cfg: Config, variant: str) -> Path:
    return dummy_kind(variant).dir(cfg)


def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the uniform distribution and softmax(logits), minus log n:
    zero exactly when the output is uniform."""
    return -(F.log_softmax(logits, 1).mean(1)).mean() - torch.log(torch.tensor(float(logits.shape[1])))


def train_dummy(cfg: Config, G: Generator, bundle: Bundle, variant: str, device, seed: int,
                progress: Optional[ProgressFn] = None, target: Optional[nn.Module] = None):
    """Train R_dmy for ``variant`` (paper | calibrated).  Returns (model, anchors, metrics).
    ``target`` (R_T) is needed only for far anchors; it is loaded from its artifact if absent."""
    dm = cfg.dummy
    n = bundle.n_private
    embed = real_feats = None
    if dm.anchor_choice == "far":
        rt = target if target is not None else load_classifier(artifact_dir(cfg, "target"), device)[0]
        embed = rt.embed
        real_feats = F.normalize(torch.cat([rt.embed(bundle.private_train.x[i:i + 256].to(device)).float().cpu()
                                            for i in range(0, len(bundle.private_train), 256)]), dim=1)
    with torch.no_grad():
        ds = dummy_training_set(G, n, dm.m, dm.sigma2, dm.sigma_tilde2, seed, device, dm.anchors_per_class,
                                dm.anchor_choice, dm.anchor_pool, embed, real_feats)
    ccfg = dataclasses.replace(cfg.target, epochs=dm.epochs, batch_size=dm.batch_size, lr=dm.lr, augment=False)
    extra = None
    if variant == "calibrated":
        real = bundle.private_train.x.to(device)
        gen = torch.Generator().manual_seed(seed + 7)

        def extra(model):
            idx = torch.randint(0, real.shape[0], (dm.batch_size,), generator=gen).to(device)
            return dm.calib_weight * uniform_ce(model(augment_batch(real[idx], True)))
    elif variant != "paper":
        raise ValueError(f"unknown dummy variant {variant!r} (paper, calibrated)")
    train = Split(ds["neighbour_x"], ds["neighbour_y"])
    model, metrics = train_classifier(ccfg, train, None, n, device, seed, progress, hflip=False, extra_loss=extra)
    metrics.update(dummy_confidence(model, bundle, ds, device))
    return model, ds, metrics


def dummy_confidence(model: nn.Module, bundle: Bundle, ds: dict, device) -> dict:
    """R_dmy's mean top confidence on real test faces (the paper assumes ~1/n), on its
    anchors, and whether it labels each anchor as its own class."""
    pr = F.softmax(predict_logits(model, bundle.private_test.x, device), 1)
    pa = F.softmax(predict_logits(model, ds["anchor_x"], device), 1)
    n = pr.shape[1]
    return {"dmy_top_conf_real": float(pr.max(1).values.mean()), "uniform_conf": 1.0 / n,
            "dmy_top_conf_anchor": float(pa.max(1).values.mean()),
            "dmy_anchor_acc": float((pa.argmax(1) == ds["anchor_y"]).float().mean())}


def train_dummy_artifact(cfg: Config, variant: str, bundle: Optional[Bundle] = None,
                         progress: Optional[ProgressFn] = None) -> Path:
    """Train and store R_dmy for ``variant`` unless it exists (needs the ``gan`` artifact)."""
    from ..data import load_bundle
    out = dummy_artifact_dir(cfg, variant)
    if artifacts.artifact_exists(out):
        return out
    device = pick_device(cfg.run.device)
    bundle = bundle or load_bundle(cfg.data)
    G, _ = load_generator(artifact_dir(cfg, "gan"), device)
    seed = dummy_kind(variant).seed(cfg.run.seed, cfg.dummy.draw)
    model, ds, metrics = train_dummy(cfg, G, bundle, variant, device, seed, progress)
    meta = {"kind": f"dummy-{variant}", "section": "target", "variant": variant, "config": cfg.to_dict(),
            "seed": seed, "n_classes": bundle.n_private, "image_shape": list(bundle.private_train.x.shape[1:]),
            "metrics": metrics, "versions": artifacts.versions()}
    anchors = {"z": ds["anchor_z"], "x": ds["anchor_x"], "y": ds["anchor_y"]}
    out = artifacts.save_artifact(out, {"model": model.state_dict(), "anchors": anchors}, meta)
    from torchvision.utils import save_image
    save_image(ds["anchor_x"], str(out / "anchors.png"), nrow=10, padding=1)
    return out


def load_dummy(directory, device="cpu"):
    """(R_dmy frozen, anchors {"z", "x", "y"}, manifest)."""
    model, man, tensors = load_net(directory, device, lambda c, m, ch, size: build_classifier(
        c.target, ch, size, m["n_classes"]), "model")
    return model, tensors["anchors"], man


class CombinedModel(nn.Module):
    """The released model: one two-branch network with a single confidence-vector output.

    ``rule="linear"`` (the paper's Eq. 1):  R'(x) = alpha * p_T(x) + (1 - alpha) * p_dmy(x).
    ``rule="gated"`` (beyond the paper):    R'(x) = (1 - w) * p_T(x) + w * p_dmy(x) with
    w = (1 - alpha) * sigmoid((max_j p_dmy(x)_j - tau) / temp): where R_dmy is unsure (real
    faces, when it is calibrated) R' is R_T unchanged, where R_dmy is confident (near its
    anchors) the dummy takes weight 1 - alpha.  The gate is part of the network: a
    white-box attacker differentiates through it like through any other layer.

    ``alpha`` is a buffer (scalar) that ``forward(x, alpha=...)`` can override with a
    scalar or a per-row tensor of shape (B,), so one pass serves many alphas.
    """

    def __init__(self, target: nn.Module, dummy: nn.Module, alpha: float = 0.25, rule: str = "linear",
                 gate_tau: float = 0.5, gate_temp: float = 0.05):
        super().__init__()
        if rule not in ("linear", "gated"):
            raise ValueError(f"unknown combination rule {rule!r} (linear, gated)")
        self.target, self.dummy = target, dummy
        self.rule, self.gate_tau, self.gate_temp = rule, float(gate_tau), float(gate_temp)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def branch_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softmax(self.target(x).float(), 1), F.softmax(self.dummy(x).float(), 1)

    def dummy_weight(self, p_d: torch.Tensor, alpha: Union[float, torch.Tensor]) -> torch.Tensor:
        """Per-row weight of R_dmy's output, shape (B, 1)."""
        a = torch.as_tensor(alpha, dtype=p_d.dtype, device=p_d.device)
        a = a[:, None] if a.ndim == 1 else a.reshape(1, 1)
        w = 1.0 - a
        if self.rule == "gated":
            w = w * torch.sigmoid((p_d.max(1, keepdim=True).values - self.gate_tau) / self.gate_temp)
        return w

    def mix(self, p_t: torch.Tensor, p_d: torch.Tensor, alpha: Union[float, torch.Tensor]) -> torch.Tensor:
        w = self.dummy_weight(p_d, alpha)
        return (1.0 - w) * p_t + w * p_d

    def forward(self, x: torch.Tensor, alpha: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        p_t, p_d = self.branch_probs(x)
        return self.mix(p_t, p_d, self.alpha if alpha is None else alpha)


def combined_model(cfg: Config, target: nn.Module, dummy: nn.Module, alpha: float = 0.25) -> CombinedModel:
    """The released model as ``cfg.combine`` describes it, in eval mode."""
    c = cfg.combine
    return CombinedModel(target, dummy, alpha, c.rule, c.gate_tau, c.gate_temp).eval()
