"""Similarity-filter sweep (Raha et al.): Tune grid over (N_B, T_ssim, T_hash, L_sp) with Table 1's configs, attack and regular-user simulations on Ray actors, tables beside the paper's.

One "setting" per preset (default: MNIST-5k with LeNet5 and ORL faces with the small
CNN).  Missing R_T / R_E are trained first (Ray Tune, cached by config hash).  Each
simulated session ("unit") is written to OUT/units/ when done: a rerun skips finished
units.  Outputs in OUT (default <out_root>/filter_sweep): filter_trials.parquet,
filter_summary.csv, tables.md, detection_vs_fpr.png, max_iters_per_label_<setting>.png,
noise.png, calibration.json.

Steps: :func:`prepare` (configurations, run records), the paper's simulations
(:func:`plan_main`) as one Tune trial per configuration (:func:`main_phase`), the calibration, the experiments beyond
the paper on Table 1's and the calibrated configs (:func:`extra_phase`), then
:func:`write_outputs` and the report (:mod:`raymia.report.filter`)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pandas as pd

from ..artifacts import read_manifest, write_run_record
from ..config import Config, ConfigError, load_config
from ..filter_sim import calibrate, extra_units, main_units, paper_k, setting_key, sweep_configs, sweep_summary
from ..filter_sim.simulate import normalise_rows
from ..filter_sim.units import calib_images_disjoint, calib_units, is_ablation, is_window_ablation, user_protocols
from ..kinds import artifact_dir
from ..runtime import resolve_out_root

TITLES = {"filter_mnist": "MNIST-5k, LeNet5", "filter_orl": "ORL faces, small CNN",
          "filter_celeba": "CelebA 4 classes, small CNN"}

CALIBRATION_RULE = ("among configs with FPR <= target (on the calibration sessions, under every user protocol "
                    "run): highest recall, then fewest max iterations before detection, then fewest median, then "
                    "lowest FPR; its numbers reported on the held-out reported sessions")


def setting_name(preset: str) -> str:
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def n_classes(cfg) -> int:
    return int(read_manifest(artifact_dir(cfg, "target"))["n_classes"])


def routed(units: list, configs: dict, keys: dict, start: int = 0) -> list:
    """(route index, unit dict, uid) for each unit."""
    return [(start + i, {**asdict(u), "bank": list(u.bank)}, u.uid(keys[u.setting], configs[u.setting]))
            for i, u in enumerate(units)]


def read_rows(store: Path, items: list) -> pd.DataFrame:
    parts = [pd.read_parquet(store / f"{uid}.parquet") for _, _, uid in items]
    return normalise_rows(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame()


def load_settings(presets: str, overrides: Optional[list] = None) -> dict:
    """{setting: Config} for a comma-separated list of presets (one setting each)."""
    names = [x.strip() for x in presets.split(",") if x.strip()]
    if not names:
        raise ConfigError("--preset names no preset")
    return {setting_name(x): load_config(x, overrides) for x in names}


# ----------------------------------------------------------------------------- steps

def prepare(cfgs: dict, out=None) -> tuple[Path, dict, dict, dict]:
    """One results root for every setting, OUT, each setting's configurations, class
    names (a missing data set fails here) and, per user protocol, whether the
    calibration users' images are disjoint from the reported users'; a run record per
    setting."""
    from ..data import load_bundle
    root = resolve_out_root(next(iter(cfgs.values())))
    for cfg in cfgs.values():
        cfg.run.out_root = str(root)
    out = Path(out).expanduser().resolve() if out else root / "filter_sweep"
    configs = {s: sweep_configs(c) for s, c in cfgs.items()}
    names, disjoint = {}, {}
    for s, c in cfgs.items():
        b = load_bundle(c.data)
        names[s] = b.class_names
        ys = (list(b.private_train.y.tolist()) + list(b.private_test.y.tolist()) if c.filter_sim.user_pool == "all"
              else list(b.private_test.y.tolist()))
        pool = {lab: ys.count(lab) for lab in set(ys)}
        test = {lab: b.private_test.y.tolist().count(lab) for lab in set(b.private_test.y.tolist())}
        disjoint[s] = calib_images_disjoint(c.filter_sim, c.filter_sweep, pool, test)
    for s, cfg in cfgs.items():
        write_run_record(out / s, cfg, {"setting": s, "configs": {n: q.to_dict() for n, q in configs[s].items()}})
    return out, configs, names, disjoint


def main_bank(configs: dict) -> list:
    """The configurations every reported session runs through: all of the setting's but
    the SSIM-window ablation, which has sessions of its own (the same seeds, so the same
    attack query streams and users) -- the other units keep the ids they had before it."""
    return [n for n in configs if not is_window_ablation(n)]


def plan_main(cfgs: dict, configs: dict, ncls: dict, keys: dict) -> list:
    """The paper's simulations, routed: attack and regular-user trials per label (both
    user protocols), each session through every configuration of its setting; then the
    calibration sessions (other seeds and users) through every non-ablation configuration."""
    main = [u for s, c in cfgs.items() for u in main_units(s, c.filter_sim, ncls[s], main_bank(configs[s]))]
    main += [u for s, c in cfgs.items() if any(map(is_window_ablation, configs[s]))
             for u in main_units(s, c.filter_sim, ncls[s], [n for n in configs[s] if is_window_ablation(n)])]
    main += [u for s, c in cfgs.items()
             for u in calib_units(s, c.filter_sim, c.filter_sweep, ncls[s],
                                  [n for n in configs[s] if not is_ablation(n)])]
    return routed(main, configs, keys)


def main_phase(cfgs: dict, configs: dict, items: list, pool, out: Path) -> pd.DataFrame:
    """One Tune trial per (setting, configuration) over the paper's simulations
    (``items`` from :func:`plan_main`); returns the summary, one row per trial."""
    from ..distributed.filter_sweep import run_filter_sweep
    by_setting = {s: [it for it in items if it[1]["setting"] == s] for s in cfgs}
    trials = [{"setting": s, "config": n} for s in cfgs for n in configs[s]]
    metrics = run_filter_sweep(next(iter(cfgs.values())), trials, by_setting, pool, out / "tune")
    return sweep_summary(metrics, configs)


def extra_phase(cfgs: dict, configs: dict, ncls: dict, keys: dict, calibration: dict, pool, start: int) -> list:
    """Beyond the paper (noise sweep, Sybil attacker, cross-client false positives), on
    Table 1's configs and the calibrated one; returns the routed items."""
    from ..distributed.filter_sweep import run_filter_units
    extra = []
    for s, c in cfgs.items():
        bank = [n for n in configs[s] if paper_k(n)]
        cal = calibration.get(s, {}).get("config")
        if cal and cal not in bank:
            bank.append(cal)
        extra += extra_units(s, c.filter_sim, ncls[s], bank)
    items = routed(extra, configs, keys, start=start)
    run_filter_units(items, pool, "beyond-the-paper")
    return items


