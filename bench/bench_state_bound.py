"""Many distinct client ids through the filter-state store with the app's cache bounds:
the acceptance measure of bounded state.  Each of ``--clients`` new ids sends one 8-bit
32x32 query (as a Sybil attacker with fresh ids would); first some clients are blocked,
and after the flood they must still be blocked (their states were evicted long ago and
are read back from the store).  Reports the cache's peak bytes and entries against the
configured bounds (``serve.cache_clients``, ``serve.cache_mb``), the process's RSS growth,
the store's disk footprint per client and the time.

    python bench/bench_state_bound.py                                  # 100 000 ids, SQLite, orl preset bounds
    python bench/bench_state_bound.py --url postgresql://...           # the same against PostgreSQL
    python bench/bench_state_bound.py --clients 20000 --set serve.cache_mb=16
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raymia import cli  # noqa: E402
from raymia.config import add_cli_args  # noqa: E402


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(p)
    p.add_argument("--clients", type=int, default=100_000, help="distinct client ids, one query each")
    p.add_argument("--blocked", type=int, default=10, help="clients blocked before the flood")
    p.add_argument("--batch", type=int, default=50, help="queries per store transaction (as the router batches)")
    p.add_argument("--url", default=None, help="postgresql://... (default: a SQLite file in a temporary folder)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    from raymia.serving.plan import filter_params
    from raymia.serving.store import FilterStateStore
    s = cfg.serve
    params = filter_params(cfg)
    bound_bytes = int(s.cache_mb * (1 << 20))
    tmp = tempfile.TemporaryDirectory()
    where = args.url or str(Path(tmp.name) / "state.sqlite")
    store = FilterStateStore(where, params, cache_clients=s.cache_clients, cache_bytes=bound_bytes,
                             client_ttl_s=s.client_ttl_s)
    rng = np.random.default_rng(cfg.run.seed)
    shape = (1, 32, 32)
    rss0 = rss_mib()
    for k in range(args.blocked):
        face = rng.random(shape).astype(np.float32)
        v = None
        for _ in range(64):
            v = store.check(f"bad-{k}", face)
            if v["blocked"]:
                break
        if not v["blocked"]:
            print(f"error: bad-{k} was not blocked by 64 identical queries", file=sys.stderr)
            raise SystemExit(2)
    t0, peak, peak_n, n = time.perf_counter(), 0, 0, 0
    while n < args.clients:
        m = min(args.batch, args.clients - n)
        batch = [(f"user-{n + j}", (rng.integers(0, 256, shape) / 255.0).astype(np.float32), None) for j in range(m)]
        store.check_many(batch)
        n += m
        peak, peak_n = max(peak, store.cache_used), max(peak_n, len(store.cache))
    took = time.perf_counter() - t0
    rss1 = rss_mib()
    still = sum(bool(store.check(f"bad-{k}", rng.random(shape).astype(np.float32))["blocked"])
                for k in range(args.blocked))
    info = store.cache_info()
    fp = store.footprint(checkpoint=True)
    store.close()
    print(f"{store.db.kind}: {n} distinct client ids, one query each, in {took:.1f} s "
          f"({n / took:.0f} ids/s); cache peak {peak / 2**20:.1f} MiB of the {s.cache_mb:g} MiB bound, "
          f"{peak_n} states of the {s.cache_clients} bound, {info.get('evicted', 0)} evicted; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MiB; store {fp['bytes'] / 2**20:.1f} MiB = "
          f"{fp['bytes'] / max(1, fp['clients']) / 1024:.2f} KiB per client; "
          f"blocked before the flood and still blocked after it: {still} of {args.blocked}")
    if peak > bound_bytes or peak_n > s.cache_clients or still != args.blocked:
        raise SystemExit(2)


if __name__ == "__main__":
    cli.run_main(main)
