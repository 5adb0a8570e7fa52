"""Threat panel: the query attacks (black-box NES, label-only) against their query budget,
for each deployment setting -- R_T alone, the dummy defense at its deployed α, Algorithm 2 at
Table 1's configurations, the robust detector, and the dummy defense behind a filter --
judged by R_E and the independent judges.

Every setting attacks the same rows (known targets x ``threat_panel.restarts``, the same
row seeds), so the settings are compared paired.  The released model is the one Serve would
serve (:func:`raymia.serving.plan.resolve_plan` + ``load_serving_model``: the α of the α
sweep's recommendation unless ``serve.alpha`` says otherwise); the filters are the library
detectors Serve runs, each row one client, and a refused query ends its row as a 403 does.
A row's reconstruction is judged where the attack ended: at its budget, or at the block.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..artifacts import write_run_record
from ..config import Config
from ..evaluation import bootstrap_ci
from ..runtime import out_dir, pick_device, seed_everything

BASE_KINDS = ("target", "evaluator", "attacker_gan")
JUDGES = (("R_E", "success_top5"), ("external", "external_top5"), ("classical", "classical_top5"))
ATTACK_NAMES = {"nes": "black-box (NES)", "label": "label-only"}


def say(msg: str) -> None:
    print(f"[threat_panel] {msg}", flush=True)


def split_setting(name: str) -> tuple[bool, Optional[str]]:
    """``"dummy+raha3"`` -> (True, "raha3"); ``"none"`` -> (False, None)."""
    if name in ("none", "dummy"):
        return name == "dummy", None
    if name.startswith("dummy+"):
        return True, name[len("dummy+"):]
    return False, name


def gate_factory(cfg: Config, filt: str) -> Callable:
    """A fresh :class:`~raymia.filter_sim.redteam.Gate` per call for filter ``filt``:
    ``raha<k>`` = Algorithm 2 at Table 1's configuration k (N_B, T_ssim, T_hash; L_sp and the
    rest from the ``filter`` section), ``robust`` = the ``robust_filter`` section."""
    from ..defenses.filter import FilterParams
    from ..defenses.filter.robust import RobustParams
    from ..filter_sim.redteam import Gate
    from ..paper import PAPER_TABLE1
    if filt == "robust":
        params = RobustParams.from_config(cfg.robust_filter)
    else:
        row = next(r for r in PAPER_TABLE1 if f"raha{r['config']}" == filt)
        params = FilterParams.from_config(cfg.filter, n_b=row["n_b"], t_ssim=row["t_ssim"], t_hash=row["t_hash"])
    return lambda: Gate(params)


def released_plan(cfg: Config, model: str):
    """What Serve would serve with ``serve.model = model`` (``target`` or ``combined``)."""
    import copy

    from ..serving.plan import resolve_plan
    c = copy.deepcopy(cfg)
    c.serve.model = model
    return resolve_plan(c)


def released_models(cfg: Config, settings: list, device) -> tuple[dict, Optional[dict]]:
    """{"target": R_T as softmax, "dummy": R' at its deployed α (only if a setting needs it)}
    and the dummy's serving plan (None without one).  A missing recommendation or R_dmy
    raises :class:`~raymia.serving.plan.ServeSetupError` naming the command that makes it."""
    from ..serving.plan import load_serving_model
    models, plan_info = {}, None
    models["target"] = load_serving_model(released_plan(cfg, "target"), device)[0].eval()
    if any(split_setting(s)[0] for s in settings):
        plan = released_plan(cfg, "combined")
        models["dummy"] = load_serving_model(plan, device)[0].eval()
        plan_info = {"variant": plan.variant, "alpha": plan.alpha, "alpha_source": plan.alpha_source}
    return models, plan_info


def rows_of(cfg: Config, bundle, restarts: Optional[int] = None) -> tuple[list, list]:
    """(targets, seeds) of the panel's rows: every known target x ``restarts`` (default
    ``threat_panel.restarts``), row seed = threat_panel.seed + 1000 run.seed + 10 target + restart."""
    tp = cfg.threat_panel
    r = tp.restarts if restarts is None else restarts
    known = bundle.known_targets()
    return ([t for t in known for _ in range(r)],
            [tp.seed + 1000 * cfg.run.seed + 10 * t + i for t in known for i in range(r)])


def panel_rows(models: dict, gates: dict, F, scorer, targets: list, seeds: list, settings: list, attacks: list,
               budgets: list, qa, bound: float, n_classes: int, device) -> list:
    """One row per (attack, setting, budget, attack row): queries answered, the number of
    the refused query (0 = never), and every judge's top-1/top-5 verdict on the row's
    reconstruction.  ``models``: {"target", "dummy"}; ``gates``: filter name -> Gate factory."""
    from ..attacks.oracle import InProcessOracle
    from ..attacks.query import run_query_attack
    from ..filter_sim.redteam import GatedOracle
    n, rows = len(targets), []
    for attack in attacks:
        for setting in settings:
            dummy, filt = split_setting(setting)
            t0 = time.time()
            for budget in budgets:
                inner = InProcessOracle(models["dummy" if dummy else "target"], n, n_classes,
                                        labels_only=(attack == "label"), device=device)
                oracle = inner if filt is None else GatedOracle(inner, gates[filt](), [f"row-{r}" for r in range(n)])
                res = run_query_attack(attack, oracle, F, targets, seeds, int(budget), qa, bound, device)
                verdict = scorer.score(res.images, targets)
                for r in range(n):
                    rows.append({"attack": attack, "setting": setting, "budget": int(budget), "row": r,
                                 "target": targets[r], "seed": seeds[r], "answered": int(res.queries[r]),
                                 "blocked_at": int(res.blocked_at[r]),
                                 **{k: float(v[r]) for k, v in verdict.items() if k.endswith(("top1", "top5"))}})
            say(f"{ATTACK_NAMES[attack]} / {setting}: {time.time() - t0:.0f}s, R_E top-5 at budget "
                f"{budgets[-1]}: {np.mean(verdict['success_top5']):.0%}")
    return rows


def summarize(df: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (attack, setting, budget): rows, rows blocked, median queries answered, and per
    judge the per-trial top-5 (mean over targets of the mean over restarts) with its 95%
    bootstrap CI over targets."""
    out = []
    for (attack, setting, budget), g in df.groupby(["attack", "setting", "budget"], sort=False):
        rec = {"attack": attack, "setting": setting, "budget": int(budget), "rows": len(g),
               "blocked": int((g["blocked_at"] > 0).sum()), "answered_median": float(g["answered"].median())}
        for label, col in JUDGES:
            if col in g:
                per_t = g.groupby("target")[col].mean().to_numpy(float)
                lo, hi = bootstrap_ci(per_t, n_boot, seed)
                rec.update({label: float(per_t.mean()), f"{label}_lo": lo, f"{label}_hi": hi})
        out.append(rec)
    return pd.DataFrame(out)


