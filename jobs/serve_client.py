"""Clients of the live Serve app (``serve run serve.app``): an attacker running
Fredrikson's attack through the endpoint, and a regular user.

    python jobs/serve_client.py attack  [--url http://127.0.0.1:8000] [--client-id mallory] [--target 0]
    python jobs/serve_client.py regular [--url http://127.0.0.1:8000] [--client-id alice] [--label 3]
    python jobs/serve_client.py sample  [--out runs/serve_samples] [--count 3]   # test faces for curl

Both take the app's --preset/--set (the attacker holds a white-box copy of the served
model; the regular user sends the preset's real images).

attack:  every iteration sends the current image plus fresh Gaussian noise
         (filter.noise_std, the similarity-filter paper's evasion attempt) to POST /predict
         and stops at the first 403.  The gradient comes from a local white-box copy of the
         served model (Fredrikson's white-box setting): a finite-difference gradient would
         cost 2*C*H*W near-identical queries per step (2048 at 32x32), which is exactly
         what the filter blocks within its first L_sp matches.
regular: sends distinct real images of one label (or of every label) once each, without
         noise, and reports whether all were served."""
import _bootstrap  # noqa: F401

import argparse
import json
import sys
import urllib.error
from pathlib import Path

import numpy as np

from raymia import cli
from raymia.data import load_bundle
from raymia.distributed import resolve_out_root
from raymia.config import ConfigError, add_cli_args
from raymia.serving import (ClientError, ServeClient, attack_endpoint, encode_png, load_serving_model, regular_user,
                            resolve_plan)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    p.add_argument("mode", choices=["attack", "regular", "sample"])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address")
    p.add_argument("--client-id", default=None, help="X-Client-Id to send (default: mallory / alice)")
    p.add_argument("--api-key", default=None, help="X-API-Key to send (when the app maps API keys to clients)")
    p.add_argument("--target", type=int, default=0, help="attack: R_T class to reconstruct")
    p.add_argument("--noise", type=float, default=None, help="attack: noise std per query (default filter.noise_std)")
    p.add_argument("--iters", type=int, default=None, help="attack: most queries (default filter.max_iters)")
    p.add_argument("--label", type=int, default=None, help="regular: send images of this label only (default: all)")
    p.add_argument("--max-images", type=int, default=0, help="regular: send at most this many images (0 = all)")
    p.add_argument("--save", default=None, help="attack: write the reconstruction as a PNG here")
    p.add_argument("--out", default="runs/serve_samples", help="sample: folder for face-<i>.png and face-<i>.json")
    p.add_argument("--count", type=int, default=3, help="sample: how many held-out faces to write")
    return p.parse_args()


def write_samples(bundle, out: Path, count: int, say) -> int:
    """Held-out faces of R_T's identities as request bodies: PNG bytes and JSON nested lists."""
    out.mkdir(parents=True, exist_ok=True)
    x, y = bundle.private_test.x.numpy(), bundle.private_test.y.numpy()
    first = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)]      # one face per class
    for i, k in enumerate(first[:count]):
        (out / f"face-{i}.png").write_bytes(encode_png(x[k]))
        (out / f"face-{i}.json").write_text(json.dumps({"image": x[k].tolist()}))
        say(f"{out / f'face-{i}.png'} and .json: a held-out face of class {int(y[k])}")
    return 0


def main():
    args = parse_args()
    cfg = cli.config_from_args(args)
    resolve_out_root(cfg)
    say = lambda msg: print(f"[{args.mode}] {msg}", flush=True)
    if args.mode == "attack":
        cid = args.client_id or "mallory"
        client = ServeClient(args.url, cid, args.api_key)
        plan = resolve_plan(cfg, args.preset)
        model, n_classes, shape = load_serving_model(plan)
        if not 0 <= args.target < n_classes:
            raise ConfigError(f"--target must lie in 0..{n_classes - 1}")
        noise = cfg.filter.noise_std if args.noise is None else args.noise
        iters = args.iters or cfg.filter.max_iters
        say(f"client {cid!r}: Fredrikson attack on class {args.target} against {args.url} "
            f"(local white-box copy: {plan.model}, alpha={plan.alpha}), noise std {noise:g}, at most {iters} queries")
        res = attack_endpoint(client, model, args.target, shape, iters, cfg.attack.fredrikson_lr, noise,
                              seed=cfg.run.seed, log=say)
        if res["blocked_at"]:
            say(f"BLOCKED after {res['served']} served queries (query {res['blocked_at']} got 403: "
                f"{res['blocked_reply'].get('message')})")
        else:
            say(f"never blocked: all {res['served']} queries served")
        say(f"local confidence in the target at the end: {res['final_local_conf']:.3f}; "
            f"median query latency {res['median_latency_ms']:.1f} ms")
        if args.save:
            with open(args.save, "wb") as fh:
                fh.write(encode_png(res["image"].numpy()))
            say(f"reconstruction written to {args.save}")
        return 0 if res["blocked_at"] else 1
    bundle = load_bundle(cfg.data)
    if args.mode == "sample":
        return write_samples(bundle, Path(args.out), args.count, say)
    cid = args.client_id or "alice"
    client = ServeClient(args.url, cid, args.api_key)
    x = np.concatenate([bundle.private_test.x.numpy(), bundle.private_train.x.numpy()])
    y = np.concatenate([bundle.private_test.y.numpy(), bundle.private_train.y.numpy()])
    if args.label is not None:
        if not 0 <= args.label < bundle.n_private:
            raise ConfigError(f"--label must lie in 0..{bundle.n_private - 1}")
        x, y = x[y == args.label], y[y == args.label]
    if args.max_images:
        x, y = x[:args.max_images], y[:args.max_images]
    say(f"client {cid!r}: sending {len(x)} distinct real images "
        f"({'label ' + str(args.label) if args.label is not None else 'all labels'}) to {args.url}, no noise")
    res = regular_user(client, x, y, log=say)
    if res["blocked_at"]:
        say(f"BLOCKED at image {res['blocked_at']} after {res['served']} served")
    else:
        say(f"all {res['served']} images served; label accuracy {res['accuracy']:.1%}")
    return 1 if res["blocked_at"] else 0


def run() -> int:
    try:
        return main()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ConfigError(f"cannot reach the app ({getattr(e, 'reason', e)}); start it with `serve run serve.app` "
                          "and pass its address with --url") from None
    except ClientError as e:
        raise ConfigError(f"unexpected answer from the app: {e}") from None


if __name__ == "__main__":
    cli.run_main(lambda: sys.exit(run()))
