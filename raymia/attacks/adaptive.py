"""An adaptive attacker against the dummy-model defense.

The attacker knows that a dummy defense may be in place: the released model is very
confident in a narrow region around each synthetic anchor (R_dmy was trained on tight
neighbourhoods, sigma_tilde^2 << sigma^2), while R_T's confidence for a real identity is
spread over a wide region (lighting, pose, expression).  So the attacker optimises the
expectation of the released model's confidence over random transformations of the
candidate image (expectation over transformation): a narrow dummy peak does not survive
shifts, flips and noise, a real identity's region does.

:class:`EOTModel` wraps the released model and is passed to
:func:`raymia.attacks.generator_mia.generator_mia` in place of it; nothing else changes,
so the naive and the adaptive attacker share the attack engine, its batching and its
per-row alpha.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def random_transform(x: torch.Tensor, shift: int, noise: float, generator=None) -> torch.Tensor:
    """Per-row random horizontal flip, integer shift in [-shift, shift] (edge padded) and
    Gaussian noise of std ``noise``; differentiable in ``x``."""
    n, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if shift > 0:
        xp = F.pad(x, [shift] * 4, mode="replicate")
        dy = torch.randint(0, 2 * shift + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (n,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])            # (n, h)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])            # (n, w)
        idx = (rows[:, :, None] * (w + 2 * shift) + cols[:, None, :]).view(n, 1, -1)
        x = xp.flatten(2).gather(2, idx.expand(-1, x.shape[1], -1)).view_as(x)
    if noise > 0:
        x = (x + noise * torch.randn(x.shape, device=dev, dtype=x.dtype, generator=generator)).clamp(0.0, 1.0)
    return x


class EOTModel(nn.Module):
    """``forward(x, alpha)`` = mean over ``samples`` random transforms of ``model(t(x), alpha)``.
    The transforms come from the wrapper's own generator (``seed``), so an attack run is
    reproducible whatever else draws random numbers in the process."""

    def __init__(self, model: nn.Module, samples: int = 4, shift: int = 2, noise: float = 0.03, seed: int = 0):
        super().__init__()
        if samples < 1:
            raise ValueError("EOT needs samples >= 1")
        self.model, self.samples, self.shift, self.noise = model, int(samples), int(shift), float(noise)
        self.seed, self._gen = int(seed), None

    def forward(self, x: torch.Tensor, alpha=None) -> torch.Tensor:
        b = x.shape[0]
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        xs = random_transform(x.repeat(self.samples, 1, 1, 1), self.shift, self.noise, self._gen)
        a = alpha
        if isinstance(alpha, torch.Tensor) and alpha.ndim == 1:
            a = alpha.repeat(self.samples)
        p = self.model(xs, a) if alpha is not None else self.model(xs)
        return p.view(self.samples, b, -1).mean(0)
