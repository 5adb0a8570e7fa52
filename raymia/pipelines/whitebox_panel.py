"""The white-box attack panel: every attempt of ``whitebox.panel`` (a prior, regularisers,
augmentation, iterations, a victim trained otherwise) attacks the same targets with the same
restarts on R_T at alpha = 1, judged by R_E and the independent judges; beside them the
ceiling of each prior (the targets' own training photos projected into it by pixel MSE,
then judged).  The attempt with the best external top-5 on this selection draw is run again
with fresh restarts (the report draw) beside the alpha sweep's attack, paired."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ..artifacts import write_run_record
from ..config import Config, ConfigError, apply_override, parse_override, validate
from ..evaluation import bootstrap_ci, paired_bootstrap_diff
from ..runtime import out_dir, pick_device, seed_everything

BASE_KINDS = ("target", "evaluator", "attacker_gan")
JUDGES = (("R_E", "success_top5"), ("external", "external_top5"), ("classical", "classical_top5"))
HEADLINE = "external_top5"
BASELINE = 0          # the panel's first attempt is the reference the report draw pairs with
DRAW_SEED = 100_000   # seed step between the selection draw (0) and the report draw (1)


def say(msg: str) -> None:
    print(f"[whitebox_panel] {msg}", flush=True)


def attempt_config(cfg: Config, overrides: list) -> Config:
    """``cfg`` with one attempt's overrides, checked as a whole (a ConfigError names the key)."""
    acfg = copy.deepcopy(cfg)
    for item in overrides:
        key, value = parse_override(item)
        apply_override(acfg, key, value)
    validate(acfg)
    return acfg


def build_prior(cfg: Config, bundle, device):
    """The attacker's search space of ``cfg.whitebox.prior``, frozen on ``device``."""
    from ..attacks.priors import LinearPrior, MixedPrior, PixelPrior
    from ..kinds import kind
    from ..models import freeze
    wb = cfg.whitebox
    if wb.prior == "pixel":
        return freeze(PixelPrior(bundle.aux.x.shape[1:], wb.bound).to(device))
    if wb.prior == "linear":
        return freeze(LinearPrior.fit(bundle.aux.x, wb.components).to(device))
    F, _ = kind("attacker_gan").load(cfg, device)
    if wb.prior == "gan":
        return F
    return freeze(MixedPrior(F, LinearPrior.fit(bundle.aux.x, wb.components).to(device), wb.mixed_weight))


def prior_key(cfg: Config) -> tuple:
    wb = cfg.whitebox
    return (wb.prior, wb.components if wb.prior in ("linear", "mixed") else None,
            wb.mixed_weight if wb.prior == "mixed" else None)


def targets_of(cfg: Config, bundle) -> list:
    known = bundle.known_targets()
    return [t for t in (cfg.whitebox.targets or known) if t in known]


def rows_of(cfg: Config, targets: list, draw: int) -> tuple[list, list, list]:
    """(targets, restarts, seeds) of one draw: every target x whitebox.restarts, seeds from
    run.seed, the draw, the target and the restart."""
    r = cfg.whitebox.restarts
    t = [k for k in targets for _ in range(r)]
    rs = [i for _ in targets for i in range(r)]
    seeds = [cfg.run.seed * 1_000_003 + DRAW_SEED * draw + 1000 + 10 * k + i for k, i in zip(t, rs)]
    return t, rs, seeds


def attack(name: str, acfg: Config, bundle, scorer, targets: list, draw: int, device) -> pd.DataFrame:
    """One attempt on one draw: a row per (target, restart) with every judge's verdict and
    ``picked`` (the restart the attacker keeps: highest confidence under augmentation)."""
    from ..attacks.whitebox import WhiteBoxOpts, pick_restarts, whitebox_mia
    from ..kinds import kind
    from ..models import ProbModel, freeze
    victim, man = kind("target").load(acfg, device)
    prior = build_prior(acfg, bundle, device)
    t, rs, seeds = rows_of(acfg, targets, draw)
    res = whitebox_mia(freeze(ProbModel(victim)), prior, t, seeds, opts=WhiteBoxOpts.of(acfg.whitebox), device=device)
    verdicts = scorer.score(res.images, t)
    df = pd.DataFrame({"attempt": name, "draw": draw, "target": t, "restart": rs, "seed": seeds,
                       "target_conf": res.target_conf.numpy(), "aug_conf": res.aug_conf.numpy(),
                       "victim_test_acc": man["metrics"].get("test_acc", np.nan), "seconds": res.seconds,
                       **{k: np.asarray(v) for k, v in verdicts.items()}})
    df["picked"] = False
    df.loc[pick_restarts(t, res.aug_conf), "picked"] = True
    return df


