"""Simulations against the live Serve endpoint: Fredrikson's attack with noise before
every query (the attacker), and a regular user sending distinct images."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..serving.client import ClientError, Reply, ServeClient


def attack_endpoint(client: ServeClient, model, target: int, shape: tuple, iters: int, lr: float,
                    noise_std: float, seed: int = 0, log: Optional[Callable[[str], None]] = None) -> dict:
    """Fredrikson's attack against the live endpoint.

    The gradient comes from ``model``, a local white-box copy of the served model (the
    threat model of Fredrikson's white-box attack and of the filter paper, whose attacker
    optimises on confidences it gets back); every query the attack makes -- the current
    image plus fresh noise -- is sent to the endpoint first, and the attack stops at the
    first 403.  Returns what happened."""
    from .fredrikson import fredrikson_attack
    replies: list[Reply] = []

    def gate(q) -> bool:
        r = client.predict(q.numpy())
        replies.append(r)
        if r.status == 403:
            return False
        if r.status != 200:
            raise ClientError(f"query {len(replies)}: HTTP {r.status} {r.body}")
        if log and (len(replies) <= 3 or len(replies) % 25 == 0):
            conf = next((t["confidence"] for t in r.body.get("top_k", []) if t["label"] == target), None)
            log(f"query {len(replies)}: served, label {r.body.get('label')}, server confidence in target "
                f"{'n/a' if conf is None else f'{conf:.3f}'}")
        return True

    res = fredrikson_attack(model, target, shape, iters=iters, lr=lr, noise_std=noise_std, seed=seed, gate=gate)
    return {"target": target, "queries_sent": len(replies), "served": res.queries, "blocked_at": res.blocked_at,
            "blocked_reply": replies[-1].body if res.blocked_at else None, "final_local_conf": res.target_conf,
            "image": res.image, "median_latency_ms": 1000 * float(np.median([r.seconds for r in replies]))
            if replies else float("nan")}


def regular_user(client: ServeClient, images: Sequence, labels: Optional[Sequence[int]] = None,
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Send distinct images without noise, one request each (the paper's regular user);
    stop at the first 403."""
    served, correct, blocked_at = 0, 0, None
    for i, img in enumerate(images, 1):
        r = client.predict(np.asarray(img))
        if r.status == 403:
            blocked_at = i
            if log:
                log(f"image {i}: BLOCKED ({r.body.get('message')})")
            break
        if r.status != 200:
            raise ClientError(f"image {i}: HTTP {r.status} {r.body}")
        served += 1
        if labels is not None:
            correct += int(r.body["label"] == int(labels[i - 1]))
    return {"sent": served + (blocked_at is not None), "served": served, "blocked_at": blocked_at,
            "accuracy": correct / served if labels is not None and served else None}