def paired_vs_none(df: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (attack, setting, budget) and judge: the setting's per-target top-5 minus the
    undefended one's on the same rows, with its paired 95% bootstrap CI (empty without a
    ``none`` setting)."""
    from ..evaluation import paired_bootstrap_diff
    if "none" not in set(df["setting"]):
        return pd.DataFrame()
    base = {k: g.groupby("target") for k, g in df[df.setting == "none"].groupby(["attack", "budget"])}
    out = []
    for (attack, setting, budget), g in df[df.setting != "none"].groupby(["attack", "setting", "budget"], sort=False):
        b = base.get((attack, budget))
        if b is None:
            continue
        rec = {"attack": attack, "setting": setting, "budget": int(budget)}
        for label, col in JUDGES:
            if col in g:
                x, y = b[col].mean(), g.groupby("target")[col].mean()
                d, lo, hi = paired_bootstrap_diff(x.to_numpy(float), y.loc[x.index].to_numpy(float), n_boot, seed)
                rec.update({f"{label}_diff": d, f"{label}_diff_lo": lo, f"{label}_diff_hi": hi})
        out.append(rec)
    return pd.DataFrame(out)


def report(summary: pd.DataFrame, cfg: Config, plan_info: Optional[dict], chance: float,
           paired: Optional[pd.DataFrame] = None) -> str:
    budgets = sorted(summary["budget"].unique())
    md = [f"# Threat panel ({cfg.data.name}, seed {cfg.run.seed})", "",
          f"Rows per setting: {int(summary['rows'].iloc[0])} (known targets x {cfg.threat_panel.restarts}), "
          f"the same rows and seeds in every setting. Top-5 chance {chance:.1%}. Each cell: R_E / external / "
          "classical top-5 per trial, then the median queries answered and the rows blocked.",
          "" if plan_info is None else
          f"The dummy defense: variant `{plan_info['variant']}` at α = {plan_info['alpha']:g} "
          f"(from {plan_info['alpha_source']}).", ""]
    for attack, ga in summary.groupby("attack", sort=False):
        md += [f"## {ATTACK_NAMES[attack]}", "", "| setting | " + " | ".join(f"{b} queries" for b in budgets) + " |",
               "|---|" + "---|" * len(budgets)]
        for setting, gs in ga.groupby("setting", sort=False):
            cells = []
            for b in budgets:
                r = gs[gs["budget"] == b]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                cells.append(" / ".join(f"{100 * r[j]:.0f}%" for j, _ in JUDGES if j in r)
                             + f" ({r['answered_median']:.0f} answered, {r['blocked']}/{r['rows']} blocked)")
            md.append(f"| {setting} | " + " | ".join(cells) + " |")
        md.append("")
    if paired is not None and not paired.empty:
        top = int(paired["budget"].max())
        md += [f"## Paired against no defense, {top} queries (setting minus none, points, 95% CI)", "",
               "| attack | setting | " + " | ".join(j for j, _ in JUDGES) + " |", "|---|---|" + "---|" * len(JUDGES)]
        for r in paired[paired["budget"] == top].itertuples():
            md.append(f"| {ATTACK_NAMES[r.attack]} | {r.setting} | " + " | ".join(
                f"{100 * getattr(r, f'{j}_diff'):+.0f} [{100 * getattr(r, f'{j}_diff_lo'):+.0f}, "
                f"{100 * getattr(r, f'{j}_diff_hi'):+.0f}]" for j, _ in JUDGES) + " |")
        md.append("")
    md.append("CIs (95%, bootstrap over targets) are in threat_summary.csv and threat_paired.csv.")
    return "\n".join(md) + "\n"


def run(cfg: Config, out: Optional[str] = None, address: Optional[str] = None) -> Path:
    """Writes threat_rows.csv, threat_summary.csv, threat_paired.csv and threat_panel.md to ``out`` (default
    <out_root>/<run.name>/threat_panel).  Trains missing R_T / R_E / F first; the dummy
    settings need the α sweep's recommendation and R_dmy (`make demo`)."""
    from ..data import load_bundle
    from ..distributed.training import ensure_artifacts
    from ..evaluation import make_scorer
    from ..kinds import artifact_dir
    from ..models import freeze
    from ..training import load_generator
    tp = cfg.threat_panel
    run_dir = out_dir(cfg, out, "threat_panel")
    if any(split_setting(s)[0] for s in tp.settings):     # fail before any training, naming `make demo`
        released_plan(cfg, "combined")
    ensure_artifacts(cfg, BASE_KINDS, address, "threat_panel")
    device = pick_device(cfg.run.device)
    models, plan_info = released_models(cfg, tp.settings, device)
    write_run_record(run_dir, cfg, {"dummy": plan_info})
    seed_everything(cfg.run.seed)
    bundle = load_bundle(cfg.data)
    scorer = make_scorer(cfg, bundle, device)
    F = freeze(load_generator(artifact_dir(cfg, "attacker_gan"), device)[0])
    targets, seeds = rows_of(cfg, bundle)
    filters = {split_setting(s)[1] for s in tp.settings} - {None}
    gates = {f: gate_factory(cfg, f) for f in filters}
    t0 = time.time()
    df = pd.DataFrame(panel_rows(models, gates, F, scorer, targets, seeds, list(tp.settings), list(tp.attacks),
                                 sorted(int(b) for b in tp.budgets), cfg.query_attack, cfg.attack.latent_bound,
                                 bundle.n_private, device))
    df.to_csv(run_dir / "threat_rows.csv", index=False)
    summary = summarize(df, cfg.sweep.bootstrap, cfg.run.seed)
    summary.to_csv(run_dir / "threat_summary.csv", index=False)
    paired = paired_vs_none(df, cfg.sweep.bootstrap, cfg.run.seed)
    paired.to_csv(run_dir / "threat_paired.csv", index=False)
    (run_dir / "threat_panel.md").write_text(report(summary, cfg, plan_info, 5 / bundle.n_eval, paired))
    say(f"done in {time.time() - t0:.0f}s; outputs in {run_dir}")
    return run_dir
