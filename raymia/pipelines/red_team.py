"""Red-team pipeline for the stateful filters: calibrate the robust detector on one half of
the benign identities, report false positives on the other half, then attack Algorithm 2
(``raha``, the ``filter`` section), the calibrated ``robust`` detector and ``robust`` with
the cross-client window with every near-duplicate strategy, the adaptive attacker, and the
black-box and label-only attacks (judged by R_E and the independent judges at the moment
they are blocked, beside the same attacks unfiltered)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..artifacts import write_run_record
from ..config import Config
from ..defenses.filter import FilterParams
from ..defenses.filter.robust import CrossClientWindow, RobustParams
from ..filter_sim import redteam as R
from ..runtime import out_dir, pick_device, seed_everything

ATTACK_KINDS = ("target", "evaluator", "attacker_gan")
EVASIVE = "robust, evasive attacker"      # the robust gate, every query disguised by the adaptive attacker
FEATURE = "robust+feature"                 # the robust gate with the feature rule (R_T's embedding) calibrated on top
EVASIVE_FEATURE = "robust+feature, evasive attacker"


def say(msg: str) -> None:
    print(f"[red_team] {msg}", flush=True)


def benign_pools(bundle):
    """Identity -> held-out photos (R_T's and R_E's test images; none of them trained R_T),
    and the popular images (the attacker's auxiliary set: faces nobody here owns)."""
    photos = {}
    for tag, split in (("private", bundle.private_test), ("eval", bundle.eval_test)):
        x, y = split.x.numpy(), split.y.numpy()
        for c in np.unique(y):
            photos[(tag, int(c))] = x[y == c]
    return photos, bundle.aux.x.numpy()


def calibrate(cal_stream, base: RobustParams, t_bits_grid, l_sp_grid, window_grid, fpr_target: float,
              l_near_grid=()):
    """Every (t_bits, l_sp, window) of the grid on the calibration traffic; the chosen one
    blocks at most ``fpr_target`` of the sessions and is the most sensitive such (fewest
    strikes, no decay before a decay window, then the widest t_bits).  Second stage: with
    that pick, every ``l_near`` of ``l_near_grid``; the smallest that still blocks at most
    ``fpr_target`` is added (none: the cluster rule stays off).  Returns (table, chosen
    params); the table's ``stage`` column says which stage a row belongs to."""
    rows = []
    for t in t_bits_grid:
        for l in l_sp_grid:
            for w in window_grid:
                p = dataclasses.replace(base, t_bits=int(t), l_sp=int(l), window=int(w), l_near=0)
                fp = R.false_positives(R.Gate(p), cal_stream)
                rows.append({"stage": 1, "t_bits": int(t), "l_sp": int(l), "window": int(w), "l_near": 0, **fp})
    table = pd.DataFrame(rows)
    table["decay"] = table.window > 0
    ok = table[table.fpr_blocked <= fpr_target].sort_values(["l_sp", "decay", "window", "t_bits"],
                                                            ascending=[True, True, False, False])
    pick = ok.iloc[0] if len(ok) else table.sort_values(["fpr_blocked", "l_sp"]).iloc[0]
    chosen = dataclasses.replace(base, t_bits=int(pick.t_bits), l_sp=int(pick.l_sp), window=int(pick.window),
                                 l_near=0)
    near = []
    for n in sorted(int(v) for v in l_near_grid):
        p = dataclasses.replace(chosen, l_near=n)
        fp = R.false_positives(R.Gate(p), cal_stream)
        near.append({"stage": 2, "t_bits": p.t_bits, "l_sp": p.l_sp, "window": p.window, "l_near": n, **fp})
    fits = [r["l_near"] for r in near if r["fpr_blocked"] <= fpr_target]
    if fits:
        chosen = dataclasses.replace(chosen, l_near=min(fits))
    table = pd.concat([table.drop(columns="decay"), pd.DataFrame(near)], ignore_index=True)
    return table, chosen


def calibrate_features(cal_stream, chosen: RobustParams, feat_sim_grid, feat_k_grid, fpr_target: float, embed):
    """Third stage: the fingerprint pick ``chosen`` plus the feature rule at every
    (feat_sim, feat_k) of the grid on the calibration traffic; the chosen one keeps the
    share of blocked sessions within ``fpr_target`` (or, when ``chosen`` alone already
    blocks more, blocks no session more than it) and is the most sensitive such (fewest
    neighbours, then the lowest similarity).  Returns (rows, params or None when none fits)."""
    limit = max(fpr_target, R.false_positives(R.Gate(chosen), cal_stream)["fpr_blocked"])
    rows = []
    feats = R.Gate(dataclasses.replace(chosen, feat_k=1), embed=embed).features([img for _, img in cal_stream])
    for k in sorted(int(v) for v in feat_k_grid):
        for sim in sorted(float(v) for v in feat_sim_grid):
            p = dataclasses.replace(chosen, feat_k=k, feat_sim=sim)
            fp = R.false_positives(R.Gate(p, embed=embed), cal_stream, feats)   # embeddings computed once
            rows.append({"stage": 3, "t_bits": p.t_bits, "l_sp": p.l_sp, "window": p.window, "l_near": p.l_near,
                         "feat_k": k, "feat_sim": sim, **fp})
    fits = [r for r in rows if r["fpr_blocked"] <= limit]
    pick = min(fits, key=lambda r: (r["feat_k"], r["feat_sim"])) if fits else None
    return rows, (None if pick is None else dataclasses.replace(chosen, feat_k=pick["feat_k"],
                                                                feat_sim=pick["feat_sim"]))


def _gates(cfg: Config, robust: RobustParams, featured: Optional[RobustParams] = None, embed=None) -> dict:
    rf = cfg.robust_filter
    gates = {"raha": lambda: R.Gate(FilterParams.from_config(cfg.filter)),
             "robust": lambda: R.Gate(robust),
             "robust+cross": lambda: R.Gate(robust, CrossClientWindow(robust, rf.cross_window, rf.cross_k))}
    if featured is not None:
        gates[FEATURE] = lambda: R.Gate(featured, embed=embed)
    return gates


def _fpr_rows(gates: dict, stream) -> list:
    out = []
    for name, make in gates.items():
        fp = R.false_positives(make(), stream)
        lo, hi = R.clopper_pearson(fp["blocked"], fp["sessions"])
        rlo, rhi = R.clopper_pearson(fp["refused_any"], fp["sessions"])
        out.append({"filter": name, **fp, "fpr_blocked_lo": lo, "fpr_blocked_hi": hi,
                    "fpr_refused_lo": rlo, "fpr_refused_hi": rhi})
    return out


def strategy_rows(gates: dict, faces: np.ndarray, decoys: np.ndarray, n_attack: int, seed: int) -> list:
    rows = []
    for sname, (sdesc, make) in R.NEAR_DUPLICATES.items():
        for stream, (tdesc, n_decoys, fresh) in R.STREAMS.items():
            for gname, gate in gates.items():
                for k, face in enumerate(faces):
                    q = R.strategy_queries(face, decoys, make, n_attack, n_decoys, fresh,
                                           np.random.default_rng(seed + 1000 * k))
                    r = R.run_stream(gate(), q)
                    rows.append({"strategy": sname, "stream": stream, "filter": gname, "face": k,
                                 "answered": r.answered_attack, "first_refused": r.first_refused,
                                 "queries_at_block": r.total_queries_at_block, "n_attack": n_attack,
                                 "description": f"{sdesc}; {tdesc}"})
    return rows


def adaptive_rows(robust: RobustParams, faces: np.ndarray, n_attack: int, candidates: int, seed: int,
                  gates: Optional[dict] = None) -> list:
    """The adaptive stream of each face (it evades ``robust``'s fingerprint) against the
    robust gate and, in ``gates``, the robust gate with the feature rule."""
    rows = []
    for k, face in enumerate(faces):
        qs, ssims, dists = R.adaptive_queries(face, robust, n_attack, np.random.default_rng(seed + k), candidates)
        ok = [s for s, d in zip(ssims, dists) if d > robust.t_bits]
        against = {"robust": lambda: R.Gate(robust), **{g: m for g, m in (gates or {}).items() if g == FEATURE}}
        for gname, make in against.items():
            r = R.run_stream(make(), [("adaptive", q, True) for q in qs])
            rows.append({"face": k, "filter": gname, "answered": r.answered_attack, "first_refused": r.first_refused,
                         "n_attack": n_attack, "evading_queries": len(ok), "ssim_mean": float(np.mean(ssims)),
                         "ssim_min": float(np.min(ssims))})
    return rows


def attack_rows(cfg: Config, bundle, gates: dict, device, robust: Optional[RobustParams] = None) -> list:
    """Black-box (NES) and label-only attacks on R_T alone, unfiltered and behind each gate,
    and (with ``robust``) behind the robust detector (and the robust detector with the
    feature rule, when ``gates`` has it) with every query disguised by the adaptive
    attacker (:class:`~raymia.filter_sim.redteam.EvasiveOracle`, which evades ``robust``'s
    fingerprint); each row's reconstruction is judged at its end (for a blocked row: at
    the block)."""
    from ..attacks.blackbox import blackbox_mia
    from ..attacks.label_only import label_only_mia
    from ..attacks.oracle import InProcessOracle
    from ..evaluation import make_scorer
    from ..kinds import artifact_dir
    from ..models import ProbModel, freeze
    from ..training import load_classifier, load_generator
    rt = ProbModel(freeze(load_classifier(artifact_dir(cfg, "target"), device)[0])).eval()
    F = freeze(load_generator(artifact_dir(cfg, "attacker_gan"), device)[0])
    scorer = make_scorer(cfg, bundle, device)
    qa, rtc = cfg.query_attack, cfg.red_team
    n = rtc.attack_rows
    targets = [r % bundle.n_private for r in range(n)]
    seeds = [cfg.run.seed * 7919 + 9000 + r for r in range(n)]
    attacks = {
        "black-box (NES)": (False, lambda o: blackbox_mia(o, F, targets, seeds, budget=rtc.attack_budget,
                                                          pairs=qa.nes_pairs, sigma=qa.nes_sigma, lr=qa.nes_lr,
                                                          bound=cfg.attack.latent_bound, device=device)),
        "label-only": (True, lambda o: label_only_mia(o, F, targets, seeds, budget=rtc.attack_budget,
                                                      points=qa.label_points, r0=qa.label_r0,
                                                      growth=qa.label_growth, r_max=qa.label_r_max,
                                                      step=qa.label_step, init_batch=qa.label_init_batch,
                                                      init_budget=min(qa.label_init_budget, rtc.attack_budget),
                                                      bound=cfg.attack.latent_bound, device=device)),
    }
    runs = [("none", None, False)] + [(g, make, False) for g, make in gates.items()]
    if robust is not None:
        runs.append((EVASIVE, gates["robust"], True))
        if FEATURE in gates:
            runs.append((EVASIVE_FEATURE, gates[FEATURE], True))
    rows = []
    for aname, (labels_only, run) in attacks.items():
        for gname, gate, evasive in runs:
            t0 = time.time()
            inner = InProcessOracle(rt, n, bundle.n_private, labels_only=labels_only, device=device)
            oracle = inner if gate is None else R.GatedOracle(inner, gate(), [f"row-{r}" for r in range(n)])
            if evasive:
                oracle = R.EvasiveOracle(oracle, robust, cfg.run.seed, rtc.adaptive_candidates)
            res = run(oracle)
            s = scorer.score(res.images, targets)
            for r in range(n):
                ssim = float(np.mean(oracle.ssim[r])) if evasive and oracle.ssim[r] else float("nan")
                rows.append({"attack": aname, "filter": gname, "row": r, "target": targets[r], "seed": seeds[r],
                             "answered": int(oracle.answered[r]), "blocked_at": int(oracle.blocked_at[r]),
                             "disguise_ssim": ssim,
                             **{k: float(v[r]) for k, v in s.items() if k.endswith(("top1", "top5"))}})
            if labels_only and gate is None and "start_latent" in res.extra:
                # where the label-only attack's success comes from: its start, the first random
                # draw of F labelled the target (before any near-duplicate query)
                from ..attacks.blackbox import render
                start = scorer.score(render(F, res.extra["start_latent"], device), targets)
                iq = np.asarray(res.extra["init_queries"])
                for r in range(n):
                    rows.append({"attack": f"{aname}: its start point", "filter": gname, "row": r,
                                 "target": targets[r], "seed": seeds[r], "answered": int(iq[r]), "blocked_at": 0,
                                 **{k: float(v[r]) for k, v in start.items() if k.endswith(("top1", "top5"))}})
            say(f"{aname} / filter {gname}: {time.time() - t0:.0f}s, "
                 f"median answered {np.median(oracle.answered):.0f}, R_E top-5 {np.mean(s['success_top5']):.0%}")
    return rows


def _victim_embedder(cfg: Config, device):
    """images (N, C, H, W) numpy -> R_T's unit embeddings (N, D) numpy (the feature rule's view)."""
    import torch
    from ..kinds import artifact_dir
    from ..models import freeze, victim_embedding
    from ..training import load_classifier
    clf = freeze(load_classifier(artifact_dir(cfg, "target"), device)[0]).eval()
    return lambda x: victim_embedding(clf, torch.as_tensor(x, dtype=torch.float32, device=device)).cpu().numpy()


def summarize(out: Path, cfg: Config, robust: RobustParams, calib: pd.DataFrame, fpr: pd.DataFrame,
              strat: pd.DataFrame, adapt: pd.DataFrame, attacks: Optional[pd.DataFrame],
              featured: Optional[RobustParams] = None) -> str:
    feat = (f" With the feature rule ({FEATURE}, third stage): a query whose R_T embedding has cosine "
            f"similarity >= {featured.feat_sim:g} with >= {featured.feat_k} of the client's remembered ones "
            "blocks it." if featured is not None else "")
    md = [f"# Red team ({cfg.data.name}, seed {cfg.run.seed})", "",
          f"Calibrated robust detector (FPR target {cfg.red_team.fpr_target:.1%} of sessions blocked, chosen on the "
          f"calibration half): t_bits {robust.t_bits}, L {robust.l_sp}, window {robust.window or 'none'}, "
          f"l_near {robust.l_near or 'off'}.{feat}", "",
          "## Benign sessions (report half)", "",
          "| filter | sessions | queries | blocked | FPR blocked [95% CI] | any query refused [95% CI] |", "|---|---|---|---|---|---|"]
    for r in fpr.itertuples():
        md.append(f"| {r.filter} | {r.sessions} | {r.queries} | {r.blocked} | {r.fpr_blocked:.2%} "
                  f"[{r.fpr_blocked_lo:.2%}, {r.fpr_blocked_hi:.2%}] | {r.fpr_refused:.2%} "
                  f"[{r.fpr_refused_lo:.2%}, {r.fpr_refused_hi:.2%}] |")
    md += ["", f"## Near-duplicate strategies: attack queries answered (of {strat.n_attack.iloc[0]}), "
           "max over faces", ""]
    piv = strat.groupby(["strategy", "stream", "filter"]).answered.max().unstack("filter")
    cols = list(piv.columns)
    md.append("| strategy | stream | " + " | ".join(cols) + " |")
    md.append("|---|---|" + "---|" * len(cols))
    for (sname, stream), r in piv.iterrows():
        md.append(f"| {sname} | {stream} | " + " | ".join(str(int(r[c])) for c in cols) + " |")
    md += ["", "## Adaptive attacker (knows the robust detector's fingerprint)", "",
           "| face | filter | answered | first refused | queries farther than t_bits | SSIM to the face: mean / min |",
           "|---|---|---|---|---|---|"]
    for r in adapt.itertuples():
        md.append(f"| {r.face} | {r.filter} | {r.answered} of {r.n_attack} | {r.first_refused or '-'} | "
                  f"{r.evading_queries} | "
                  f"{r.ssim_mean:.3f} / {r.ssim_min:.3f} |")
    if attacks is not None and len(attacks):
        judges = [c for c in attacks.columns if c.endswith("top5")]
        md += ["", "## Query attacks on R_T: success at the block (or at the budget)", "",
               "| attack | filter | rows blocked | median answered | " + " | ".join(judges)
               + " | SSIM sent / intended |", "|---|---|---|---|" + "---|" * len(judges) + "---|"]
        for (a, g), d in attacks.groupby(["attack", "filter"], sort=False):
            ss = d["disguise_ssim"].mean() if "disguise_ssim" in d else float("nan")
            md.append(f"| {a} | {g} | {int((d.blocked_at > 0).sum())}/{len(d)} | {d.answered.median():.0f} | "
                      + " | ".join(f"{d[j].mean():.0%}" for j in judges) + f" | {'-' if pd.isna(ss) else f'{ss:.2f}'} |")
    md += ["", "Calibration grid (calibration half): see calibration.csv."]
    text = "\n".join(md) + "\n"
    (out / "red_team.md").write_text(text)
    return text


def run(cfg: Config, out: Optional[str] = None, address: Optional[str] = None, attacks: bool = True) -> Path:
    """Everything above; writes calibration.csv, benign_fpr.csv, strategies.csv,
    adaptive.csv, attacks.csv, red_team.md and robust_filter.json to ``out`` (default
    <out_root>/<run.name>/red_team).  ``attacks=False`` skips the query attacks (no models)."""
    from ..data import load_bundle
    run_dir = out_dir(cfg, out, "red_team")
    write_run_record(run_dir, cfg)
    seed_everything(cfg.run.seed)
    device = pick_device(cfg.run.device)
    if attacks:
        from ..distributed.training import ensure_artifacts
        ensure_artifacts(cfg, ATTACK_KINDS, address, "red_team")
    bundle = load_bundle(cfg.data)
    rt = cfg.red_team
    rng = np.random.default_rng(cfg.run.seed)
    photos, aux = benign_pools(bundle)
    cal_ids, rep_ids = R.split_identities(photos, rng)
    half = len(aux) // 2
    popular_cal, popular_rep = aux[-2 * min(50, half):-min(50, half)], aux[-min(50, half):]
    decoys = np.unique(np.concatenate([aux[:half], bundle.eval_train.x.numpy()]), axis=0)   # unrelated, distinct
    cal = R.interleave(R.benign_sessions(cal_ids, popular_cal, rt.benign_sessions, rng, rt.p_popular, rt.p_heavy),
                       rng, "cal")
    rep = R.interleave(R.benign_sessions(rep_ids, popular_rep, rt.benign_sessions, rng, rt.p_popular, rt.p_heavy),
                       rng, "user")
    t0 = time.time()
    base = dataclasses.replace(RobustParams.from_config(cfg.robust_filter), feat_k=0)   # stage 3 sets the rule
    calib, robust = calibrate(cal, base, rt.t_bits_grid, rt.l_sp_grid, rt.window_grid, rt.fpr_target,
                              rt.l_near_grid)
    calib.to_csv(run_dir / "calibration.csv", index=False)
    (run_dir / "robust_filter.json").write_text(json.dumps(robust.to_dict(), indent=2))
    say(f"calibrated on {len(cal)} benign queries ({rt.benign_sessions} sessions): t_bits "
        f"{robust.t_bits}, L {robust.l_sp}, window {robust.window}, l_near {robust.l_near or 'off'} "
        f"({time.time() - t0:.0f}s)")
    featured, embed = None, None
    if attacks and rt.feat_k_grid:
        embed = _victim_embedder(cfg, device)
        rows3, featured = calibrate_features(cal, robust, rt.feat_sim_grid, rt.feat_k_grid, rt.fpr_target, embed)
        calib = pd.concat([calib, pd.DataFrame(rows3)], ignore_index=True)
        calib.to_csv(run_dir / "calibration.csv", index=False)
        if featured is not None:
            (run_dir / "robust_feature_filter.json").write_text(json.dumps(featured.to_dict(), indent=2))
        say("feature rule: " + (f"feat_k {featured.feat_k}, feat_sim {featured.feat_sim:g}" if featured
                                else f"no (feat_sim, feat_k) of the grid blocks at most {rt.fpr_target:.1%}")
            + f" ({time.time() - t0:.0f}s)")
    gates = _gates(cfg, robust, featured, embed)
    fpr = pd.DataFrame(_fpr_rows(gates, rep))
    fpr.to_csv(run_dir / "benign_fpr.csv", index=False)
    faces = np.stack([photos[k][0] for k in sorted(photos)[:rt.faces]])   # the first identities' first photos
    strat = pd.DataFrame(strategy_rows(gates, faces, decoys, rt.attack_queries, cfg.run.seed))
    strat.to_csv(run_dir / "strategies.csv", index=False)
    say(f"{len(strat)} strategy runs ({time.time() - t0:.0f}s)")
    adapt = pd.DataFrame(adaptive_rows(robust, faces, rt.attack_queries, rt.adaptive_candidates, cfg.run.seed,
                                       gates))
    adapt.to_csv(run_dir / "adaptive.csv", index=False)
    att = None
    if attacks:
        att = pd.DataFrame(attack_rows(cfg, bundle, gates, device, robust))
        att.to_csv(run_dir / "attacks.csv", index=False)
    print(summarize(run_dir, cfg, robust, calib, fpr, strat, adapt, att, featured))
    say(f"outputs: {run_dir}")
    return run_dir


