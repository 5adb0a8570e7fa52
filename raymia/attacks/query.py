"""The query attacks by name, with the ``query_attack`` section's parameters: ``nes`` (the
score-based black-box attack, :mod:`raymia.attacks.blackbox`) and ``label`` (the label-only
attack, :mod:`raymia.attacks.label_only`) at a given budget -- the one place the pipelines
and benchmarks turn the config into an attack call."""
from __future__ import annotations

from typing import Optional

from .blackbox import QueryAttackResult, blackbox_mia
from .label_only import label_only_mia

ATTACKS = ("nes", "label")


def run_query_attack(attack: str, oracle, generator, targets, seeds, budget: int, qa, bound: float, device="cpu",
                     chunk: Optional[int] = None) -> QueryAttackResult:
    """``attack`` at ``budget`` queries per row with ``qa`` (a :class:`~raymia.config.QueryAttackCfg`)
    for the rest; ``chunk``: the black-box attack's forward pieces (None = ``qa.forward_batch``;
    0 = one call per iteration, as an HTTP oracle wants)."""
    if attack == "nes":
        return blackbox_mia(oracle, generator, targets, seeds, budget=budget, pairs=qa.nes_pairs, sigma=qa.nes_sigma,
                            lr=qa.nes_lr, bound=bound, device=device,
                            chunk=qa.forward_batch if chunk is None else chunk)
    if attack == "label":
        return label_only_mia(oracle, generator, targets, seeds, budget=budget, points=qa.label_points,
                              r0=qa.label_r0, growth=qa.label_growth, r_max=qa.label_r_max, step=qa.label_step,
                              init_batch=qa.label_init_batch, init_budget=min(qa.label_init_budget, budget),
                              bound=bound, device=device)
    raise ValueError(f"unknown query attack {attack!r} (one of {', '.join(ATTACKS)})")