def ceiling(key: tuple, acfg: Config, bundle, scorer, targets: list, device) -> dict:
    """The targets' training photos projected into the prior and judged: how well the prior
    can express these people at all."""
    from ..attacks.priors import project
    prior = build_prior(acfg, bundle, device)
    keep = torch.isin(bundle.private_train.y, torch.as_tensor(targets))
    x, y = bundle.private_train.x[keep], bundle.private_train.y[keep].tolist()
    z = project(prior, x.to(device), acfg.whitebox.project_iters, acfg.whitebox.lr, acfg.whitebox.bound,
                acfg.run.seed)
    with torch.no_grad():
        images = prior(z).cpu()
    v = scorer.score(images, y)
    out = {"prior": key[0], "components": key[1], "mixed_weight": key[2], "images": len(y),
           "pixel_mse": float((images - x).pow(2).mean())}
    for judge, col in JUDGES:
        per_t = pd.Series(np.asarray(v[col], float)).groupby(np.asarray(y)).mean().to_numpy()
        lo, hi = bootstrap_ci(per_t, acfg.sweep.bootstrap, acfg.run.seed)
        out.update({judge: float(per_t.mean()), f"{judge}_lo": lo, f"{judge}_hi": hi})
    return out


def summarize_attempt(df: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Per judge: the per-trial rate (mean over targets of the mean over restarts) and the
    attacker's pick (one restart per target), each with a bootstrap CI over targets."""
    out = {"attempt": df["attempt"].iloc[0], "draw": int(df["draw"].iloc[0]), "rows": len(df),
           "targets": df["target"].nunique(), "victim_test_acc": float(df["victim_test_acc"].iloc[0]),
           "seconds": float(df["seconds"].iloc[0])}
    for judge, col in JUDGES:
        per_t = df.groupby("target")[col].mean().to_numpy(float)
        picked = df[df["picked"]].sort_values("target")[col].to_numpy(float)
        for tag, v in (("trial", per_t), ("picked", picked)):
            lo, hi = bootstrap_ci(v, n_boot, seed)
            out.update({f"{judge}_{tag}": float(v.mean()), f"{judge}_{tag}_lo": lo, f"{judge}_{tag}_hi": hi})
    return out


def _pct(row, key: str) -> str:
    return f"{100 * row[key]:.1f}% [{100 * row[key + '_lo']:.1f}, {100 * row[key + '_hi']:.1f}]"


def write_report(run_dir: Path, summary: pd.DataFrame, ceilings: pd.DataFrame, paired: Optional[dict],
                 chance: float) -> str:
    lines = ["# White-box attack panel", "",
             f"alpha = 1 (R_T alone); top-5 rates with 95% bootstrap CIs over targets; chance {100 * chance:.1f}%.",
             "'trial': mean over restarts; 'pick': the restart the attacker keeps (highest confidence under "
             "augmentation, no judge involved).", "",
             "| attempt | draw | victim test acc. | external: trial / pick | R_E: trial / pick | classical: trial / pick | s |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['attempt']} | {'report' if r['draw'] else 'selection'} | {100 * r['victim_test_acc']:.1f}% | "
                     f"{_pct(r, 'external_trial')} / {_pct(r, 'external_picked')} | "
                     f"{_pct(r, 'R_E_trial')} / {_pct(r, 'R_E_picked')} | "
                     f"{_pct(r, 'classical_trial')} / {_pct(r, 'classical_picked')} | {r['seconds']:.0f} |")
    lines += ["", "## Ceilings: the targets' training photos projected into each prior (pixel MSE), then judged", "",
              "| prior | components | pixel MSE | external top-5 | R_E top-5 | classical top-5 |", "|---|---|---|---|---|---|"]
    for _, r in ceilings.iterrows():
        comp = "" if pd.isna(r["components"]) else int(r["components"])
        lines.append(f"| {r['prior']} | {comp} | {r['pixel_mse']:.4f} | {_pct(r, 'external')} | {_pct(r, 'R_E')} | "
                     f"{_pct(r, 'classical')} |")
    if paired and paired["best"] == paired["baseline"]:
        lines += ["", f"Report draw: the best attempt of the selection draw is the reference, '{paired['best']}'."]
    elif paired:
        lines += ["", f"Report draw, paired (same targets and restart seeds): '{paired['best']}' minus "
                      f"'{paired['baseline']}', external top-5 of the pick: {100 * paired['diff']:+.1f} points "
                      f"[{100 * paired['lo']:+.1f}, {100 * paired['hi']:+.1f}]."]
    text = "\n".join(lines) + "\n"
    (run_dir / "whitebox_panel.md").write_text(text)
    return text


def run(cfg: Config, out: Optional[str] = None, address: Optional[str] = None) -> Path:
    """Writes whitebox_trials.csv, whitebox_summary.csv, ceilings.csv and whitebox_panel.md
    to ``out`` (default <out_root>/<run.name>/whitebox_panel)."""
    from ..data import load_bundle
    from ..distributed.training import ensure_artifacts
    from ..evaluation import make_scorer
    run_dir = out_dir(cfg, out, "whitebox_panel")
    write_run_record(run_dir, cfg)
    seed_everything(cfg.run.seed)
    device = pick_device(cfg.run.device)
    panel = list(cfg.whitebox.panel.items())
    if not panel:
        raise ConfigError("whitebox.panel is empty: nothing to attack with")
    configs = [(name, attempt_config(cfg, ov)) for name, ov in panel]
    ensure_artifacts(cfg, BASE_KINDS, address, "whitebox_panel")
    for _, acfg in configs:     # victims trained otherwise (target.*): their own cached artifacts
        ensure_artifacts(acfg, ("target",), address, "whitebox_panel")
    bundle = load_bundle(cfg.data)
    scorer = make_scorer(cfg, bundle, device)
    targets = targets_of(cfg, bundle)
    n_boot, seed = cfg.sweep.bootstrap, cfg.run.seed
    t0 = time.time()
    trials, summary = [], []
    for name, acfg in configs:
        df = attack(name, acfg, bundle, scorer, targets, 0, device)
        trials.append(df)
        summary.append(summarize_attempt(df, n_boot, seed))
        s = summary[-1]
        say(f"{name}: external {s['external_trial']:.1%} / pick {s['external_picked']:.1%}, "
            f"R_E {s['R_E_trial']:.1%} ({time.time() - t0:.0f}s)")
    paired = None
    if cfg.whitebox.report_draw:
        sel = pd.DataFrame(summary)
        best = int(sel["external_picked"].to_numpy().argmax())
        report = {i: attack(configs[i][0], configs[i][1], bundle, scorer, targets, 1, device)
                  for i in dict.fromkeys([BASELINE, best])}
        for df in report.values():
            trials.append(df)
            summary.append(summarize_attempt(df, n_boot, seed))
        pick = {i: df[df["picked"]].sort_values("target")[HEADLINE].to_numpy(float) for i, df in report.items()}
        d, lo, hi = paired_bootstrap_diff(pick[BASELINE], pick[best], n_boot, seed)
        paired = {"best": configs[best][0], "baseline": configs[BASELINE][0], "diff": d, "lo": lo, "hi": hi}
        say(f"report draw: '{configs[best][0]}' external pick {summary[-1]['external_picked']:.1%}")
    seen, ceil = {}, []
    for _, acfg in configs:
        key = prior_key(acfg)
        if key not in seen:
            seen[key] = True
            ceil.append(ceiling(key, acfg, bundle, scorer, targets, device))
    pd.concat(trials, ignore_index=True).to_csv(run_dir / "whitebox_trials.csv", index=False)
    summary_df, ceil_df = pd.DataFrame(summary), pd.DataFrame(ceil)
    summary_df.to_csv(run_dir / "whitebox_summary.csv", index=False)
    ceil_df.to_csv(run_dir / "ceilings.csv", index=False)
    print(write_report(run_dir, summary_df, ceil_df, paired, 5 / bundle.n_eval))
    say(f"outputs: {run_dir} ({time.time() - t0:.0f}s)")
    return run_dir
