"""Training: one classifier loop (CE or CosFace, optional augmentation), one GAN loop,
training and loading the base artifacts of :mod:`raymia.kinds`."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import artifacts
from .config import ClassifierCfg, Config, GanCfg, config_from_dict
from .data import Bundle, Split, load_bundle
from .kinds import kind as artifact_kind
from .models import (Classifier, Generator, build_classifier, build_discriminator, build_generator,
                     diff_augment, freeze, recalibrate_bn)
from .progress import Progress, ProgressFn
from .runtime import pick_device, seed_everything, set_threads


# ----------------------------------------------------------------------------- classifier

@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, device, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)])


def accuracy(model: torch.nn.Module, split: Split, device) -> float:
    if len(split) == 0:
        return float("nan")
    return float((predict_logits(model, split.x, device).argmax(1) == split.y).float().mean())


def augment_batch(x: torch.Tensor, hflip: bool) -> torch.Tensor:
    if hflip:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return diff_augment(x, "translation")


def pgd_l2(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
           step: float = 0.0) -> torch.Tensor:
    """Madry et al.'s PGD in an L2 ball of radius ``eps`` around each image (pixels kept in
    [0, 1]), maximising the training loss; returns the perturbed batch (detached).  The
    model's mode is left as it was (BatchNorm uses its running statistics when in eval)."""
    step = step or 2.5 * eps / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model.training_logits((x + delta).clamp(0, 1), y), y)
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g = grad.flatten(1)
            delta = delta + step * (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x)
            n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (eps / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def train_classifier(c: ClassifierCfg, train: Split, test: Optional[Split], n_classes: int, device,
                     seed: int, progress: Optional[ProgressFn] = None, hflip: bool = True,
                     extra_loss: Optional[Callable[[Classifier], torch.Tensor]] = None) -> tuple[Classifier, dict]:
    """Train a classifier with CE or CosFace (margin logits), Adam + cosine LR decay;
    with ``c.adv_eps`` > 0 on PGD examples (:func:`pgd_l2`, computed in eval mode) instead
    of the clean batch (adversarial training: its input gradients are perceptually aligned).

    ``extra_loss(model)`` is added to each step's loss (the calibrated dummy model uses it).
    """
    g = seed_everything(seed)
    model = build_classifier(c, train.x.shape[1], train.x.shape[-1], n_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    n = len(train)
    steps_per_epoch = max(1, math.ceil(n / c.batch_size))
    total = c.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=0.15)
    x_all, y_all = train.x.to(device), train.y.to(device)
    step, t0 = 0, time.time()
    loss_v = float("nan")
    for epoch in range(c.epochs):
        model.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, c.batch_size):
            idx = perm[i:i + c.batch_size]
            if idx.numel() < 2:
                continue
            xb, yb = x_all[idx], y_all[idx]
            if c.augment:
                xb = augment_batch(xb, hflip)
            if c.adv_eps > 0:
                model.eval()
                xb = pgd_l2(model, xb, yb, c.adv_eps, c.adv_steps, c.adv_step)
                model.train()
            loss = F.cross_entropy(model.training_logits(xb, yb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_v = loss.item()
            if progress:
                progress(step, total, {"epoch": epoch + 1, "loss": loss_v})
    metrics = {"train_loss": loss_v, "train_acc": accuracy(model, train, device), "seconds": time.time() - t0,
               "n_train": n}
    if test is not None:
        metrics["test_acc"] = accuracy(model, test, device)
        metrics["n_test"] = len(test)
    freeze(model)
    return model, metrics


# ----------------------------------------------------------------------------- GAN

def train_gan(gc: GanCfg, images: torch.Tensor, device, seed: int,
              progress: Optional[ProgressFn] = None, hflip: bool = True) -> tuple[Generator, dict]:
    """Non-saturating GAN with DiffAugment on real and fake images and minibatch
    discrimination in D; real images are mirrored at random when ``hflip`` (faces, not
    digits: a mirrored digit is another glyph).  G's BatchNorm statistics are re-estimated at the end so that
    eval-mode samples match what G produced in training; G is returned frozen."""
    g = seed_everything(seed)
    ch, size = images.shape[1], images.shape[-1]
    G = build_generator(gc, ch, size).to(device)
    D = build_discriminator(gc, ch, size).to(device)
    og = torch.optim.Adam(G.parameters(), lr=gc.lr_g, betas=(gc.beta1, 0.999))
    od = torch.optim.Adam(D.parameters(), lr=gc.lr_d, betas=(gc.beta1, 0.999))
    real_all = images.to(device)
    n = real_all.shape[0]
    t0 = time.time()
    ld = lg = float("nan")
    for it in range(1, gc.iters + 1):
        idx = torch.randint(0, n, (gc.batch_size,), generator=g).to(device)
        real = real_all[idx]
        flip = (torch.rand(gc.batch_size, generator=g) < 0.5).to(device)
        if hflip:
            real = torch.where(flip[:, None, None, None], real.flip(3), real)
        z = torch.randn(gc.batch_size, gc.latent_dim, generator=g).to(device)
        fake = G(z)
        d_loss = F.softplus(-D(diff_augment(real, gc.diffaug))).mean() + \
            F.softplus(D(diff_augment(fake.detach(), gc.diffaug))).mean()
        od.zero_grad(set_to_none=True)
        d_loss.backward()
        od.step()
        g_loss = F.softplus(-D(diff_augment(fake, gc.diffaug))).mean()
        og.zero_grad(set_to_none=True)
        g_loss.backward()
        og.step()
        ld, lg = d_loss.item(), g_loss.item()
        if progress:
            progress(it, gc.iters, {"d_loss": ld, "g_loss": lg})
    recalibrate_bn(G, gc.bn_calib_batches, max(gc.batch_size, 64), device,
                   torch.Generator(device=device).manual_seed(seed + 1))
    freeze(G)
    return G, {"d_loss": ld, "g_loss": lg, "seconds": time.time() - t0, "n_images": n}


@torch.no_grad()
def sample_grid(G: Generator, path, n: int = 64, seed: int = 0, nrow: int = 8) -> Path:
    from torchvision.utils import save_image
    dev = next(G.parameters()).device
    z = torch.randn(n, G.latent_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
    G.eval()
    save_image(G(z).float().cpu(), str(path), nrow=nrow, padding=1)
    return Path(path)


# ----------------------------------------------------------------------------- artifacts

def train_artifact(cfg: Config, kind: str, bundle: Optional[Bundle] = None,
                   progress: Optional[ProgressFn] = None) -> Path:
    """Train one base artifact (target, evaluator, gan, attacker_gan) unless an artifact
    with the same config hash exists; return its directory."""
    k = artifact_kind(kind)
    out = k.dir(cfg)
    if artifacts.artifact_exists(out):
        return out
    set_threads(cfg.run.threads)
    device = pick_device(cfg.run.device)
    bundle = bundle or load_bundle(cfg.data)
    seed = k.seed(cfg.run.seed)
    progress = progress or Progress(kind)
    faces = bundle.name not in ("mnist5k", "digits", "mnist")
    meta = {"kind": kind, "config": cfg.to_dict(), "seed": seed, "device": str(device),
            "image_shape": list(bundle.private_train.x.shape[1:]), "versions": artifacts.versions()}
    if kind in ("target", "evaluator"):
        c = cfg.target if kind == "target" else cfg.evaluator
        tr, te = (bundle.private_train, bundle.private_test) if kind == "target" else (bundle.eval_train, bundle.eval_test)
        n_classes = bundle.n_private if kind == "target" else bundle.n_eval
        model, metrics = train_classifier(c, tr, te, n_classes, device, seed, progress, hflip=faces)
        meta.update({"section": kind, "n_classes": n_classes, "metrics": metrics})
        artifacts.save_artifact(out, {"model": model.state_dict()}, meta)
    else:
        gc = cfg.gan if kind == "gan" else cfg.attacker_gan
        imgs = bundle.private_train.x if kind == "gan" else bundle.aux.x
        G, metrics = train_gan(gc, imgs, device, seed, progress, hflip=faces)
        meta.update({"section": kind, "metrics": metrics})
        out = artifacts.save_artifact(out, {"generator": G.state_dict()}, meta)
        sample_grid(G, out / "samples.png", seed=seed)
    return out


def load_net(directory, device, build, tensors_key: str):
    """(frozen network, manifest, tensors) of a stored artifact: ``build(cfg, manifest,
    channels, size)`` makes the network from the config it was trained with."""
    man, tensors = artifacts.load_artifact(directory)
    cfg = config_from_dict(man["config"])
    ch, size = man["image_shape"][0], man["image_shape"][-1]
    net = build(cfg, man, ch, size)
    net.load_state_dict(tensors[tensors_key])
    return freeze(net.to(device)), man, tensors


def load_classifier(directory, device="cpu") -> tuple[Classifier, dict]:
    model, man, _ = load_net(directory, device, lambda c, m, ch, size: build_classifier(
        getattr(c, m["section"]), ch, size, m["n_classes"]), "model")
    return model, man


def load_generator(directory, device="cpu") -> tuple[Generator, dict]:
    G, man, _ = load_net(directory, device, lambda c, m, ch, size: build_generator(
        getattr(c, m["section"]), ch, size), "generator")
    return G, man
