"""Similarity-filter sweep (Raha et al.): Tune grid over (N_B, T_ssim, T_hash, L_sp) with Table 1's configs, attack and regular-user simulations on Ray actors, tables beside the paper's.

One "setting" per preset (default: MNIST-5k with LeNet5 and ORL faces with the small
CNN).  Missing R_T / R_E are trained first (Ray Tune, cached by config hash).  Each
simulated session ("unit") is written to OUT/units/ when done: a rerun skips finished
units.  Outputs in OUT (default <out_root>/filter_sweep): filter_trials.parquet,
filter_summary.csv, tables.md, detection_vs_fpr.png, max_iters_per_label_<setting>.png,
noise.png, calibration.json."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from raymia.artifacts import read_manifest, write_run_record
from raymia.config import Config, ConfigError, load_config
from raymia.filter_eval import (attack_label_table, calibrate, detection_fpr_plot, extra_units, grid_table,
                                main_units, noise_plot, noise_table, paper_k, per_label_plot, population_table,
                                setting_key, sweep_configs, sybil_table, table6, user_label_table)
from raymia.kinds import artifact_dir
from raymia.runtime import resolve_out_root

TITLES = {"filter_mnist": "MNIST-5k, LeNet5", "filter_orl": "ORL faces, small CNN",
          "filter_celeba": "CelebA 4 classes, small CNN"}


def setting_name(preset: str) -> str:
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def n_classes(cfg) -> int:
    return int(read_manifest(artifact_dir(cfg, "target"))["n_classes"])


def routed(units: list, configs: dict, keys: dict, start: int = 0) -> list:
    """(route index, unit dict, uid) for each unit."""
    from dataclasses import asdict
    return [(start + i, {**asdict(u), "bank": list(u.bank)}, u.uid(keys[u.setting], configs[u.setting]))
            for i, u in enumerate(units)]


def read_rows(store: Path, items: list) -> pd.DataFrame:
    parts = [pd.read_parquet(store / f"{uid}.parquet") for _, _, uid in items]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def load_settings(presets: str, overrides: Optional[list] = None) -> dict:
    """{setting: Config} for a comma-separated list of presets (one setting each)."""
    names = [x.strip() for x in presets.split(",") if x.strip()]
    if not names:
        raise ConfigError("--preset names no preset")
    return {setting_name(x): load_config(x, overrides) for x in names}


def run(cfgs, out=None, address=None) -> Path:
    """The whole sweep over one Config or a {setting: Config} mapping; returns OUT."""
    from raymia.distributed.filter_sweep import make_filter_actors, run_filter_sweep, run_filter_units
    from raymia.distributed.runtime import cluster_cpus, cluster_gpus, init_ray
    from raymia.distributed.training import ensure_artifacts
    import ray
    if isinstance(cfgs, Config):
        cfgs = {cfgs.run.name: cfgs}
    first = next(iter(cfgs.values()))
    root = resolve_out_root(first)
    for cfg in cfgs.values():
        cfg.run.out_root = str(root)
    out = Path(out).expanduser().resolve() if out else root / "filter_sweep"
    configs = {s: sweep_configs(c.filter) for s, c in cfgs.items()}
    from raymia.data import load_bundle
    names = {s: load_bundle(c.data).class_names for s, c in cfgs.items()}   # a missing data set fails here
    for s, cfg in cfgs.items():
        write_run_record(out / s, cfg, {"setting": s, "configs": {n: q.to_dict() for n, q in configs[s].items()}})
    t0 = time.time()

    for s, cfg in cfgs.items():
        ensure_artifacts(cfg, ["target", "evaluator"], address, label=f"filter_sweep {s}")
    keys = {s: setting_key(c) for s, c in cfgs.items()}
    ncls = {s: n_classes(c) for s, c in cfgs.items()}
    main = [u for s, c in cfgs.items() for u in main_units(s, c.filter, ncls[s], list(configs[s]))]
    items = routed(main, configs, keys)
    store = out / "units"
    store.mkdir(parents=True, exist_ok=True)
    done = sum((store / f"{uid}.parquet").exists() for _, _, uid in items)
    trials = [{"setting": s, "config": n} for s in cfgs for n in configs[s]]
    print(f"[filter_sweep] {len(cfgs)} setting(s) x configs = {len(trials)} Tune trials over {len(items)} "
          f"simulated sessions ({done} already done)", flush=True)

    init_ray(first, address)
    n_act = first.filter.actors or int(cluster_gpus()) or max(1, int(cluster_cpus()))
    namespace = f"raymia-filter-{os.getpid()}"
    cfg_dicts = {s: c.to_dict() for s, c in cfgs.items()}
    actors, handles = make_filter_actors(cfg_dicts, {s: {n: q.to_dict() for n, q in c.items()} for s, c in configs.items()},
                                str(store), n_act, namespace)
    by_setting = {s: [it for it in items if it[1]["setting"] == s] for s in cfgs}
    try:
        metrics = run_filter_sweep(first, trials, by_setting, actors, namespace, out / "tune")
        summary = pd.DataFrame(metrics)
        params = pd.DataFrame([{"setting": s, "config": n, "paper": paper_k(n), "n_b": q.n_b, "t_ssim": q.t_ssim,
                                "t_hash": q.t_hash, "l_sp": q.l_sp, "data_range": q.data_range}
                               for s in cfgs for n, q in configs[s].items()])
        summary = params.merge(summary, on=["setting", "config"], how="left")
        calibration = calibrate(summary, min(c.filter.fpr_target for c in cfgs.values()))
        for s, cal in calibration.items():
            print(f"[filter_sweep] {s}: calibrated config {cal.get('config')} "
                  f"(FPR {cal.get('fpr', math.nan):.3f}, max iterations before detection {cal.get('iters_max')})",
                  flush=True)

        # beyond the paper, on Table 1's configs and the calibrated one
        extra = []
        for s, c in cfgs.items():
            bank = [n for n in configs[s] if paper_k(n)]
            cal = calibration.get(s, {}).get("config")
            if cal and cal not in bank:
                bank.append(cal)
            extra += extra_units(s, c.filter, ncls[s], bank)
        extra_items = routed(extra, configs, keys, start=len(items))
        run_filter_units(extra_items, actors, namespace, "beyond-the-paper")
    finally:
        for h in handles:
            ray.kill(h)

    trials_df = pd.concat([read_rows(store, items), read_rows(store, extra_items)], ignore_index=True)
    trials_df.to_parquet(out / "filter_trials.parquet", index=False)
    summary.to_csv(out / "filter_summary.csv", index=False)
    cal_out = {s: {**cal, "fpr_target": cfgs[s].filter.fpr_target,
                   "params": configs[s][cal["config"]].to_dict() if cal.get("config") else None,
                   "rule": "among configs with FPR <= target: highest recall, then fewest max iterations before "
                           "detection, then fewest median, then lowest FPR"}
               for s, cal in calibration.items()}
    (out / "calibration.json").write_text(json.dumps(cal_out, indent=2, default=float))

    # tables and figures
    ps = {s: c.filter.paper_setting for s, c in cfgs.items()}
    md = [f"# Similarity filter sweep ({time.strftime('%Y-%m-%d')})", ""]
    for s, c in cfgs.items():
        fc = c.filter
        cal = calibration.get(s, {}).get("config")
        md += [f"## {TITLES.get(s, s)} (`{s}`; compared with the paper's {ps[s]})", "",
               f"Attacker noise σ = {fc.noise_std:g}, at most {fc.max_iters} queries per attack trial, "
               f"{fc.trials_per_label} attack / {fc.user_trials_per_label} regular-user trial(s) per label.", "",
               "### Table 2/3: attack attempts (`*`: some attempt never detected)", "",
               attack_label_table(trials_df, s, ps[s], names[s]), "",
               "### Table 4/5: regular users", "", user_label_table(trials_df, s, ps[s], names[s]), "",
               "### Table 6: defense performance (%)", "",
               table6(summary, s, ps[s], tuple([cal] if cal else []) + tuple(
                   n for n in configs[s] if n.startswith("paper-") and not paper_k(n))), "",
               f"Calibrated (FPR ≤ {fc.fpr_target:.0%}): `{cal}`", "",
               "### Adaptive attacker (noise)", "", noise_table(trials_df, s), "",
               "### Sybil attacker (round-robin over k client ids)", "", sybil_table(trials_df, s), "",
               "### Regular users with the cross-client check", "", population_table(trials_df, s), "",
               "### Whole grid", "", grid_table(summary, s), ""]
        per_label_plot(trials_df, s, ps[s], names[s], TITLES.get(s, s), out / f"max_iters_per_label_{s}.png")
    (out / "tables.md").write_text("\n".join(md))
    detection_fpr_plot(summary, calibration, ps, TITLES, {s: c.filter.max_iters for s, c in cfgs.items()},
                       out / "detection_vs_fpr.png")
    thresholds = {s: {n: configs[s][n].t_ssim for n in configs[s] if paper_k(n)} for s in cfgs}
    if (trials_df["kind"] == "noise").any():
        noise_plot(trials_df, TITLES, thresholds, out / "noise.png")

    for s in cfgs:
        print(f"\n== {TITLES.get(s, s)}")
        print(table6(summary, s, ps[s], tuple([calibration[s]["config"]] if calibration[s].get("config") else [])))
    print(f"\n[filter_sweep] done in {time.time() - t0:.0f}s; outputs: {out}")
    return out
