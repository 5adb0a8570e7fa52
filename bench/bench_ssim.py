"""Similarity-filter benchmark: SSIM of one query against a 10-image buffer (the filter's
per-query work at N_B = 10), raymia's vectorised SSIM vs ``skimage.metrics.structural_similarity``
called once per buffered image, on ONE thread, in one run (so the numbers are ratios on
the same machine at the same moment), plus the agreement with skimage on random and real
image pairs, and the cost of a whole ``ClientFilterState.check``.

    python bench/bench_ssim.py                 # ~1 minute; updates docs/benchmarks.md
    python bench/bench_ssim.py --no-docs       # print only

Timing: each variant runs ``--reps`` rounds of ``--n`` calls, interleaved with the
others round by round; the reported time per call is the best round (as timeit does: on
a shared machine the other rounds measure the neighbours' load), the median round is
shown beside it.  Writes ``<out>/ssim.json`` and replaces the ``## Similarity filter``
section of docs/benchmarks.md.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # one thread, before numpy loads
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from raymia.defenses.filter import ClientFilterState, FilterParams, SSIMStack, ssim_batch  # noqa: E402

BEGIN, END = "<!-- bench_ssim:begin -->", "<!-- bench_ssim:end -->"


def real_images(size: int) -> np.ndarray:
    """MNIST-5k digits and ORL faces resized to size x size (float64 in [0, 1])."""
    from raymia.data import load_mnist5k, load_orl, to_tensor
    x, _ = load_mnist5k()
    o, _, _ = load_orl()
    a = to_tensor(x[:40], size, 255.0)[:, 0].double().numpy()
    b = to_tensor(o[:40], size, 255.0)[:, 0].double().numpy()
    return np.concatenate([a, b])


def agreement(size: int, rng) -> dict:
    from skimage.metrics import structural_similarity as sk
    errs = {}
    q = rng.random((size, size))
    cases = {"random": (q, rng.random((10, size, size))),
             "near-identical": (q, np.clip(q + rng.normal(0, 1e-3, (10, size, size)), 0, 1))}
    r = real_images(size)
    cases["real digits"] = (r[0], r[1:40])
    cases["real faces"] = (r[40], r[41:80])
    for name, (qq, bb) in cases.items():
        ref = np.array([sk(qq, b, data_range=1.0) for b in bb])
        errs[name] = float(np.abs(ssim_batch(qq, bb, data_range=1.0) - ref).max())
    return errs


def timings(size: int, n: int, reps: int, rng) -> dict:
    from skimage.metrics import structural_similarity as sk
    q = rng.random((size, size))
    buf = rng.random((10, size, size))
    stack = SSIMStack.from_images(buf, data_range=1.0)
    near = np.clip(buf[0] + rng.normal(0, 1e-4, (size, size)), 0, 1).astype(np.float32)
    # every buffered image passes the hash test and is compared by SSIM; never blocks.  The
    # buffer fills with copies of the query, which does not change the work per check.
    p = FilterParams(n_b=10, t_ssim=0.999, t_hash=1.0, l_sp=10 ** 9)
    st = ClientFilterState(p)
    for b in buf:
        st.check(b.astype(np.float32))
    variants = {
        "skimage (10 calls)": lambda: [sk(q, b, data_range=1.0) for b in buf],
        "ssim_batch, raw buffer": lambda: ssim_batch(q, buf, data_range=1.0),
        "ssim_batch, prepared SSIMStack": lambda: ssim_batch(q, stack, data_range=1.0),
        "ClientFilterState.check (validate, hash, SSIM x10, enqueue)": lambda: st.check(near),
    }
    for f in variants.values():
        f()
    rounds = {k: [] for k in variants}
    for _ in range(reps):
        for k, f in variants.items():
            m = max(1, n // 10) if k.startswith("skimage") else n
            t = time.perf_counter()
            for _ in range(m):
                f()
            rounds[k].append((time.perf_counter() - t) / m)
    out = {k: {"best_us": float(np.min(v) * 1e6), "median_us": float(np.median(v) * 1e6)} for k, v in rounds.items()}
    base = out["skimage (10 calls)"]
    for k in out:
        out[k]["speedup_vs_skimage"] = base["best_us"] / out[k]["best_us"]
        out[k]["speedup_median"] = base["median_us"] / out[k]["median_us"]
    return out


def render(res: dict, cmd: str) -> str:
    lines = [BEGIN, "", f"Command: `{cmd}` (one thread; {res['machine']}; numpy {res['numpy']}, "
             f"scikit-image {res['skimage']}; {res['date']}; load average {res['load_before']:.1f} before the "
             f"run, {res['load_after']:.1f} after -- other jobs shared the cores, hence best-of-rounds).", "",
             "Query against a 10-image buffer (the filter's work per query at N_B = 10); best of "
             f"{res['reps']} interleaved rounds of {res['n']} calls (median round in brackets):", "",
             "| image | variant | µs per query | speed-up vs skimage |", "|---|---|---|---|"]
    for size, t in res["timings"].items():
        for k, v in t.items():
            lines.append(f"| {size}x{size} | {k} | {v['best_us']:.0f} ({v['median_us']:.0f}) | "
                         f"{v['speedup_vs_skimage']:.1f}× ({v['speedup_median']:.1f}×) |")
    lines += ["", "Largest |ours − skimage| (data_range 1, skimage defaults: 7x7 uniform window, sample "
              "covariance, K1 0.01, K2 0.03):", "", "| image | " + " | ".join(next(iter(res["agreement"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(res["agreement"].values())))]
    for size, e in res["agreement"].items():
        lines.append(f"| {size}x{size} | " + " | ".join(f"{v:.1e}" for v in e.values()) + " |")
    lines += ["", END]
    return "\n".join(lines)


def update_docs(path: Path, block: str) -> None:
    from docs_section import update_section      # bench/ is the script's folder: on sys.path
    update_section(path, "## Similarity filter: SSIM per query (bench/bench_ssim.py)", BEGIN, END, block)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="28,32,64")
    ap.add_argument("--n", type=int, default=100, help="calls per round (skimage: n/10)")
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    import skimage
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "numpy": np.__version__, "skimage": skimage.__version__, "date": time.strftime("%Y-%m-%d"),
           "reps": args.reps, "n": args.n, "timings": {}, "agreement": {}, "load_before": os.getloadavg()[0]}
    for s in sizes:
        res["agreement"][s] = agreement(s, rng)
        res["timings"][s] = timings(s, args.n, args.reps, rng)
        for k, v in res["timings"][s].items():
            print(f"{s}x{s}  {k:60s} {v['best_us']:8.0f} us (median {v['median_us']:.0f})  "
                  f"{v['speedup_vs_skimage']:5.1f}x (median {v['speedup_median']:.1f}x)")
        print(f"{s}x{s}  max |ours - skimage|: " + ", ".join(f"{k} {v:.1e}" for k, v in res["agreement"][s].items()))
    res["load_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ssim.json").write_text(json.dumps(res, indent=2))
    cmd = "python bench/bench_ssim.py" + (f" --sizes {args.sizes}" if args.sizes != "28,32,64" else "")
    if not args.no_docs:
        update_docs(Path(args.docs), render(res, cmd))
        print(f"updated {args.docs}")


if __name__ == "__main__":
    main()
