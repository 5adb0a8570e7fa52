"""Per-query cost of the two detectors, in one run on ONE thread: Algorithm 2's check
(``raha``, N_B = 10 buffered images) and the robust detector's check with 10 000
remembered fingerprints (25 shifted variants of the query against all of them), plus the
cross-client window's check at its default size, on real 32x32 ORL faces.

    python bench/bench_filters.py              # ~30 s; updates docs/benchmarks.md
    python bench/bench_filters.py --no-docs    # print only

Each variant runs ``--reps`` rounds of ``--n`` checks, interleaved round by round; the time
per check is the best round (the median round beside it).  The states are copied before
each round so every check sees the same full memory."""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # one thread, before numpy loads
    os.environ[_v] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench_filters:begin -->", "<!-- bench_filters:end -->"


def main():
    import torch
    torch.set_num_threads(1)
    from raymia.config import load_config
    from raymia.data import load_bundle
    from raymia.defenses.filter import ClientFilterState, FilterParams
    from raymia.defenses.filter.robust import CrossClientWindow, RobustClientState, RobustParams
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=10000)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    b = load_bundle(load_config("orl").data)
    faces = np.concatenate([b.aux.x.numpy(), b.eval_train.x.numpy(), b.eval_test.x.numpy()])
    rng = np.random.default_rng(0)
    queries = [np.clip(faces[i] + rng.normal(0, 0.02, faces[i].shape), 0, 1).astype(np.float32)
               for i in rng.choice(len(faces), args.n)]
    raha = ClientFilterState(FilterParams())
    for i in range(10):
        raha.check(faces[i])
    rp = RobustParams(memory=args.memory, l_sp=10 ** 9)
    robust = RobustClientState(rp)
    fill = rng.integers(0, 2 ** 63, (args.memory, rp.words), dtype=np.int64).astype(np.uint64)
    robust._mem[:] = fill.T                     # a full memory: 10 000 remembered fingerprints (column-major)
    robust._n, robust._shape = args.memory, faces[0].shape
    # the feature rule on top (calibrated orl setting), its memory full of 512 unit embeddings
    # of R_T's width; the embedding itself comes out of the model's forward pass (not timed here)
    fp_ = RobustParams(memory=args.memory, l_sp=10 ** 9, feat_k=6, feat_sim=0.95)
    dim = load_config("orl").target.embed_dim
    featured = RobustClientState(fp_)
    featured._mem[:], featured._n, featured._shape = fill.T, args.memory, faces[0].shape
    for f in rng.normal(size=(fp_.feat_memory, dim)):
        featured._remember_feature((f / np.linalg.norm(f)).astype(np.float32))
    feats = rng.normal(size=(args.n, dim)).astype(np.float32)
    cross = CrossClientWindow(rp)
    for i in range(cross.size):
        cross.check(f"c{i % 500}", faces[i % len(faces)])
    variants = {"raha (Alg. 2, N_B = 10)": raha, f"robust ({args.memory} remembered)": robust,
                f"robust + feature rule ({args.memory} fingerprints, {fp_.feat_memory} embeddings)": featured,
                f"cross-client window ({cross.size})": cross}
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, st in variants.items():
            s = copy.deepcopy(st)
            t0 = time.perf_counter()
            for j, q in enumerate(queries):
                if isinstance(s, CrossClientWindow):
                    s.check("bench", q)
                elif getattr(s.params, "feat_k", 0):
                    s.check(q, feature=feats[j])
                else:
                    s.check(q)
            times[name].append((time.perf_counter() - t0) / len(queries))
    res = {k: {"best_ms": 1e3 * min(v), "median_ms": 1e3 * float(np.median(v))} for k, v in times.items()}
    base = res["raha (Alg. 2, N_B = 10)"]["best_ms"]
    cmd = "python bench/bench_filters.py"
    lines = [BEGIN, "", f"`{cmd}` ({platform.processor() or platform.machine()}, one thread, "
             f"{time.strftime('%Y-%m-%d')}; {args.reps} rounds of {args.n} checks of noisy real 32x32 faces):", "",
             "| check | ms per query (best round) | median round | vs raha |", "|---|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v['best_ms']:.3f} | {v['median_ms']:.3f} | {v['best_ms'] / base:.1f}x |")
    lines += ["", END]
    block = "\n".join(lines)
    print(block)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "filters.json").write_text(json.dumps(res, indent=2))
    if not args.no_docs:
        from docs_section import update_section
        update_section(Path(args.docs), "## Filters: per-query cost of raha and robust (bench/bench_filters.py)",
                       BEGIN, END, block)


if __name__ == "__main__":
    main()
