"""Serve benchmark: latency (p50/p99) and throughput (requests/s) over real HTTP of

* ``bare``     -- R_T alone, no filter (serve.model=target, serve.use_filter=false),
* ``combined`` -- the combined model R' alone, no filter,
* ``defended`` -- R' behind the per-client similarity filter (the app as shipped: each
  replica holds the filter-state store itself, ``serve.state_in: replica``),
* ``defended_actors`` -- the same with the state in ``serve.shards`` filter-state actors
  (``serve.state_in: actors``: one actor round trip per query or batch of queries),

and, with ``--variants`` naming them,

* ``robust``   -- R' behind the robust detector (``filter.kind: robust``, the calibrated
  defaults of ``robust_filter``; the check runs beside the forward pass),
* ``robust_feature`` -- the same with the feature rule on (``robust_filter.feat_k`` 6,
  ``feat_sim`` 0.95, the orl calibration of docs/filter.md): the replica sends R_T's
  embedding with the check, so the check waits for the forward pass,

all deployed side by side in ONE Ray/Serve instance (one route prefix each) and
measured in interleaved rounds, so the reported ratios compare like with like on this
machine.  Each phase: ``--seq`` sequential requests (latency at concurrency 1), then
``--seconds`` of ``--concurrency`` keep-alive client threads (throughput, and latency
under load).  Requests are PNG faces of the preset's private set, each with fresh
uniform noise (+-``--jitter``), one client id per thread: every client sends distinct
images, like regular users, so the filter's buffers fill up and every check compares
against N_B buffered images, but nobody is blocked (any 403 is counted and reported).
``--session N`` gives every client a fresh id after N requests (a benign session of N
photos): the robust detector blocks a client that re-sends the same faces for hundreds of
queries, as it should, so its variants are measured with sessions (e.g. 20).

    python bench/bench_serve.py                     # orl preset (run `make demo` first)
    python bench/bench_serve.py --preset smoke --set run.out_root=/tmp/x   # needs its artifacts
    python bench/bench_serve.py --variants bare,combined,defended,robust,robust_feature --session 20

Writes ``<out>/serve.json`` and ``<out>/serve.md`` (default out: runs/bench).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from raymia import cli  # noqa: E402
from raymia.artifacts import write_run_record  # noqa: E402
from raymia.config import add_cli_args, config_from_dict  # noqa: E402
from raymia.data import load_bundle  # noqa: E402
from raymia.runtime import resolve_out_root  # noqa: E402
from raymia.report import markdown_table  # noqa: E402
from raymia.serving.client import encode_png  # noqa: E402

_DEFENDED = {"serve": {"model": "combined", "use_filter": True, "state_in": "replica"}}
VARIANTS = {  # name -> {config section: {field: value}}
    "bare": {"serve": {"model": "target", "use_filter": False}},
    "combined": {"serve": {"model": "combined", "use_filter": False}},
    "defended": _DEFENDED,
    "defended_actors": {"serve": {"model": "combined", "use_filter": True, "state_in": "actors"}},
    "robust": {**_DEFENDED, "filter": {"kind": "robust"}},
    "robust_feature": {**_DEFENDED, "filter": {"kind": "robust"}, "robust_filter": {"feat_k": 6, "feat_sim": 0.95}},
}
DEFAULT_VARIANTS = "bare,combined,defended,defended_actors"
# (x, y, label): x against y, reported when both were measured
PAIRS = [("defended", "bare", "defended (R' + filter) vs bare R_T"),
         ("defended", "combined", "defended vs R' alone (the filter's cost)"),
         ("combined", "bare", "R' alone vs bare R_T (the dummy-model defense's cost)"),
         ("defended_actors", "bare", "defended with the state in shard actors vs bare R_T"),
         ("defended", "defended_actors", "state in the replica vs in shard actors"),
         ("robust", "combined", "R' + robust vs R' alone (the robust detector's cost)"),
         ("robust", "defended", "robust vs raha (Algorithm 2), both in the replica"),
         ("robust_feature", "robust", "robust + feature rule vs robust (the rule's cost: the check waits for the forward)"),
         ("robust_feature", "bare", "R' + robust + feature rule vs bare R_T")]


def request_bodies(cfg, n: int, jitter: float, seed: int) -> list[bytes]:
    bundle = load_bundle(cfg.data)
    faces = np.concatenate([bundle.private_train.x.numpy(), bundle.private_test.x.numpy()])
    rng = np.random.default_rng(seed)
    # shuffled: the private set is ordered by identity, and a session of consecutive photos of
    # one person is what the robust detector's rules are meant to notice (its false positives
    # on benign sessions are measured by the red team, not here)
    faces = faces[rng.permutation(len(faces))]
    out = []
    for i in range(n):
        img = faces[i % len(faces)] + rng.uniform(-jitter, jitter, faces.shape[1:]).astype(np.float32)
        out.append(encode_png(np.clip(img, 0.0, 1.0)))
    return out


class Load:
    """Keep-alive HTTP clients against one route prefix."""

    def __init__(self, port: int, prefix: str, bodies: list[bytes], session: int = 0):
        self.port, self.prefix, self.bodies, self.session = port, prefix, bodies, int(session)
        self.next = 0
        self.lock = threading.Lock()

    def body(self) -> bytes:
        with self.lock:
            self.next += 1
            return self.bodies[self.next % len(self.bodies)]

    def one(self, conn: http.client.HTTPConnection, client_id: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        conn.request("POST", f"{self.prefix}/predict", body=self.body(),
                     headers={"Content-Type": "image/png", "X-Client-Id": client_id})
        r = conn.getresponse()
        r.read()
        return time.perf_counter() - t0, r.status

    def client(self, base: str, i: int) -> str:
        """The id of a client's i-th request (a fresh id every ``session`` requests)."""
        return f"{base}-s{i // self.session}" if self.session else base

    def sequential(self, n: int, client_id: str) -> tuple[list, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        lat, codes = [], {}
        for i in range(n):
            dt, st = self.one(conn, self.client(client_id, i))
            lat.append(dt)
            codes[st] = codes.get(st, 0) + 1
        conn.close()
        return lat, codes

    def concurrent(self, threads: int, seconds: float, tag: str) -> tuple[list, dict, float]:
        lat, codes, stop = [], {}, time.perf_counter() + seconds
        lock = threading.Lock()

        def worker(k: int):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            mine, mc = [], {}
            while time.perf_counter() < stop:
                dt, st = self.one(conn, self.client(f"{tag}-{k}", len(mine)))
                mine.append(dt)
                mc[st] = mc.get(st, 0) + 1
            conn.close()
            with lock:
                lat.extend(mine)
                for s, c in mc.items():
                    codes[s] = codes.get(s, 0) + c

        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return lat, codes, time.perf_counter() - t0


def filter_cost(cfg, bodies: list[bytes], out: Path, n: int = 1500) -> dict:
    """In-process cost of the filter's state update (Algorithm 2 + SQLite), ms per query:
    one query per transaction, and batches of 8 (group commit), 8 clients with full buffers."""
    import uuid
    from raymia.serving.http import InputSpec, parse_predict
    from raymia.serving.plan import filter_params
    from raymia.serving.store import FilterStateStore
    shape = load_bundle(cfg.data).private_train.x.shape[1:]
    spec = InputSpec(shape[0], shape[1], shape[2], 2, 1)
    imgs = [parse_predict("image/png", b, spec)[0] for b in bodies]
    path = out / "filter_cost.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    st = FilterStateStore(path, filter_params(cfg))
    items = [(f"c{i % 8}", imgs[i % len(imgs)], uuid.uuid4().hex) for i in range(2 * n + 200)]
    for it in items[:200]:
        st.check(*it)
    single = []
    for it in items[200:200 + n]:
        t0 = time.perf_counter()
        st.check(*it)
        single.append(time.perf_counter() - t0)
    rest = items[200 + n:]
    t0 = time.perf_counter()
    for k in range(0, len(rest), 8):
        st.check_many(rest[k:k + 8])
    batched = (time.perf_counter() - t0) / len(rest)
    st.close()
    return {"check_p50_ms": pct(single, 50), "check_mean_ms": float(np.mean(single) * 1000),
            "check_p99_ms": pct(single, 99), "check_many8_mean_ms_per_query": batched * 1000}


class ServerCPU:
    """CPU seconds used by this benchmark's Ray instance (GCS, raylet and every worker
    process it started: Serve proxy and controller, replicas, filter actors), read from
    /proc: a measure of what each request costs the server that other load on the
    machine does not change (the idle rate of all these processes is subtracted)."""

    def __init__(self, ray):
        node = ray._private.worker._global_node
        self.roots = [p.process.pid for k in ("gcs_server", "raylet") for p in node.all_processes.get(k, [])]
        self.raylet = node.all_processes["raylet"][0].process.pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _pids(self) -> list:
        kids = []
        for st in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(st.read_text().rsplit(")", 1)[1].split()[1]) == self.raylet:
                    kids.append(int(st.parent.name))
            except (OSError, ValueError, IndexError):
                pass
        return self.roots + kids

    GROUPS = (("ray::ProxyActor", "proxy"), ("ray::ServeReplica", "replica"), ("ray::FilterShard", "filter actors"),
              ("raylet", "raylet+gcs"), ("gcs_server", "raylet+gcs"))

    def by_group(self) -> dict:
        """CPU seconds so far per process group (proxy, replicas, filter actors, raylet+gcs, other)."""
        out: dict = {}
        for pid in self._pids():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            group = next((g for prefix, g in self.GROUPS if prefix in cmd), "other")
            out[group] = out.get(group, 0.0) + (int(f[11]) + int(f[12])) / self.tick
        return out

    def seconds(self) -> float:
        return sum(self.by_group().values())


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the deployments")
    p.add_argument("--seq", type=int, default=150, help="sequential requests per phase (latency)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each throughput phase")
    p.add_argument("--concurrency", type=int, default=8, help="client threads in the throughput phase")
    p.add_argument("--jitter", type=float, default=0.05, help="uniform noise added to each request image")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--session", type=int, default=0, help="requests per client id (0 = one id per client thread)")
    p.add_argument("--out", default=None, help="output directory (default runs/bench)")
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names or args.session < 0:
        p.error(f"unknown variant(s) {', '.join(bad)} (choose from {', '.join(VARIANTS)})" if bad or not names
                else "--session must be >= 0")
    cfg = cli.config_from_args(args)
    resolve_out_root(cfg)                      # makes run.out_root absolute
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve as rserve
    sys.path.insert(0, str(ROOT))
    from serve import build_app

    state_file = out / "serve_bench_state.sqlite"
    for old in out.glob("serve_bench_state*.sqlite*"):
        old.unlink()
    apps = {}
    for name in names:
        c = config_from_dict(cfg.to_dict())
        for section, fields in VARIANTS[name].items():
            for k, v in fields.items():
                setattr(getattr(c, section), k, v)
        c.serve.state_path = str(state_file.with_name(f"{state_file.stem}-{name}.sqlite"))
        apps[name] = build_app(c, args.preset)          # fails fast (one message) without artifacts
    bodies = request_bodies(cfg, 600, args.jitter, cfg.run.seed)

    fcost = filter_cost(cfg, bodies, out)
    print(f"[bench_serve] filter state update in-process: {json.dumps({k: round(v, 3) for k, v in fcost.items()})}",
          flush=True)
    cpus = max(os.cpu_count() or 1, math.ceil(len(apps) * cfg.serve.replica_cpus) + 1)   # every replica fits
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             object_store_memory=256 * 1024 * 1024, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rserve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, app in apps.items():
        rserve.run(app, name=name, route_prefix=f"/{name}")
    loads = {n: Load(port, f"/{n}", bodies, args.session) for n in apps}
    for n, ld in loads.items():                          # warm-up: actors started, buffers full
        ld.sequential(30, "warmup")
        ld.concurrent(args.concurrency, 2.0, f"warm-{n}")

    server = ServerCPU(ray)
    c0, t0 = server.seconds(), time.perf_counter()
    time.sleep(5.0)                                      # idle CPU of all the processes, subtracted below
    idle_rate = (server.seconds() - c0) / (time.perf_counter() - t0)
    print(f"[bench_serve] idle server CPU {idle_rate:.3f} cores", flush=True)
    acc = {n: {"seq": [], "load": [], "codes": {}, "n": 0, "t": 0.0, "cpu": 0.0, "p50": [], "tput": []} for n in apps}
    for r in range(args.rounds):
        order = list(apps) if r % 2 == 0 else list(reversed(list(apps)))
        for n in order:
            lat, codes = loads[n].sequential(args.seq, f"seq-{n}-r{r}")
            g0 = server.by_group()
            llat, lcodes, dt = loads[n].concurrent(args.concurrency, args.seconds, f"load-{n}-r{r}")
            g1 = server.by_group()
            a = acc[n]
            a["cpu"] += sum(g1.values()) - sum(g0.values()) - idle_rate * dt
            for g in g1:
                a.setdefault("groups", {})[g] = a.get("groups", {}).get(g, 0.0) + g1[g] - g0.get(g, 0.0)
            a["seq"] += lat
            a["load"] += llat
            a["n"] += len(llat)
            a["t"] += dt
            a["p50"].append(pct(lat, 50))
            a["tput"].append(len(llat) / dt)
            for cd in (codes, lcodes):
                for k, v in cd.items():
                    a["codes"][k] = a["codes"].get(k, 0) + v
            print(f"[bench_serve] round {r + 1}/{args.rounds} {n:15s} p50 {pct(lat, 50):6.2f} ms  "
                  f"throughput {len(llat) / dt:6.1f} req/s", flush=True)
    rserve.shutdown()
    ray.shutdown()
    for scratch in list(out.glob("serve_bench_state*.sqlite*")) + list(out.glob("filter_cost.sqlite*")):
        scratch.unlink()

    rows = []
    for n, a in acc.items():
        rows.append({"deployment": n, "p50_ms": pct(a["seq"], 50), "p99_ms": pct(a["seq"], 99),
                     "req_per_s": a["n"] / a["t"], "p50_load_ms": pct(a["load"], 50),
                     "p99_load_ms": pct(a["load"], 99), "server_cpu_ms_per_req": 1000 * a["cpu"] / a["n"],
                     "requests": len(a["seq"]) + a["n"],
                     "non_200": sum(v for k, v in a["codes"].items() if k != 200),
                     "status_codes": " ".join(f"{k}:{v}" for k, v in sorted(a["codes"].items())),
                     "cpu_ms_per_req_by_process": " ".join(f"{g}:{1000 * c / a['n']:.2f}"
                                                           for g, c in sorted(a.get("groups", {}).items()))})
    by = {r["deployment"]: r for r in rows}

    def paired(x: str, y: str) -> dict:
        """x against y: pooled numbers, the median over rounds of the per-round difference /
        ratio (each round measures both back to back), and the ratio of server CPU per request."""
        ax, ay = acc[x], acc[y]
        return {"added_p50_ms": by[x]["p50_ms"] - by[y]["p50_ms"],
                "added_p50_ms_median_of_rounds": float(np.median(np.subtract(ax["p50"], ay["p50"]))),
                "throughput_ratio": by[x]["req_per_s"] / by[y]["req_per_s"],
                "throughput_ratio_median_of_rounds": float(np.median(np.divide(ax["tput"], ay["tput"]))),
                "cpu_ratio": by[y]["server_cpu_ms_per_req"] / by[x]["server_cpu_ms_per_req"]}

    summary = {f"{x}_vs_{y}": paired(x, y) for x, y, _ in PAIRS if x in acc and y in acc}
    summary["goal"] = "defense adds <= 2 ms at p50 and keeps >= 80% of bare throughput"
    g = summary.get("defended_vs_bare")
    summary["goal_met"] = None if g is None else (g["added_p50_ms"] <= 2.0 and g["throughput_ratio"] >= 0.8)
    fp = cfg.filter
    meta = {"preset": args.preset, "variants": names, "session": args.session, "rounds": args.rounds, "idle_server_cpu_cores": idle_rate, "seq": args.seq, "seconds": args.seconds,
            "concurrency": args.concurrency, "jitter": args.jitter, "cpus": os.cpu_count(),
            "load_avg_1min_at_end": os.getloadavg()[0],
            "filter": {"n_b": fp.n_b, "t_ssim": fp.t_ssim, "t_hash": fp.t_hash, "l_sp": fp.l_sp},
            "robust_variants": {n: {k: v for sec in ("filter", "robust_filter") for k, v in VARIANTS[n].get(sec, {}).items()}
                                for n in names if n.startswith("robust")},
            "serve": {k: getattr(cfg.serve, k) for k in ("state_in", "shards", "batch_size", "batch_wait_ms", "replicas",
                                                          "replica_cpus", "torch_threads", "fold_bn")},
            "image_shape": list(load_bundle(cfg.data).private_train.x.shape[1:])}
    (out / "serve.json").write_text(json.dumps({"rows": rows, "summary": summary, "filter_in_process": fcost,
                                                "meta": meta}, indent=2))
    write_run_record(out / "serve_run", cfg, {"bench": "serve", **meta})
    import pandas as pd
    lines = [markdown_table(pd.DataFrame(rows).round(2)), ""]
    for x, y, label in PAIRS:
        v = summary.get(f"{x}_vs_{y}")
        if v is None:
            continue
        lines.append(f"- {label}: {v['added_p50_ms']:+.2f} ms at p50 (median of rounds {v['added_p50_ms_median_of_rounds']:+.2f}), "
                     f"throughput x{v['throughput_ratio']:.2f} (median of rounds x{v['throughput_ratio_median_of_rounds']:.2f}), "
                     f"server CPU per request x{1 / v['cpu_ratio']:.2f}")
    goal = {None: "not measured (needs bare and defended)", True: "met", False: "NOT met"}[summary["goal_met"]]
    lines += ["", f"Goal (defense <= 2 ms at p50, >= 80% of bare throughput): {goal}. "
              f"Filter state update in-process (Algorithm 2 + SQLite, N_B={fp.n_b}, full buffers): "
              f"p50 {fcost['check_p50_ms']:.3f} ms, mean {fcost['check_mean_ms']:.3f} ms per query; "
              f"{fcost['check_many8_mean_ms_per_query']:.3f} ms per query in batches of 8. "
              f"Load average at the end: {meta['load_avg_1min_at_end']:.1f} on {meta['cpus']} CPUs."]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[bench_serve] outputs: {out / 'serve.json'}, {out / 'serve.md'}")


if __name__ == "__main__":
    cli.run_main(main)
