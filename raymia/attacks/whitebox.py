"""The white-box generator MIA with the additions the model-inversion literature uses to
keep reconstructions on the face manifold (Plug-and-Play attacks, Struppek et al. 2022;
GMI / KED-MI's priors), all optional and off by default:

* any prior of :mod:`raymia.attacks.priors` instead of the attacker's generator F;
* total variation of the image and a latent-norm term in the loss;
* the loss averaged over random augmentations of the image (shifts, mirror, noise), so the
  latent must make R' sure of the target under small changes, not at one pixel pattern;
* the attacker's final pick among a target's restarts: the restart R' is most confident of
  the target under fresh augmentations (the attacker's own criterion, no judge involved).

Rows are independent as in :func:`~raymia.attacks.generator_mia.generator_mia`: every row
draws its start and its augmentations from its own seed, so batching changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .generator_mia import MIAResult, initial_latents, score_latents


@dataclass(frozen=True)
class WhiteBoxOpts:
    iters: int = 300
    lr: float = 0.05
    bound: float = 3.0
    tv_weight: float = 0.0        # weight of the mean absolute difference of neighbouring pixels
    norm_weight: float = 0.0      # weight of mean(latent^2)
    aug_samples: int = 0          # augmented copies of each image in the loss (0 = the image itself)
    aug_shift: float = 2.0        # most translation, pixels
    aug_flip: bool = True         # mirror at random
    aug_noise: float = 0.02       # Gaussian pixel noise std
    select_samples: int = 16      # augmentations that score a restart for the final pick

    @classmethod
    def of(cls, cfg) -> "WhiteBoxOpts":
        """From a :class:`~raymia.config.WhiteBoxCfg` (or anything with these attributes)."""
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(R,) mean absolute difference between horizontally and vertically adjacent pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) + \
        (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)


def augment(x: torch.Tensor, samples: int, gens: Sequence[torch.Generator], shift: float, flip: bool,
            noise: float) -> torch.Tensor:
    """(R * samples, C, H, W): ``samples`` random copies of each row, row r's draws from
    ``gens[r]`` (continuous translation by up to ``shift`` pixels with border padding, a
    mirror with probability 1/2, Gaussian noise); differentiable in ``x``."""
    r, c, h, w = x.shape
    draws = torch.stack([torch.rand(samples, 3 + c * h * w, generator=g) for g in gens])   # (R, S, 3 + CHW)
    draws = draws.to(x.device).view(r * samples, -1)
    xr = x.repeat_interleave(samples, 0)
    t = (draws[:, :2] * 2 - 1) * (2.0 * shift / torch.tensor([w, h], device=x.device, dtype=x.dtype))
    mirror = torch.where((draws[:, 2] < 0.5) & flip, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(r * samples, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = mirror, 1.0, t
    grid = F.affine_grid(theta, list(xr.shape), align_corners=False)
    out = F.grid_sample(xr, grid, padding_mode="border", align_corners=False)
    if noise > 0:   # Box-Muller from the uniform draws, so the row's generator alone decides them
        u = draws[:, 3:].view_as(out).clamp(1e-6, 1 - 1e-6)
        z = torch.sqrt(-2 * torch.log(u)) * torch.cos(2 * np.pi * u.roll(1, dims=-1))
        out = out + noise * z
    return out.clamp(0, 1)


def _target_conf(model: nn.Module, x: torch.Tensor, t: torch.Tensor, a: Optional[torch.Tensor]) -> torch.Tensor:
    p = model(x, a) if a is not None else model(x)
    return p.float().gather(1, t[:, None])[:, 0]


def augmented_conf(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, alphas: Optional[torch.Tensor],
                   seeds: Sequence[int], opts: WhiteBoxOpts) -> torch.Tensor:
    """(R,) mean target confidence of each image over ``opts.select_samples`` augmentations
    (drawn from seed + 1 of each row: fresh ones, not those of the loss)."""
    s = max(1, opts.select_samples)
    gens = [torch.Generator().manual_seed(int(q) + 1) for q in seeds]
    with torch.no_grad():
        xa = augment(images, s, gens, opts.aug_shift, opts.aug_flip, opts.aug_noise)
        ar = None if alphas is None else alphas.repeat_interleave(s)
        return _target_conf(model, xa, targets.repeat_interleave(s), ar).view(-1, s).mean(1)


def whitebox_mia(model: nn.Module, prior: nn.Module, targets: Sequence[int], seeds: Sequence[int],
                 alphas: Optional[Sequence[float]] = None, opts: WhiteBoxOpts = WhiteBoxOpts(), device="cpu",
                 progress: Optional[Callable[[int, int, dict], None]] = None) -> MIAResult:
    """Minimise, per row, mean_s -log R'(aug_s(prior(xi)))[target] + tv_weight * TV +
    norm_weight * mean(xi^2) with Adam, latent clamped to [-bound, bound].  With every
    option at its default this is :func:`generator_mia`'s attack.  The result's
    ``target_conf`` is the plain confidence of the final image, its ``aug_conf`` the
    confidence under fresh augmentations that :func:`pick_restarts` uses."""
    device = torch.device(device)
    for net in (model, prior):
        if net.training:
            raise ValueError("attack needs frozen models in eval mode (train-mode BatchNorm couples rows)")
    t = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    a = None if alphas is None else torch.as_tensor(list(alphas), dtype=torch.float32, device=device)
    if len(seeds) != t.numel() or (a is not None and a.numel() != t.numel()):
        raise ValueError("targets, seeds and alphas must have one entry per row")
    xi = initial_latents(seeds, prior.latent_dim).clamp_(-opts.bound, opts.bound).to(device).requires_grad_(True)
    opt = torch.optim.Adam([xi], lr=opts.lr)
    gens = [torch.Generator().manual_seed(int(q) + 7919) for q in seeds]
    s = opts.aug_samples
    t0 = time.time()
    for it in range(1, opts.iters + 1):
        x = prior(xi)
        if s > 0:
            xa = augment(x, s, gens, opts.aug_shift, opts.aug_flip, opts.aug_noise)
            conf = _target_conf(model, xa, t.repeat_interleave(s), None if a is None else a.repeat_interleave(s))
            loss = -torch.log(conf.clamp_min(1e-12)).view(-1, s).mean(1)
        else:
            conf = _target_conf(model, x, t, a)
            loss = -torch.log(conf.clamp_min(1e-12))
        if opts.tv_weight:
            loss = loss + opts.tv_weight * total_variation(x)
        if opts.norm_weight:
            loss = loss + opts.norm_weight * xi.pow(2).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            xi.clamp_(-opts.bound, opts.bound)
        if progress:
            progress(it, opts.iters, {"mean_loss": float(loss.mean())})
    images, conf, rank = score_latents(model, prior, xi.detach(), t, a)
    return MIAResult(xi.detach().cpu(), images.cpu(), (-torch.log(conf.clamp_min(1e-12))).cpu(), conf.cpu(),
                     time.time() - t0, rank.cpu(), augmented_conf(model, images, t, a, seeds, opts).cpu())


def pick_restarts(targets: Sequence[int], score: torch.Tensor) -> np.ndarray:
    """Index of the row with the highest ``score`` for each distinct target, in order of
    first appearance (the attacker's choice among its restarts)."""
    t = np.asarray(list(targets))
    sc = np.asarray(score, dtype=float)
    out = []
    for k in dict.fromkeys(t.tolist()):
        rows = np.flatnonzero(t == k)
        out.append(int(rows[np.argmax(sc[rows])]))
    return np.asarray(out, dtype=int)
