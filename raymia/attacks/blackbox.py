"""A black-box, score-based generator MIA (the setting of Yoshimura et al. 2021, named
by the dummy-model paper): the latent search of :mod:`raymia.attacks.generator_mia`
(a latent xi of the attacker's generator F, kept in the prior's range [-bound, bound],
maximising the released model's confidence in the target) with the gradient *estimated
from confidences alone* -- natural evolution strategies with antithetic pairs:

    g_r = 1 / (2 sigma P) * sum_i [ log s(xi + sigma u_i) - log s(xi - sigma u_i) ] u_i,
    u_i ~ N(0, I),

where s is the target's confidence in the oracle's answer (top-k answers: the target's
returned confidence, else the unassigned mass spread over the classes not returned,
:func:`raymia.attacks.oracle.target_scores`).  Adam ascends g_r (element-wise, per row).

Batched: every iteration renders the whole query population of every active row
(rows x 2P images) with ONE forward of F and sends it to the oracle in ONE call
(:mod:`raymia.attacks.oracle`: in-process, any defense and α per row; or HTTP); each row
has its own target, seed (start and directions come from the row's own generator, so a
row follows the same trajectory whatever batch it is in) and α (carried by the oracle).
Each row counts the images whose scores it received and stops at its query budget
(an iteration that would cross it uses fewer pairs; a row with fewer than 2 queries left
stops), at ``iters`` iterations, or when the oracle blocks it (HTTP 403): the row then
keeps its latent of that moment and records the number of the refused query.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .generator_mia import initial_latents
from .oracle import Oracle, check_rows, target_scores


@dataclass
class QueryAttackResult:
    """Per row: final latent and reconstruction (for a blocked row: those at the block),
    the best-scored latent the attacker saw, and the query accounting."""
    latents: torch.Tensor          # (R, d)
    images: torch.Tensor           # (R, C, H, W) F(latents), in [0, 1]
    best_latents: torch.Tensor     # (R, d) the queried latent with the highest target score (label-only: = latents)
    best_scores: torch.Tensor      # (R,) that score (label-only: 1.0 if the final latent is labelled the target)
    queries: np.ndarray            # (R,) images whose answers the row received (never above its budget)
    sent: np.ndarray               # (R,) queries sent (= queries, + 1 for a refused query)
    blocked_at: np.ndarray         # (R,) number of the refused query (1-based); 0 = never blocked
    iters: np.ndarray              # (R,) iterations the row ran
    budgets: np.ndarray            # (R,) its budget
    seconds: float
    oracle_calls: int              # query() calls (batched rounds)
    extra: Optional[dict] = None   # attack-specific per-row arrays (e.g. label-only radii)

    @property
    def blocked(self) -> np.ndarray:
        return self.blocked_at > 0

    def rows(self) -> list[dict]:
        """One plain dict per row (for tables / JSON)."""
        out = []
        for r in range(self.latents.shape[0]):
            d = {"queries": int(self.queries[r]), "sent": int(self.sent[r]), "blocked": bool(self.blocked_at[r]),
                 "blocked_at": int(self.blocked_at[r]) or None, "iters": int(self.iters[r]),
                 "budget": int(self.budgets[r]), "best_score": float(self.best_scores[r])}
            for k, v in (self.extra or {}).items():
                d[k] = v[r].item() if hasattr(v[r], "item") else v[r]
            out.append(d)
        return out


def _per_row(v, n: int, name: str, dtype=np.int64) -> np.ndarray:
    a = np.asarray(v if np.ndim(v) else [v] * n, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one entry per row")
    return a


def row_generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    """One torch generator per row for the attack's random directions: seeded by the row's
    seed and a stream number (so they never replay the start latent's draws)."""
    return [torch.Generator().manual_seed((int(s) * 1_000_003 + 7919 * stream) % (2 ** 63 - 1)) for s in seeds]


@torch.no_grad()
def render(generator: torch.nn.Module, z: torch.Tensor, device, chunk: int = 0) -> torch.Tensor:
    """F(z) on ``device`` in one forward (``chunk`` > 0: forwards of at most ``chunk``), cpu float in [0, 1]."""
    if chunk and z.shape[0] > chunk:
        return torch.cat([render(generator, z[i:i + chunk], device) for i in range(0, z.shape[0], chunk)])
    return generator(z.to(device)).float().clamp(0, 1).cpu()


def _ask(oracle: Oracle, generator, z: torch.Tensor, rows: torch.Tensor, device, chunk: int):
    """Render ``z`` and query it (``chunk`` > 0: in pieces of at most ``chunk`` queries,
    one forward and one oracle call each -- the one-query-at-a-time baseline at 1)."""
    if not chunk or z.shape[0] <= chunk:
        return oracle.query(render(generator, z, device), rows)
    reps = [oracle.query(render(generator, z[i:i + chunk], device), rows[i:i + chunk])
            for i in range(0, z.shape[0], chunk)]
    from .oracle import OracleReply
    probs = None if reps[0].probs is None else torch.cat([r.probs for r in reps])
    return OracleReply(torch.cat([r.labels for r in reps]), torch.cat([r.answered for r in reps]), probs)


def blackbox_mia(oracle: Oracle, generator: torch.nn.Module, targets: Sequence[int], seeds: Sequence[int],
                 budget: Union[int, Sequence[int]] = 2000, pairs: int = 10, sigma: float = 0.1, lr: float = 0.05,
                 iters: int = 0, bound: float = 3.0, device="cpu", chunk: int = 0,
                 progress: Optional[Callable[[int, dict], None]] = None) -> QueryAttackResult:
    """Run the NES black-box attack for every row of ``oracle`` (row r: ``targets[r]``,
    ``seeds[r]``, ``budget[r]`` queries; its α lives in the oracle).  ``pairs`` antithetic
    pairs per iteration (2·pairs queries), perturbation ``sigma`` in latent units, Adam
    with ``lr``; ``iters`` > 0 caps the iterations (0 = until the budget).  ``chunk`` > 0
    splits each round into forwards/oracle calls of at most ``chunk`` images (same
    trajectory; ``chunk=1`` is the one-query-at-a-time baseline)."""
    n = check_rows(generator, oracle, targets, seeds)
    device = torch.device(device)
    if oracle.labels_only:
        raise ValueError("the score-based attack needs confidences; use raymia.attacks.label_only for a labels-only oracle")
    if pairs < 1 or sigma <= 0:
        raise ValueError("pairs must be >= 1 and sigma > 0")
    budgets = _per_row(budget, n, "budget")
    t = torch.as_tensor(list(targets), dtype=torch.long)
    d = generator.latent_dim
    z = initial_latents(seeds, d).clamp_(-bound, bound)
    gens = row_generators(seeds, 1)
    m, v = torch.zeros(n, d), torch.zeros(n, d)
    steps = np.zeros(n, np.int64)
    queries, sent_own = np.zeros(n, np.int64), np.zeros(n, np.int64)
    blocked_at = np.zeros(n, np.int64)
    done = np.zeros(n, bool)
    best_z, best_s = z.clone(), torch.full((n,), -float("inf"))
    b1, b2, eps = 0.9, 0.999, 1e-8
    calls0, t0 = oracle.calls, time.time()
    it = 0
    while True:
        it += 1
        left = budgets - queries
        k = np.minimum(pairs, left // 2)
        done |= k < 1
        if iters:
            done |= steps >= iters
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        us, zs, rows = [], [], []
        for r in act:
            u = torch.randn(int(k[r]), d, generator=gens[r])
            us.append(u)
            zs += [(z[r] + sigma * u).clamp(-bound, bound), (z[r] - sigma * u).clamp(-bound, bound)]
            rows.append(torch.full((2 * int(k[r]),), int(r), dtype=torch.long))
        zq, rq = torch.cat(zs), torch.cat(rows)
        rep = _ask(oracle, generator, zq, rq, device, chunk)
        ok = rep.answered
        s = torch.log(target_scores(rep.probs, t[rq]).clamp_min(1e-12))
        s = torch.where(ok, s, torch.full_like(s, float("nan")))
        pos = 0
        grads, upd = [], []
        for j, r in enumerate(act):
            kk = int(k[r])
            sp, sm = s[pos:pos + kk], s[pos + kk:pos + 2 * kk]
            okr = ok[pos:pos + 2 * kk]
            got = int(okr.sum())
            queries[r] += got
            sent_own[r] += got
            sr = s[pos:pos + 2 * kk]
            if got:
                jb = int(torch.nan_to_num(sr, nan=-float("inf")).argmax())
                if float(sr[jb]) > float(best_s[r]):
                    best_s[r], best_z[r] = sr[jb], zq[pos + jb]
            pos += 2 * kk
            if got < 2 * kk:               # refused mid-round: the row ends with its latent of this moment
                if oracle.blocked[r]:
                    sent_own[r] += 1
                    blocked_at[r] = sent_own[r]
                done[r] = True
                continue
            grads.append(((sp - sm)[:, None] * us[j]).sum(0) / (2 * sigma * kk))
            upd.append(int(r))
        if upd:
            ix = torch.as_tensor(upd)
            g = -torch.stack(grads)                       # Adam minimises -log s
            steps[upd] += 1
            m[ix] = b1 * m[ix] + (1 - b1) * g
            v[ix] = b2 * v[ix] + (1 - b2) * g * g
            tt = torch.as_tensor(steps[upd], dtype=torch.float32)[:, None]
            mh, vh = m[ix] / (1 - b1 ** tt), v[ix] / (1 - b2 ** tt)
            z[ix] = (z[ix] - lr * mh / (vh.sqrt() + eps)).clamp(-bound, bound)
        if progress:
            progress(it, {"active": int((~done).sum()), "queries": int(queries.sum()),
                          "mean_best_conf": float(best_s[torch.isfinite(best_s)].exp().mean())
                          if bool(torch.isfinite(best_s).any()) else float("nan")})
    images = render(generator, z, device)
    return QueryAttackResult(z, images, best_z, best_s.exp(), queries, sent_own, blocked_at, steps, budgets,
                             time.time() - t0, oracle.calls - calls0)
