"""Query-attack benchmarks (raymia/attacks/blackbox.py, label_only.py, oracle.py).

Default mode -- throughput of the batched black-box (NES) attack vs one query at a time,
same models, same rows, one run on this machine:

* batched: every iteration renders all rows' 2P perturbed latents with ONE forward of the
  attacker's generator F and answers them with ONE forward of the released model R'
  (in-process oracle, one α per row);
* one at a time: the same attack with ``chunk=1`` (one image per F forward and per oracle
  call; the trajectory is the same);
* batched in pieces (``--chunked N``, default 64; 0 = not measured): the same with
  ``chunk=N`` -- the iteration's queries in forwards of at most N images, which on a CPU
  can beat one forward of all of them (the activations of N images stay in cache).

Models are the ``orl`` preset's networks (R_T, R_dmy: faceresnet width 32, 20 classes;
F: DCGAN latent 64, ngf 32; 32x32 gray) with random weights: throughput does not depend
on what the weights learned.  Queries per second = answered queries / wall seconds of the
attack call; best of ``--rounds`` interleaved rounds (median in the JSON).

``--serve-filter``: the label-only attacker over HTTP against the smoke Serve app with the
similarity filter (Table 1 config 3, the ``filter`` section's defaults) in front of R_T
alone (``serve.model=target``): trains the smoke artifacts it needs under ``--out-root``,
starts a local Ray + Serve, and reports per row how many queries were answered before a
403 (or that none came), then R_E's and the judges' verdict on the reconstructions.
``--serve-preset``, ``--serve-set key=value`` (applied last, e.g. ``serve.model=combined
filter.kind=robust``), ``--serve-attack nes`` and ``--panel-seeds`` (the threat panel's
rows: every known target, row seed threat_panel.seed + 1000 run.seed + 10 target + restart)
run another app / attack, e.g. one cell of the threat panel over HTTP.

    python bench/bench_query_attacks.py                       # throughput (~1 min on 2 quiet cores)
    python bench/bench_query_attacks.py --serve-filter        # label-only vs the filter over HTTP
    python bench/bench_query_attacks.py --serve-filter --serve-preset orl --out-root runs --panel-seeds \
        --serve-set serve.model=combined --serve-set filter.kind=robust --serve-attack nes --budget 2000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raymia.attacks.blackbox import blackbox_mia  # noqa: E402
from raymia.attacks.oracle import InProcessOracle  # noqa: E402
from raymia.config import ConfigError, load_config  # noqa: E402


def orl_models(seed: int = 0, preset: str = "orl"):
    from raymia.defenses.dummy import CombinedModel
    from raymia.models import build_classifier, build_generator, freeze
    cfg = load_config(preset)
    torch.manual_seed(seed)
    size, n = cfg.data.image_size, cfg.data.private_ids
    rt = freeze(build_classifier(cfg.target, 1, size, n))
    dm = freeze(build_classifier(cfg.target, 1, size, n))
    F = freeze(build_generator(cfg.attacker_gan, 1, size))
    return cfg, CombinedModel(rt, dm, 0.5).eval(), F, n


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    cfg, model, F, n = orl_models(preset=args.preset)
    rows = args.rows
    targets = [r % n for r in range(rows)]
    seeds = list(range(100, 100 + rows))
    alphas = [[1.0, 0.7, 0.5, 0.25][r % 4] for r in range(rows)]
    q = cfg.query_attack
    per_iter = 2 * q.nes_pairs
    res = {"batched": [], "one_at_a_time": []}
    if args.chunked:
        res[f"chunks_of_{args.chunked}"] = []

    def run(chunk: int, iters: int) -> float:
        o = InProcessOracle(model, rows, n, alphas=alphas)
        t0 = time.perf_counter()
        r = blackbox_mia(o, F, targets, seeds, budget=per_iter * iters, pairs=q.nes_pairs, sigma=q.nes_sigma,
                         lr=q.nes_lr, bound=cfg.attack.latent_bound, chunk=chunk)
        dt = time.perf_counter() - t0
        assert int(r.queries.sum()) == rows * per_iter * iters
        return int(r.queries.sum()) / dt

    run(0, 1)
    run(1, 1)                                           # warm-up both paths
    for _ in range(args.rounds):
        res["batched"].append(run(0, args.batched_iters))
        res["one_at_a_time"].append(run(1, args.serial_iters))
        if args.chunked:
            res[f"chunks_of_{args.chunked}"].append(run(args.chunked, args.batched_iters))
        print("round: " + ", ".join(f"{k} {v[-1]:.0f} q/s" for k, v in res.items()), flush=True)
    best = {k: max(v) for k, v in res.items()}
    med = {k: float(np.median(v)) for k, v in res.items()}
    chunked = {f"speedup_chunks_of_{args.chunked}_best": best[f"chunks_of_{args.chunked}"] / best["one_at_a_time"],
               f"speedup_chunks_of_{args.chunked}_median": med[f"chunks_of_{args.chunked}"] / med["one_at_a_time"]
               } if args.chunked else {}
    return {"preset": args.preset, "rows": rows, "pairs": q.nes_pairs, "queries_per_iter_per_row": per_iter,
            "batched_iters": args.batched_iters, "serial_iters": args.serial_iters,
            "images_per_forward_batched": rows * per_iter, "rounds": args.rounds, "threads": args.threads,
            "qps_best": best, "qps_median": med, "qps_all": res,
            "speedup_best": best["batched"] / best["one_at_a_time"],
            "speedup_median": med["batched"] / med["one_at_a_time"], **chunked,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_before": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}


def serve_filter(args) -> dict:
    """Label-only attack over HTTP against the smoke app (filter on, R_T alone)."""
    import shutil
    import socket
    import tempfile

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve as rserve

    import serve as raymia_serve
    from raymia.attacks.oracle import HTTPOracle
    from raymia.attacks.query import run_query_attack
    from raymia.data import load_bundle
    from raymia.evaluation import make_scorer
    from raymia.kinds import artifact_dir
    from raymia.models import freeze
    from raymia.progress import quiet
    from raymia.training import load_generator, train_artifact
    preset = args.serve_preset
    cfg = load_config(preset, [f"run.out_root={args.out_root}", "serve.model=target", "serve.use_filter=true",
                               f"serve.state_path={Path(args.out_root) / 'qa_filter_state.sqlite'}"] + args.serve_set)
    sp = Path(cfg.serve.state_path)
    if sp.exists():
        sp.unlink()
    bundle = load_bundle(cfg.data)
    for kind in ("target", "evaluator", "attacker_gan"):
        train_artifact(cfg, kind, bundle, quiet)
    F = freeze(load_generator(artifact_dir(cfg, "attacker_gan"), "cpu")[0])
    tmp = tempfile.mkdtemp(prefix="rmia", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, _temp_dir=tmp)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rserve.start(http_options={"host": "127.0.0.1", "port": port})
        rserve.run(raymia_serve.build_app(cfg, preset), name="raymia-qa", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        n = bundle.n_private
        if args.panel_seeds:
            from raymia.pipelines.threat_panel import rows_of
            targets, seeds = rows_of(cfg, bundle, args.restarts)
        else:
            targets = [t for r in range(args.restarts) for t in range(n)]
            seeds = [9000 + 31 * r + t for r in range(args.restarts) for t in range(n)]
        qa = cfg.query_attack
        label = args.serve_attack == "label"
        oracle = HTTPOracle(n, url=url, client_ids=[f"{args.serve_attack}-{i}" for i in range(len(targets))],
                            labels_only=label, threads=2)
        t0 = time.time()
        budget = args.budget or (qa.label_budget if label else qa.budget)
        res = run_query_attack(args.serve_attack, oracle, F, targets, seeds, budget, qa, cfg.attack.latent_bound,
                               chunk=0)
        wall = time.time() - t0
    finally:
        try:
            rserve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    scorer = make_scorer(cfg, bundle, "cpu")
    s = scorer.score(res.images, targets)
    extra = ({"found": res.extra["found"].tolist(), "radius": [round(float(r), 3) for r in res.extra["radius"]]}
             if label else {})
    return {"preset": preset, "attack": args.serve_attack, "serve_set": args.serve_set, "model": cfg.serve.model,
            "filter_kind": cfg.filter.kind,
            "filter": {k: getattr(cfg.filter, k) for k in ("n_b", "t_ssim", "t_hash", "l_sp")},
            "rows": len(targets), "targets": targets, "seeds": seeds, "budget": int(res.budgets[0]), "wall_s": wall,
            "answered": res.queries.tolist(), "blocked_at": res.blocked_at.tolist(),
            "blocked_rows": int(res.blocked.sum()), **extra,
            "mean_latency_ms": 1000 * float(np.sum(oracle.seconds) / max(1, int(oracle.sent.sum()))),
            **{k: float(np.mean(v)) for k, v in s.items() if k.endswith("top5")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="orl", help="whose networks (random weights): orl or smoke")
    p.add_argument("--rows", type=int, default=40, help="attack rows (orl: 20 targets x 2 restarts)")
    p.add_argument("--batched-iters", type=int, default=6)
    p.add_argument("--serial-iters", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunked", type=int, default=64, help="also measure forwards of at most this many images (0 = no)")
    p.add_argument("--serve-filter", action="store_true", help="label-only attack over HTTP vs the smoke app's filter")
    p.add_argument("--out-root", default="runs/bench/query_serve", help="--serve-filter: results root for the smoke artifacts")
    p.add_argument("--restarts", type=int, default=2, help="--serve-filter: rows per target")
    p.add_argument("--budget", type=int, default=0, help="--serve-filter: queries per row (0 = the attack's query_attack budget)")
    p.add_argument("--serve-preset", default="smoke", help="--serve-filter: the app's preset")
    p.add_argument("--serve-set", action="append", default=[], help="--serve-filter: config override key=value (last)")
    p.add_argument("--serve-attack", choices=("label", "nes"), default="label", help="--serve-filter: which attack")
    p.add_argument("--panel-seeds", action="store_true", help="--serve-filter: the threat panel's rows and seeds")
    p.add_argument("--out", default="runs/bench", help="folder of the JSON result")
    args = p.parse_args(argv)
    if args.chunked < 0 or args.chunked == 1 or args.rounds < 1 or args.threads < 1:
        p.error("--chunked must be 0 or >= 2, --rounds and --threads >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.serve_filter:
        try:
            r = serve_filter(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        default = args.serve_preset == "smoke" and args.serve_attack == "label" and not args.serve_set
        path = out / ("query_serve_filter.json" if default else f"query_serve_{args.serve_preset}_{args.serve_attack}.json")
    else:
        r = throughput(args)
        path = out / f"query_attacks-{args.preset}.json"
    path.write_text(json.dumps(r, indent=1))
    print(json.dumps({k: v for k, v in r.items() if k != "qps_all"}, indent=1))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
