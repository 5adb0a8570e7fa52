"""Attack-engine benchmark: trial-iterations per second of the generator MIA (one Adam
step on the latent of one (target, restart, alpha) row), on whatever device is present,
all in ONE run so the numbers are ratios on the same machine:

* the one-row-at-a-time loop (``generator_mia`` called once per row),
* the batched engine (one call for B rows, fp32 reference path),
* on CUDA, the fast path (bf16 autocast, channels_last, BatchNorm folded, torch.compile)
  at several batch sizes, with its success decisions checked against an fp32 run,

for (a) the ``orl`` preset's models and (b) the paper's scale (``vggface2`` preset:
64x64 RGB, ResNet-18 R_T and R_dmy with 2141 classes, DCGAN generator with latent 100 and
ngf 64), all with random weights.  It also measures the device's matmul rate (the
"peak" the achieved GFLOP/s is compared with), FLOPs per trial-iteration
(torch.utils.flop_counter on one real step), peak GPU memory, the projected time of the
paper's full sweep (101 alphas x 27 targets x 3 restarts x 1500 iterations), and a
multi-GPU projection (see ``project_cluster``).

    python bench/bench_attack.py                      # CPU defaults: a few minutes
    python bench/bench_attack.py --profile gpu        # CUDA: loop, fp32, fast paths, check
    python bench/bench_attack.py --render runs/bench/attack-cuda.json   # markdown only

Steady-state rate = rows x (n2 - n1) / (T(n2) - T(n1)) from two calls with n1 and n2
iterations (wall clock around the whole call); the intercept is the per-call overhead
(latent init, final fp32 scoring, copies), which the cluster projection uses.  The
first call of each configuration is a warm-up (cuDNN autotuning, torch.compile) and is
reported separately.  Writes ``<out>/attack-<device>.json`` (rewritten after every
measurement, so a killed run keeps what it measured), the run record, and appends a
markdown table to ``<out>/attack.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# the device machine runs this from a copy of the tree where raymia is not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from raymia.attacks.generator_mia import FastPath, check_fast_path, generator_mia  # noqa: E402
from raymia.config import load_config  # noqa: E402
from raymia.defenses.dummy import CombinedModel  # noqa: E402
from raymia.models import build_classifier, build_generator, freeze  # noqa: E402
from raymia.paper import PAPER_SWEEP  # noqa: E402
from raymia.runtime import pick_device  # noqa: E402

#: scale -> (preset, image channels)
SCALES = {"orl": ("orl", 1), "paper": ("vggface2", 3)}

#: named fast-path configurations
FAST = {
    "fp32": FastPath(),
    "bf16+cl": FastPath(precision="bf16", channels_last=True),
    "bf16+cl+fold": FastPath(precision="bf16", channels_last=True, fold_bn=True),
    "bf16+cl+fold+compile": FastPath(precision="bf16", channels_last=True, fold_bn=True, compile="default"),
    "bf16+cl+fold+compile-ma": FastPath(precision="bf16", channels_last=True, fold_bn=True,
                                        compile="max-autotune-no-cudagraphs"),
    "bf16+cl+fold+pad": FastPath(precision="bf16", channels_last=True, fold_bn=True, pad_channels=True),
    "bf16+cl+fold+pad+compile": FastPath(precision="bf16", channels_last=True, fold_bn=True, pad_channels=True,
                                         compile="default"),
    "bf16+cl+fold+pad+compile-ro": FastPath(precision="bf16", channels_last=True, fold_bn=True, pad_channels=True,
                                            compile="reduce-overhead"),
    "bf16+cl+fold+pad+compile-ma": FastPath(precision="bf16", channels_last=True, fold_bn=True, pad_channels=True,
                                            compile="max-autotune-no-cudagraphs"),
}

PROFILES = {
    # loop rows x iters; batch sizes of the fp32 path; fast configs x batch sizes (CUDA only);
    # n1/n2 iterations of the two timed calls; rows x iters of the fast-vs-fp32 check
    "cpu": {"loop_rows": 4, "loop_iters": 6, "ref_batches": {"orl": [64], "paper": [16]},
            "fast": {}, "n1": 2, "n2": 6, "check_rows": 16, "check_iters": 20, "check_fast": "bf16+cl+fold"},
    "gpu": {"loop_rows": 3, "loop_iters": 30, "ref_batches": {"orl": [4096], "paper": [4096]},
            "fast": {"paper": [("bf16+cl", [4096]), ("bf16+cl+fold", [4096]), ("bf16+cl+fold+pad", [4096]),
                               ("bf16+cl+fold+compile", [4096]), ("bf16+cl+fold+pad+compile", [2048, 4096, 8192]),
                               ("bf16+cl+fold+pad+compile-ro", [256, 2048]),
                               ("bf16+cl+fold+pad+compile-ma", [4096])],
                     "orl": [("bf16+cl+fold+pad", [4096]), ("bf16+cl+fold+pad+compile", [4096])]},
            "n1": 5, "n2": 25, "check_rows": 4096, "check_iters": 200, "check_fast": "bf16+cl+fold+pad+compile"},
}


# ----------------------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random running statistics and affine parameters, so that folding has work to do."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_((torch.rand(n, generator=gen) - 0.5) * 0.2)
    return model


def build_scale(scale: str, device: torch.device, seed: int = 0) -> dict:
    """Random-weight R_T, R_dmy (same architecture), attacker generator F and evaluator
    R_E of a preset, built from its config."""
    preset, ch = SCALES[scale]
    cfg = load_config(preset)
    size = cfg.data.image_size
    n_private = cfg.data.private_ids
    n_eval = cfg.data.eval_ids or 40
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rt = freeze(randomize_bn(build_classifier(cfg.target, ch, size, n_private), g)).to(device)
    rd = freeze(randomize_bn(build_classifier(cfg.target, ch, size, n_private), g)).to(device)
    re = freeze(randomize_bn(build_classifier(cfg.evaluator, ch, size, n_eval), g))      # CPU, as the evaluator actor
    G = freeze(randomize_bn(build_generator(cfg.attacker_gan, ch, size), g)).to(device)
    return {"cfg": cfg, "combined": CombinedModel(rt, rd).eval(), "G": G, "R_E": re, "n_private": n_private,
            "shape": [ch, size, size], "preset": preset}


def rows_for(n: int, n_classes: int, seed: int = 0) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_classes, n).tolist(), (1000 + np.arange(n)).tolist(),
            np.round(rng.random(n), 2).tolist())


def timed_call(m: dict, n_rows: int, iters: int, fast: FastPath, device) -> float:
    t, s, a = rows_for(n_rows, m["n_private"])
    sync(device)
    t0 = time.perf_counter()
    generator_mia(m["combined"], m["G"], t, s, a, iters=iters, lr=0.05, bound=3.0, device=device, fast=fast)
    sync(device)
    return time.perf_counter() - t0


def flops_per_trial_iter(m: dict, device) -> float:
    """FLOPs of one real attack step (forward + input-gradient backward, frozen weights)
    per row, counted by torch.utils.flop_counter on a 2-row step."""
    from torch.utils.flop_counter import FlopCounterMode
    z = torch.randn(2, m["G"].latent_dim, device=device, requires_grad=True)
    a = torch.tensor([0.3, 0.7], device=device)
    t = torch.tensor([0, 1], device=device)
    with FlopCounterMode(display=False) as fc:
        p = m["combined"](m["G"](z), a)
        (-torch.log(p.gather(1, t[:, None]))).sum().backward()
    return fc.get_total_flops() / 2


def forward_gflop(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / x.shape[0] / 1e9


def matmul_rate(device: torch.device) -> dict:
    """Measured dense matmul TFLOP/s on this device (the reference for achieved rates)."""
    out = {}
    if device.type == "cuda":
        cases = [("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)]
        n, reps = 8192, 20
    else:
        cases = [("fp32", torch.float32, False)]
        n, reps = 1024, 10
    for name, dt, tf32 in cases:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        for _ in range(3):
            a @ b
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        dt_s = (time.perf_counter() - t0) / reps
        torch.backends.cuda.matmul.allow_tf32 = old
        out[name] = 2 * n ** 3 / dt_s / 1e12
    return out


def evaluator_seconds_per_row(m: dict, n: int = 128) -> float:
    """R_E scoring cost on CPU with one thread, as the sweep's evaluator actor runs it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.rand(n, *m["shape"])
    with torch.no_grad():
        m["R_E"](x[:8])
        t0 = time.perf_counter()
        for i in range(0, n, 64):
            m["R_E"](x[i:i + 64])
        dt = time.perf_counter() - t0
    torch.set_num_threads(old)
    return dt / n


