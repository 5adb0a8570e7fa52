"""A label-only generator MIA: boundary repulsion in the attacker's latent space (BREP-MI,
Kahla et al., CVPR 2022 -- the label-only family the similarity-filter paper cites via
Zhu et al. 2022).  The attacker sees only the released model's top-1 label.

Per row (target y, own seed, α carried by the oracle):

1. **Start.** Draw latents of F from the prior (``init_batch`` per round, from the row's
   own generator) until one is labelled y; a row that finds none within ``init_budget``
   queries ends there (its reconstruction is the last drawn latent; ``found`` = False).
2. **Repulsion.** At the current point xi with radius R, query ``points`` points
   xi + R u_n on the sphere (u_n uniform unit directions; kept in [-bound, bound]).  If
   every one is labelled y, the ball is inside the target's region: grow R by
   ``growth``.  Otherwise step away from the points that are *not* labelled y,
   xi' = xi + step * R * M / |M| with M = -sum_{n: label != y} u_n, and query xi'
   (one more query): it is accepted when labelled y; otherwise the step is halved for
   the next try (it is reset when a step is accepted).
3. **Stop** when R reaches ``r_max``, at the budget (a round that would cross it uses
   fewer sphere points; a row with fewer than 2 queries left stops), or at a block (HTTP
   403: the row keeps its point of that moment and the number of the refused query).

Batched: every round sends all active rows' sphere points (and the starting draws of
rows still searching) in one oracle call, and their proposals in a second one.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .blackbox import QueryAttackResult, _per_row, render, row_generators
from .generator_mia import initial_latents
from .oracle import Oracle, check_rows


def _unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, d, generator=gen)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


def label_only_mia(oracle: Oracle, generator: torch.nn.Module, targets: Sequence[int], seeds: Sequence[int],
                   budget: Union[int, Sequence[int]] = 3000, points: int = 24, r0: float = 1.0,
                   growth: float = 1.2, r_max: float = 8.0, step: float = 0.5, init_batch: int = 64,
                   init_budget: int = 2000, bound: float = 3.0, device="cpu",
                   progress: Optional[Callable[[int, dict], None]] = None) -> QueryAttackResult:
    """Run the label-only attack for every row of ``oracle`` (any oracle: only labels
    are read).  See the module docstring for the parameters.  ``result.extra`` holds per
    row ``found`` (a start labelled the target was found), ``radius`` (final R),
    ``final_is_target``, ``init_queries`` (queries spent on starting draws; for a found row
    the number of the start's own query) and ``start_latent`` (the start)."""
    n = check_rows(generator, oracle, targets, seeds)
    device = torch.device(device)
    if points < 1 or r0 <= 0 or growth <= 1 or step <= 0:
        raise ValueError("points >= 1, r0 > 0, growth > 1 and step > 0 are required")
    budgets = _per_row(budget, n, "budget")
    t = np.asarray(list(targets), np.int64)
    d = generator.latent_dim
    z = initial_latents(seeds, d).clamp_(-bound, bound)
    gens = row_generators(seeds, 2)
    found = np.zeros(n, bool)
    radius = np.full(n, float(r0))
    step_now = np.full(n, float(step))
    rounds = np.zeros(n, np.int64)
    queries, sent = np.zeros(n, np.int64), np.zeros(n, np.int64)
    init_q = np.zeros(n, np.int64)
    z_start = z.clone()
    blocked_at = np.zeros(n, np.int64)
    done = np.zeros(n, bool)
    calls0, t0 = oracle.calls, time.time()

    def account(rows_: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Count a round's answers per row; rows refused mid-round end.  Returns the rows that ended."""
        ended = []
        for r in np.unique(rows_):
            mine = rows_ == r
            got = int(ok[mine].sum())
            queries[r] += got
            sent[r] += got
            if got < int(mine.sum()):
                if oracle.blocked[r]:
                    sent[r] += 1
                    blocked_at[r] = sent[r]
                done[r] = True
                ended.append(r)
        return np.asarray(ended, np.int64)

    it = 0
    while True:
        it += 1
        left = budgets - queries
        done |= left < 2
        done |= found & (radius >= r_max)
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        # -- round 1: starting draws (rows still searching) and sphere points (rows started)
        zs, rows, kinds = [], [], []
        for r in act:
            if not found[r]:
                k = int(min(init_batch, left[r], max(init_budget - init_q[r], 0)))
                if k < 1:
                    done[r] = True
                    continue
                zs.append(torch.randn(k, d, generator=gens[r]).clamp(-bound, bound))
                kinds.append(("init", r, k))
            else:
                k = int(min(points, left[r] - 1))      # keep one query for the proposal
                zs.append((z[r] + radius[r] * _unit(k, d, gens[r])).clamp(-bound, bound))
                kinds.append(("sphere", r, k))
            rows.append(np.full(k, r, np.int64))
        if not zs:
            break
        zq, rq = torch.cat(zs), np.concatenate(rows)
        rep = oracle.query(render(generator, zq, device), torch.from_numpy(rq))
        ok, lab = rep.answered.numpy(), rep.labels.numpy()
        ended = set(account(rq, ok).tolist())
        pos = 0
        prop_z, prop_rows = [], []
        for kind, r, k in kinds:
            zr, okr, labr = zq[pos:pos + k], ok[pos:pos + k], lab[pos:pos + k]
            pos += k
            if r in ended:
                continue
            if kind == "init":
                init_q[r] += k
                hit = np.flatnonzero(okr & (labr == t[r]))
                z[r] = zr[hit[0]] if hit.size else zr[-1]
                found[r] = bool(hit.size)
                if found[r]:
                    z_start[r] = z[r]
                    init_q[r] += int(hit[0]) + 1 - k      # the start's own query number
                continue
            rounds[r] += 1
            out = okr & (labr != t[r])
            if not out.any():
                radius[r] *= growth
                continue
            u = (zr - z[r]) / radius[r]                 # directions (clamping bends them a little)
            mvec = -u[torch.from_numpy(out)].sum(0)
            nrm = float(mvec.norm())
            if nrm < 1e-12:
                continue
            prop_z.append((z[r] + step_now[r] * radius[r] * mvec / nrm).clamp(-bound, bound))
            prop_rows.append(r)
        # -- round 2: the proposals
        if prop_rows:
            pr = np.asarray(prop_rows, np.int64)
            zp = torch.stack(prop_z)
            rep = oracle.query(render(generator, zp, device), torch.from_numpy(pr))
            ok, lab = rep.answered.numpy(), rep.labels.numpy()
            ended = set(account(pr, ok).tolist())
            for j, r in enumerate(pr):
                if r in ended:
                    continue
                if lab[j] == t[r]:
                    z[r] = zp[j]
                    step_now[r] = step
                else:
                    step_now[r] *= 0.5
        if progress:
            progress(it, {"active": int((~done).sum()), "queries": int(queries.sum()),
                          "found": int(found.sum()), "mean_radius": float(radius[found].mean()) if found.any() else 0.0})
    images = render(generator, z, device)
    # the final point's label is known to the attacker when it was found (start and accepted steps are labelled y)
    final_is_target = found.copy()
    return QueryAttackResult(z, images, z.clone(), torch.as_tensor(final_is_target, dtype=torch.float32), queries,
                             sent, blocked_at, rounds, budgets, time.time() - t0, oracle.calls - calls0,
                             extra={"found": found, "radius": radius, "init_queries": init_q,
                                    "final_is_target": final_is_target, "start_latent": z_start})
