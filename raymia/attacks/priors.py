"""Image priors a white-box attacker searches in: anything with ``latent_dim`` and
``forward(latent) -> images in [0, 1]`` can replace the attacker's generator F in
:func:`raymia.attacks.generator_mia.generator_mia` and :func:`raymia.attacks.whitebox.whitebox_mia`.

* :class:`LinearPrior`: an eigenface basis of the attacker's auxiliary faces (PCA); the
  latent is the vector of coefficients in units of each component's standard deviation, so
  N(0, I) draws are plausible faces of the auxiliary distribution and a bound of 3 keeps a
  coefficient within three standard deviations.
* :class:`MixedPrior`: F(z) plus a linear residual from such a basis (latent = [z, c]), so
  the search can leave F's range along the directions in which faces vary.
* :class:`PixelPrior`: the pixels themselves (no prior).
* :func:`project`: the latent that renders an image closest in pixels (MSE), to measure how
  well a prior can express a given face at all (the attack's ceiling).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class LinearPrior(nn.Module):
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, shape: tuple):
        super().__init__()
        self.register_buffer("mean", mean.float().flatten())
        self.register_buffer("basis", basis.float())        # (k, D), orthonormal rows
        self.register_buffer("scale", scale.float())        # (k,) std of each coefficient
        self.shape = tuple(shape)
        self.latent_dim = int(basis.shape[0])

    @classmethod
    def fit(cls, images: torch.Tensor, components: int) -> "LinearPrior":
        """PCA of ``images`` (N, C, H, W) with ``components`` components (at most N - 1)."""
        n = images.shape[0]
        if not 1 <= components <= n - 1:
            raise ValueError(f"a linear prior of {n} images has 1..{n - 1} components, asked for {components}")
        x = images.double().flatten(1)
        mean = x.mean(0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        scale = s[:components] / (n - 1) ** 0.5
        return cls(mean, vt[:components], scale, images.shape[1:])

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        x = self.mean + (c * self.scale) @ self.basis
        return x.clamp(0, 1).view(c.shape[0], *self.shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients of ``images`` (before clamping to the bound)."""
        return ((images.flatten(1).float().to(self.mean.device) - self.mean) @ self.basis.T) / self.scale


class MixedPrior(nn.Module):
    """x = clamp(F(z) + weight * (c * scale) @ basis, 0, 1) with latent [z, c]."""

    def __init__(self, generator: nn.Module, linear: LinearPrior, weight: float = 1.0):
        super().__init__()
        self.generator, self.linear, self.weight = generator, linear, float(weight)
        self.latent_dim = int(generator.latent_dim) + linear.latent_dim

    def forward(self, zc: torch.Tensor) -> torch.Tensor:
        d = int(self.generator.latent_dim)
        base = self.generator(zc[:, :d])
        res = ((zc[:, d:] * self.linear.scale) @ self.linear.basis).view_as(base)
        return (base + self.weight * res).clamp(0, 1)


class PixelPrior(nn.Module):
    """The image itself (Fredrikson et al.'s search space): pixel = 0.5 + latent / (2 bound),
    so the latent box [-bound, bound] is the pixel box [0, 1]."""

    def __init__(self, shape: tuple, bound: float = 3.0):
        super().__init__()
        self.shape, self.bound = tuple(shape), float(bound)
        self.latent_dim = int(torch.tensor(shape).prod())
        self.register_buffer("_device", torch.zeros(0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 + z / (2 * self.bound)).clamp(0, 1).view(z.shape[0], *self.shape)


def project(prior: nn.Module, images: torch.Tensor, iters: int = 300, lr: float = 0.05, bound: float = 3.0,
            seed: int = 0, restarts: int = 4) -> torch.Tensor:
    """Latents (one per image) minimising the pixel MSE between ``prior(latent)`` and the
    image, Adam from ``restarts`` N(0, I) starts (the best kept), latent clamped to the bound;
    a :class:`LinearPrior` or :class:`PixelPrior` starts from its closed-form latent instead
    (kept unless Adam lowers the error)."""
    device = next(iter(prior.buffers()), torch.empty(0)).device
    target = images.float().to(device)
    n = target.shape[0]
    g = torch.Generator().manual_seed(seed)
    if isinstance(prior, LinearPrior):
        starts = [prior.encode(target).clamp(-bound, bound)]
    elif isinstance(prior, PixelPrior):
        starts = [((target.flatten(1) - 0.5) * 2 * prior.bound).clamp(-bound, bound)]
    else:
        starts = [torch.randn(n, prior.latent_dim, generator=g).clamp(-bound, bound).to(device) for _ in range(restarts)]
    best, best_err = None, None

    def keep(z: torch.Tensor) -> None:
        nonlocal best, best_err
        with torch.no_grad():
            err = (prior(z) - target).pow(2).flatten(1).mean(1)
            if best is None:
                best, best_err = z.detach().clone(), err
            else:
                better = err < best_err
                best[better], best_err = z.detach()[better], torch.minimum(err, best_err)

    for z0 in starts:
        keep(z0)                        # a closed-form start is kept unless Adam improves on it
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(iters):
            err = (prior(z) - target).pow(2).flatten(1).mean(1)
            opt.zero_grad(set_to_none=True)
            err.sum().backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(-bound, bound)
        keep(z)
    return best


def prior_summary(prior: nn.Module) -> Optional[dict]:
    """What a run records about its prior."""
    if isinstance(prior, LinearPrior):
        return {"kind": "linear", "components": prior.latent_dim}
    if isinstance(prior, PixelPrior):
        return {"kind": "pixel", "latent_dim": prior.latent_dim}
    if isinstance(prior, MixedPrior):
        return {"kind": "mixed", "components": prior.linear.latent_dim, "weight": prior.weight}
    return {"kind": "generator", "latent_dim": int(getattr(prior, "latent_dim", 0))}