# ----------------------------------------------------------------------------- measurements

def measure_batched(m: dict, name: str, fast: FastPath, B: int, n1: int, n2: int, device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warm = timed_call(m, B, 2, fast, device)          # cuDNN autotune / torch.compile
    t1 = timed_call(m, B, n1, fast, device)
    t2 = timed_call(m, B, n2, fast, device)
    step = max((t2 - t1) / (n2 - n1), 1e-9)
    r = {"config": name, "rows": B, "ms_per_step": step * 1e3, "trial_iters_per_s": B / step,
         "warmup_s": warm, "call_overhead_s": max(t1 - n1 * step, 0.0)}
    if device.type == "cuda":
        r["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return r


def measure_loop(m: dict, rows: int, iters: int, device) -> dict:
    t, s, a = rows_for(rows, m["n_private"], seed=1)
    generator_mia(m["combined"], m["G"], t[:1], s[:1], a[:1], iters=2, device=device)   # warm-up
    sync(device)
    t0 = time.perf_counter()
    for i in range(rows):
        generator_mia(m["combined"], m["G"], [t[i]], [s[i]], [a[i]], iters=iters, lr=0.05, bound=3.0, device=device)
    sync(device)
    dt = time.perf_counter() - t0
    return {"config": "loop (1 row/call, fp32)", "rows": 1, "ms_per_step": dt / (rows * iters) * 1e3,
            "trial_iters_per_s": rows * iters / dt, "warmup_s": 0.0, "call_overhead_s": 0.0}


def interp_step(runs: list[dict], B: int) -> tuple[float, float]:
    """(seconds per step, per-call overhead) at batch B, log-log interpolated between the
    measured batch sizes of one configuration (clamped at the ends)."""
    pts = sorted((r["rows"], r["ms_per_step"] / 1e3, r["call_overhead_s"]) for r in runs)
    if B <= pts[0][0]:
        return pts[0][1], pts[0][2]
    if B >= pts[-1][0]:
        b, s, o = pts[-1]
        return s * B / b, o * B / b
    for (b0, s0, o0), (b1, s1, o1) in zip(pts, pts[1:]):
        if b0 <= B <= b1:
            w = (math.log(B) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp((1 - w) * math.log(s0) + w * math.log(s1)), (1 - w) * o0 + w * o1
    raise AssertionError


def project_cluster(runs: list[dict], warmup_s: float, eval_s_per_row: float, gpus: list[int],
                    variants: int = 2, batch_cap: int = 4096) -> list[dict]:
    """Projected wall time of the paper's sweep (``variants`` x 101 alphas x 27 targets x 3
    restarts, 1500 iterations) on N GPUs with one attack worker per GPU, from measured
    single-GPU numbers.  The rows of each variant are cut into chunks of
    B = min(batch_cap, ceil(rows / N)) (``attack.batch_rows`` set that way), workers take
    chunks round-robin, a chunk costs iters x step(B) + overhead(B) (interpolated from the
    measured batch sizes), every worker pays one warm-up (compile) first, and the single
    evaluator actor scores every row serially on one CPU thread (``eval_s_per_row``),
    overlapping the attack, so the sweep takes the larger of the two plus a last chunk's
    scoring.  Actor start-up and model loading (seconds, identical for any N) are left
    out."""
    per_variant = PAPER_SWEEP["alphas"] * PAPER_SWEEP["targets"] * PAPER_SWEEP["restarts"]
    rows, iters = variants * per_variant, PAPER_SWEEP["iters"]
    out = []
    for n in gpus:
        B = min(batch_cap, math.ceil(rows / n))
        chunks = variants * math.ceil(per_variant / B)
        step, over = interp_step(runs, B)
        per_worker = math.ceil(chunks / n)
        t_gpu = warmup_s + per_worker * (iters * step + over)
        t_eval = rows * eval_s_per_row
        total = max(t_gpu, t_eval) + B * eval_s_per_row
        out.append({"gpus": n, "rows": rows, "chunk_rows": B, "chunks": chunks, "chunks_per_gpu": per_worker,
                    "step_ms": step * 1e3, "gpu_s": t_gpu, "evaluator_s": t_eval, "total_s": total,
                    "trial_iters_per_s": rows * iters / total, "gpu_busy": min(1.0, chunks / n)})
    return out


def best_projection(runs: list[dict], eval_s_per_row: float, gpus: list[int]) -> list[dict]:
    """For each N, the :func:`project_cluster` row with the shortest attack time over the
    measured fast-path configurations (each with its own measured batch sizes and
    warm-up; a batch size below a configuration's smallest measured one is charged that
    one's step time)."""
    configs = sorted({r["config"] for r in runs if r["rows"] > 1 and r["config"] != "fp32"})
    best = {}
    for name in configs:
        cr = [r for r in runs if r["config"] == name]
        for row in project_cluster(cr, max(r["warmup_s"] for r in cr), eval_s_per_row, gpus):
            if row["gpus"] not in best or row["gpu_s"] < best[row["gpus"]]["gpu_s"]:
                best[row["gpus"]] = {"config": name, **row}
    return [best[n] for n in gpus if n in best]


# ----------------------------------------------------------------------------- main

def run_check(m: dict, prof: dict, device, deadline: float, res: dict) -> None:
    """The fast path's decisions against an fp32 run of the same rows (check_fast_path)."""
    fast_name = prof["check_fast"]
    if time.time() > deadline:
        res["skipped"].append("fast-path check (time budget)")
        return
    t, s, a = rows_for(prof["check_rows"], m["n_private"], seed=2)
    res["check"] = {"config": fast_name, "iters": prof["check_iters"],
                    **check_fast_path(m["combined"], m["G"], t, s, a, FAST[fast_name], prof["check_iters"],
                                      0.05, 3.0, device)}


def run_scale(scale: str, prof: dict, device, deadline: float, result: dict, save) -> dict:
    m = build_scale(scale, device)
    res = {"preset": m["preset"], "image_shape": m["shape"], "n_classes": m["n_private"], "runs": [],
           "skipped": []}
    result["scales"][scale] = res
    x1 = torch.rand(1, *m["shape"], device=device)
    res["gflop_fwd_classifier"] = forward_gflop(m["combined"].target, x1)
    res["gflop_fwd_generator"] = forward_gflop(m["G"], torch.randn(1, m["G"].latent_dim, device=device))
    res["gflop_per_trial_iter"] = flops_per_trial_iter(m, device) / 1e9
    res["evaluator_cpu_s_per_row"] = evaluator_seconds_per_row(m)
    save()
    res["runs"].append(measure_loop(m, prof["loop_rows"], prof["loop_iters"], device))
    save()
    plan = [("fp32", B) for B in prof["ref_batches"][scale]] + [("check", 0)]
    if device.type == "cuda":
        plan += [(name, B) for name, bs in prof["fast"].get(scale, []) for B in bs]
    for name, B in plan:
        if name == "check":
            run_check(m, prof, device, deadline, res)
            save()
            continue
        if time.time() > deadline:
            res["skipped"].append(f"{name} B={B} (time budget)")
            continue
        try:
            res["runs"].append(measure_batched(m, name, FAST[name], B, prof["n1"], prof["n2"], device))
        except Exception as e:   # e.g. out of memory at the largest batch: record and go on
            res["skipped"].append(f"{name} B={B}: {type(e).__name__}: {str(e)[:200]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    for r in res["runs"]:
        r["achieved_tflops"] = r["trial_iters_per_s"] * res["gflop_per_trial_iter"] / 1e3
    loop = res["runs"][0]["trial_iters_per_s"]
    best = max(res["runs"], key=lambda r: r["trial_iters_per_s"])
    ref = [r for r in res["runs"] if r["config"] == "fp32"]
    per_variant = math.prod(PAPER_SWEEP.values())
    res["summary"] = {"loop_trial_iters_per_s": loop, "best_config": best["config"], "best_rows": best["rows"],
                      "best_trial_iters_per_s": best["trial_iters_per_s"],
                      "speedup_best_vs_loop": best["trial_iters_per_s"] / loop,
                      "speedup_fp32_batched_vs_loop": (max(r["trial_iters_per_s"] for r in ref) / loop) if ref else None,
                      "paper_sweep_trial_iters_per_variant": per_variant,
                      "paper_sweep_s_loop": per_variant / loop,
                      "paper_sweep_s_best": per_variant / best["trial_iters_per_s"] + best["warmup_s"]}
    if device.type == "cuda" and scale == "paper":
        res["cluster_projection"] = best_projection(res["runs"], res["evaluator_cpu_s_per_row"], [1, 8, 64])
    save()
    return res


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def render(result: dict) -> str:
    from raymia.report import markdown_table
    import pandas as pd
    lines = [f"### {result['device_name']} ({result['device']}), {result['date']}", "",
             f"Command: `{result['command']}`  ", f"Matmul peak measured in the same run (TFLOP/s): " +
             ", ".join(f"{k} {v:.2f}" for k, v in result["matmul_tflops"].items()), ""]
    for scale, r in result["scales"].items():
        lines += [f"**{scale}** (preset `{r['preset']}`, image {r['image_shape']}, {r['n_classes']} classes): "
                  f"{r['gflop_per_trial_iter']:.3f} GFLOP per trial-iteration (forward + input-gradient backward; "
                  f"classifier forward {r['gflop_fwd_classifier']:.3f}, generator forward "
                  f"{r['gflop_fwd_generator']:.3f} GFLOP per image)", ""]
        cols = ["config", "rows", "ms_per_step", "trial_iters_per_s", "achieved_tflops", "warmup_s", "call_overhead_s"]
        if any("gpu_mem_gb" in x for x in r["runs"]):
            cols.append("gpu_mem_gb")
        df = pd.DataFrame(r["runs"]).reindex(columns=cols)
        loop = r["summary"]["loop_trial_iters_per_s"]
        df.insert(4, "x_loop", df["trial_iters_per_s"] / loop)
        lines += [markdown_table(df, ".4g"), ""]
        s = r["summary"]
        lines.append(f"Paper sweep per variant ({s['paper_sweep_trial_iters_per_variant']:,} trial-iterations): "
                     f"one-row loop {s['paper_sweep_s_loop'] / 3600:.1f} h; best ({s['best_config']}, "
                     f"B={s['best_rows']}) {s['paper_sweep_s_best']:.0f} s incl. warm-up.  ")
        if "check" in r:
            c = r["check"]
            lines.append(f"Fast path `{c['config']}` vs fp32 on {c['rows']} rows x {c['iters']} iterations: "
                         f"top-1 decisions agree {c['top1_agreement']:.1%} (success {c['top1_rate_ref']:.1%} fp32 / "
                         f"{c['top1_rate_fast']:.1%} fast), top-5 agree {c['top5_agreement']:.1%}, Spearman of "
                         f"target confidence {c['conf_spearman']:.3f}, same side of the fp32 median confidence "
                         f"{c['median_split_agreement']:.1%}, mean |Δlog conf| {c['mean_abs_log_conf_diff']:.3g}.  ")
        if r.get("skipped"):
            lines.append("Skipped: " + "; ".join(r["skipped"]) + "  ")
        lines.append("")
        if r.get("cluster_projection"):
            lines += ["Projected paper sweep (2 variants) on N GPUs (see `project_cluster`):", "",
                      markdown_table(pd.DataFrame(r["cluster_projection"]), ".4g"), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: gpu on CUDA, else cpu")
    p.add_argument("--scales", default="orl,paper")
    p.add_argument("--fast", action="append", default=None, metavar="SCALE:NAME:B1,B2",
                   help=f"fast configs to measure on CUDA instead of the profile's (repeatable; names: {', '.join(FAST)})")
    p.add_argument("--check-fast", default=None, help="fast config compared with fp32 (default: profile's)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip remaining measurements after this many seconds")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--render", default=None, metavar="JSON", help="only render an existing result as markdown")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    device = pick_device(args.device)
    prof = dict(PROFILES[args.profile or ("gpu" if device.type == "cuda" else "cpu")])
    if args.fast:
        prof["fast"] = {}
        for item in args.fast:
            try:
                scale, name, bs = item.split(":")
                prof["fast"].setdefault(scale, []).append((name, [int(b) for b in bs.split(",")]))
            except ValueError:
                p.error(f"--fast {item!r}: expected SCALE:NAME:B1,B2")
    if args.check_fast:
        prof["check_fast"] = args.check_fast
    for name in [n for lst in prof["fast"].values() for n, _ in lst] + [prof["check_fast"]]:
        if name not in FAST:
            p.error(f"unknown fast config {name!r}; known: {', '.join(FAST)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attack-{device.type}.json"
    result = {"device": str(device), "device_name": device_name(device), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "profile": prof,
              "scales": {}}
    try:
        from raymia.artifacts import write_run_record
        write_run_record(out / f"attack-{device.type}-run", load_config("vggface2"), {"bench": "attack"})
    except Exception as e:  # the run record must not stop a benchmark on a bare machine
        result["run_record_error"] = str(e)
    save = lambda: path.write_text(json.dumps(result, indent=1, default=float))
    deadline = time.time() + args.budget_s
    result["matmul_tflops"] = matmul_rate(device)
    save()
    for scale in args.scales.split(","):
        run_scale(scale, prof, device, deadline, result, save)
        save()
    print(json.dumps({k: v["summary"] for k, v in result["scales"].items()}, indent=1, default=float))
    try:
        md = render(result)
    except ImportError as e:
        print(f"markdown not rendered ({e}); run: python bench/bench_attack.py --render {path}")
        return
    with open(out / "attack.md", "a") as fh:
        fh.write(md + "\n")
    print(md)
    print(f"wrote {path} and appended {out / 'attack.md'}")


if __name__ == "__main__":
    main()