def write_outputs(out: Path, cfgs: dict, configs: dict, trials: pd.DataFrame, summary: pd.DataFrame,
                  calibration: dict, disjoint: Optional[dict] = None) -> None:
    trials.to_parquet(out / "filter_trials.parquet", index=False)
    summary.to_csv(out / "filter_summary.csv", index=False)
    cal_out = {s: {**cal, "fpr_target": cfgs[s].filter_sweep.fpr_target,
                   "params": configs[s][cal["config"]].to_dict() if cal.get("config") else None,
                   "rule": CALIBRATION_RULE, "user_protocols": user_protocols(cfgs[s].filter_sim),
                   "calibration_sessions": {"attack_trials_per_label": cfgs[s].filter_sweep.calib_trials_per_label,
                                            "user_trials_per_label": cfgs[s].filter_sweep.calib_user_trials_per_label,
                                            "user_images_disjoint_from_report":
                                                (disjoint or {}).get(s, {})}}
               for s, cal in calibration.items()}
    (out / "calibration.json").write_text(json.dumps(cal_out, indent=2, default=float))


def run(cfgs, out=None, address=None) -> Path:
    """The whole sweep over one Config or a {setting: Config} mapping; returns OUT."""
    from ..distributed.filter_sweep import simulation_actors
    from ..distributed.training import ensure_artifacts
    from ..report.filter import sweep_figures, sweep_tables, table6
    if isinstance(cfgs, Config):
        cfgs = {cfgs.run.name: cfgs}
    out, configs, names, disjoint = prepare(cfgs, out)
    t0 = time.time()

    for s, cfg in cfgs.items():
        ensure_artifacts(cfg, ["target", "evaluator"], address, label=f"filter_sweep {s}")
    keys = {s: setting_key(c) for s, c in cfgs.items()}
    ncls = {s: n_classes(c) for s, c in cfgs.items()}
    store = out / "units"
    store.mkdir(parents=True, exist_ok=True)
    items = plan_main(cfgs, configs, ncls, keys)
    done = sum((store / f"{uid}.parquet").exists() for _, _, uid in items)
    print(f"[filter_sweep] {len(cfgs)} setting(s) x configs = {sum(map(len, configs.values()))} Tune trials over "
          f"{len(items)} simulated sessions ({done} already done)", flush=True)

    with simulation_actors(cfgs, configs, store, address) as pool:
        summary = main_phase(cfgs, configs, items, pool, out)
        calibration = calibrate(summary, min(c.filter_sweep.fpr_target for c in cfgs.values()))
        for s, cal in calibration.items():
            sel = cal.get("selection", {})
            print(f"[filter_sweep] {s}: calibrated config {cal.get('config')} chosen on {cal.get('selected_on')} "
                  f"(FPR {sel.get('fpr', math.nan):.3f}, recall {sel.get('recall', math.nan):.3f}); reported: "
                  f"FPR {cal.get('fpr', math.nan):.3f}, recall {cal.get('recall', math.nan):.3f}, "
                  f"max iterations before detection {cal.get('iters_max')}", flush=True)
        extra_items = extra_phase(cfgs, configs, ncls, keys, calibration, pool, start=len(items))

    trials = pd.concat([read_rows(store, items), read_rows(store, extra_items)], ignore_index=True)
    write_outputs(out, cfgs, configs, trials, summary, calibration, disjoint)
    (out / "tables.md").write_text(sweep_tables(cfgs, configs, names, trials, summary, calibration, TITLES))
    sweep_figures(out, cfgs, configs, names, trials, summary, calibration, TITLES)

    for s, c in cfgs.items():
        print(f"\n== {TITLES.get(s, s)}")
        print(table6(summary, s, c.filter_sim.paper_setting,
                     tuple([calibration[s]["config"]] if calibration[s].get("config") else [])))
    print(f"\n[filter_sweep] done in {time.time() - t0:.0f}s; outputs: {out}")
    return out
