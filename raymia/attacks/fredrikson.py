"""Fredrikson et al. (2015) input-space model inversion: gradient descent on the image
itself to maximise the target's confidence, cost c(x) = 1 - p_target(x), pixels kept in
[0, 1].  It queries the model one image per iteration, optionally with random noise
added before every query (the evasion attempt the similarity-filter paper studies), and
can pass each query through a gate (a per-client filter) that may stop it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn


@dataclass
class FredriksonResult:
    image: torch.Tensor                  # (C, H, W) final reconstruction
    queries: int                         # queries the gate let through
    blocked_at: Optional[int]            # 1-based index of the refused query, None if never
    target_conf: float                   # model's confidence in the target at the end
    conf_trace: list = field(default_factory=list)


def fredrikson_attack(model: nn.Module, target: int, shape: tuple, iters: int = 200, lr: float = 0.1,
                      noise_std: float = 0.0, x0: Optional[torch.Tensor] = None, seed: int = 0,
                      gate: Optional[Callable[[torch.Tensor], bool]] = None, device="cpu",
                      observer: Optional[Callable[[int, torch.Tensor, float], None]] = None) -> FredriksonResult:
    """``model(x)`` returns confidence vectors (probabilities) for a batch — wrap a logit
    classifier in :class:`raymia.models.ProbModel`; ``gate(query)`` gets each
    query image (C, H, W) before the model sees it and returns False to refuse it;
    ``observer(it, x, conf)`` is called after every answered query ``it`` (1-based) with
    the attacker's updated image ``x`` and the target confidence the query got."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.full(shape, 0.5) if x0 is None else x0.clone().float()).to(device)
    conf_trace, blocked_at, queries = [], None, 0
    model.eval()
    for it in range(1, iters + 1):
        q = x
        if noise_std > 0:
            q = (x + torch.randn(shape, generator=g).to(device) * noise_std).clamp(0.0, 1.0)
        if gate is not None and not gate(q.detach().cpu()):
            blocked_at = it
            break
        queries += 1
        q = q.detach().requires_grad_(True)
        p = model(q[None])
        cost = 1.0 - p[0, target]
        grad, = torch.autograd.grad(cost, q)
        conf_trace.append(float(p[0, target].detach()))
        with torch.no_grad():
            x = (x - lr * grad).clamp_(0.0, 1.0)
        if observer is not None:
            observer(it, x.detach(), conf_trace[-1])
    with torch.no_grad():
        p = model(x[None])
    return FredriksonResult(x.cpu(), queries, blocked_at, float(p[0, target]), conf_trace)

