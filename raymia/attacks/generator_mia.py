"""Khosravy et al.'s generator-based white-box model inversion (the attack the
dummy-model paper assumes, §3): optimise a latent xi of the attacker's generator F
(trained on auxiliary faces, never on D) to minimise CE(R'(F(xi)), k_hat).

One call attacks a whole batch of rows; each row has its own target, restart seed and
alpha.  The loss is the *sum* of per-row losses and Adam is element-wise, so every row
follows exactly the trajectory it would follow alone (up to float noise): batching is
only a speed-up.  The latent is clamped to [-bound, bound] (the prior's range).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn


@dataclass
class MIAResult:
    latents: torch.Tensor      # (R, d) final latents
    images: torch.Tensor       # (R, C, H, W) reconstructions F(xi), in [0, 1]
    loss: torch.Tensor         # (R,) final CE(R'(F(xi)), target)
    target_conf: torch.Tensor  # (R,) R'(F(xi))[target]
    seconds: float


def initial_latents(seeds: Sequence[int], dim: int) -> torch.Tensor:
    """One N(0, I) latent per row, drawn from the row's own seed (so a row starts at the
    same point whatever batch it is in)."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generator_mia(model: nn.Module, generator: nn.Module, targets: Sequence[int], seeds: Sequence[int],
                  alphas: Optional[Sequence[float]] = None, iters: int = 300, lr: float = 0.05,
                  bound: float = 3.0, device="cpu", autocast_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[int, int, dict], None]] = None) -> MIAResult:
    """Run the attack for every row.  ``model(x, alpha)`` must return confidence vectors
    (probabilities) — a :class:`~raymia.defenses.dummy.CombinedModel`, or any model
    wrapped by :class:`raymia.models.ProbModel`.  Both networks must be frozen and in eval mode."""
    device = torch.device(device)
    for net in (model, generator):
        if net.training:
            raise ValueError("attack needs frozen models in eval mode (train-mode BatchNorm couples rows)")
    t = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    a = None if alphas is None else torch.as_tensor(list(alphas), dtype=torch.float32, device=device)
    if len(seeds) != t.numel() or (a is not None and a.numel() != t.numel()):
        raise ValueError("targets, seeds and alphas must have one entry per row")
    xi = initial_latents(seeds, generator.latent_dim).clamp_(-bound, bound).to(device).requires_grad_(True)
    opt = torch.optim.Adam([xi], lr=lr)
    rows = torch.arange(t.numel(), device=device)
    t0 = time.time()

    def conf_of(z):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            p = model(generator(z), a) if a is not None else model(generator(z))
        return p.float()[rows, t]

    for it in range(1, iters + 1):
        conf = conf_of(xi)
        loss = -torch.log(conf.clamp_min(1e-12))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            xi.clamp_(-bound, bound)
        if progress:
            progress(it, iters, {"mean_conf": float(conf.mean())})
    with torch.no_grad():
        conf = conf_of(xi)
        images = generator(xi).float()
    return MIAResult(xi.detach().cpu(), images.cpu(), (-torch.log(conf.clamp_min(1e-12))).cpu(), conf.cpu(),
                     time.time() - t0)

