"""Simulations against the live Serve endpoint: Fredrikson's attack with noise before
every query (the attacker), and a regular user sending distinct images; ``attack_job`` and
``regular_job`` are ``jobs/serve_client.py``'s two modes."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..config import Config, ConfigError
from ..serving.client import ClientError, Reply, ServeClient, encode_png
from ..serving.plan import load_serving_model, resolve_plan


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


def attack_job(cfg: Config, preset: str, url: str, client_id: str = "mallory", api_key: Optional[str] = None,
               target: int = 0, noise: Optional[float] = None, iters: Optional[int] = None,
               save: Optional[str] = None, say: Callable[[str], None] = print) -> int:
    """``serve_client.py attack``: every iteration sends the current image plus fresh
    Gaussian noise (``filter_sim.noise_std`` unless ``noise``, the similarity-filter paper's
    evasion attempt) to ``POST /predict`` and stops at the first 403.  The gradient comes
    from a local white-box copy of the served model (Fredrikson's white-box setting): a
    finite-difference gradient would cost 2*C*H*W near-identical queries per step (2048 at
    32x32), which is exactly what the filter blocks within its first L_sp matches.
    Returns the exit status: 0 when the attacker was blocked, 1 when it never was."""
    client = ServeClient(url, client_id, api_key)
    plan = resolve_plan(cfg, preset)
    model, n_classes, shape = load_serving_model(plan)
    if not 0 <= target < n_classes:
        raise ConfigError(f"--target must lie in 0..{n_classes - 1}")
    noise = cfg.filter_sim.noise_std if noise is None else noise
    iters = iters or cfg.filter_sim.max_iters
    say(f"client {client_id!r}: Fredrikson attack on class {target} against {url} "
        f"(local white-box copy: {plan.model}, alpha={plan.alpha}), noise std {noise:g}, at most {iters} queries")
    res = attack_endpoint(client, model, target, shape, iters, cfg.attack.fredrikson_lr, noise,
                          seed=cfg.run.seed, log=say)
    if res["blocked_at"]:
        say(f"BLOCKED after {res['served']} served queries (query {res['blocked_at']} got 403: "
            f"{res['blocked_reply'].get('message')})")
    else:
        say(f"never blocked: all {res['served']} queries served")
    say(f"local confidence in the target at the end: {res['final_local_conf']:.3f}; "
        f"median query latency {res['median_latency_ms']:.1f} ms")
    if save:
        with open(save, "wb") as fh:
            fh.write(encode_png(res["image"].numpy()))
        say(f"reconstruction written to {save}")
    return 0 if res["blocked_at"] else 1


def regular_job(bundle, url: str, client_id: str = "alice", api_key: Optional[str] = None,
                label: Optional[int] = None, max_images: int = 0, say: Callable[[str], None] = print) -> int:
    """``serve_client.py regular``: sends distinct real images of ``label`` (or of every
    label; at most ``max_images`` when set) once each, without noise.  Returns the exit
    status: 0 when all were served, 1 when the user was blocked."""
    client = ServeClient(url, client_id, api_key)
    x = np.concatenate([bundle.private_test.x.numpy(), bundle.private_train.x.numpy()])
    y = np.concatenate([bundle.private_test.y.numpy(), bundle.private_train.y.numpy()])
    if label is not None:
        if not 0 <= label < bundle.n_private:
            raise ConfigError(f"--label must lie in 0..{bundle.n_private - 1}")
        x, y = x[y == label], y[y == label]
    if max_images:
        x, y = x[:max_images], y[:max_images]
    say(f"client {client_id!r}: sending {len(x)} distinct real images "
        f"({'label ' + str(label) if label is not None else 'all labels'}) to {url}, no noise")
    res = regular_user(client, x, y, log=say)
    if res["blocked_at"]:
        say(f"BLOCKED at image {res['blocked_at']} after {res['served']} served")
    else:
        say(f"all {res['served']} images served; label accuracy {res['accuracy']:.1%}")
    return 1 if res["blocked_at"] else 0
