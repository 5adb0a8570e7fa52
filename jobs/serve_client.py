"""Clients of the live Serve app (``serve run serve.app``): an attacker running
Fredrikson's attack through the endpoint, and a regular user.

    python jobs/serve_client.py attack  [--url http://127.0.0.1:8000] [--client-id mallory] [--target 0]
    python jobs/serve_client.py regular [--url http://127.0.0.1:8000] [--client-id alice] [--label 3]
    python jobs/serve_client.py sample  [--out runs/serve_samples] [--count 3]   # test faces for curl

All take the app's --preset/--set.  The work is in :mod:`raymia.attacks.endpoint` (attack,
regular) and :func:`raymia.serving.client.write_samples`."""
import argparse
import sys
from pathlib import Path

from raymia import cli
from raymia.attacks.endpoint import attack_job, regular_job
from raymia.config import add_cli_args
from raymia.data import load_bundle
from raymia.runtime import resolve_out_root
from raymia.serving.client import add_client_args, app_errors, write_samples


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    add_client_args(p)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    cfg = cli.config_from_args(args)
    resolve_out_root(cfg)
    say = lambda msg: print(f"[{args.mode}] {msg}", flush=True)
    with app_errors():
        if args.mode == "attack":
            return attack_job(cfg, args.preset, args.url, args.client_id or "mallory", args.api_key, args.target,
                              args.noise, args.iters, args.save, say)
        bundle = load_bundle(cfg.data)
        if args.mode == "sample":
            return write_samples(bundle, Path(args.out), args.count, say)
        return regular_job(bundle, args.url, args.client_id or "alice", args.api_key, args.label, args.max_images, say)


if __name__ == "__main__":
    cli.run_main(lambda: sys.exit(main()))
