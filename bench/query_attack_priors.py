"""The query attacks (black-box NES, label-only) with the attacker's generator F or an
eigenface prior of the auxiliary faces, on the undefended R_T of a preset at the default
budgets (query_attack.*): every known target x restarts, judged by R_E, the external face
judge and the classical judge (per-trial top-5, 95% bootstrap CI over targets).  Numbers
in docs/attacks.md.  Needs the preset's artifacts (`make train`).

    python bench/query_attack_priors.py [--preset orl] [--priors gan,linear100] [--restarts 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.artifacts import write_run_record  # noqa: E402
from raymia.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="orl")
    p.add_argument("--attacks", default="nes,label", help="comma list of nes, label")
    p.add_argument("--priors", default="gan,linear100", help="comma list of gan, linear<components>")
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--seed", type=int, default=5000, help="first row seed (row seed = seed + 10 target + restart)")
    p.add_argument("--out", default="runs/bench/query_attack_priors")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.preset, a.set)
        attacks, priors = a.attacks.split(","), a.priors.split(",")
        for x in attacks:
            if x not in ("nes", "label"):
                raise ConfigError(f"unknown attack {x!r} (nes, label)")
        for x in priors:
            if x != "gan" and not (x.startswith("linear") and x[6:].isdigit()):
                raise ConfigError(f"unknown prior {x!r} (gan, linear<components>)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    from raymia.attacks.query import run_query_attack
    from raymia.attacks.oracle import InProcessOracle
    from raymia.attacks.priors import LinearPrior
    from raymia.data import load_bundle
    from raymia.evaluation import bootstrap_ci, make_scorer
    from raymia.kinds import artifact_dir
    from raymia.models import ProbModel, freeze
    from raymia.runtime import pick_device
    from raymia.training import load_classifier, load_generator
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg)
    dev = pick_device(cfg.run.device)
    bundle = load_bundle(cfg.data)
    rt = ProbModel(freeze(load_classifier(artifact_dir(cfg, "target"), dev)[0])).eval()
    F = freeze(load_generator(artifact_dir(cfg, "attacker_gan"), dev)[0])
    scorer = make_scorer(cfg, bundle, dev)
    known = bundle.known_targets()
    targets = [t for t in known for _ in range(a.restarts)]
    seeds = [a.seed + 10 * t + i for t in known for i in range(a.restarts)]
    qa, bound = cfg.query_attack, cfg.attack.latent_bound
    rows = []
    for pname in priors:
        G = F if pname == "gan" else freeze(LinearPrior.fit(bundle.aux.x, int(pname[6:])).to(dev))
        for att in attacks:
            t0 = time.time()
            o = InProcessOracle(rt, len(targets), bundle.n_private, labels_only=(att == "label"), device=dev)
            res = run_query_attack(att, o, G, targets, seeds, qa.budget if att == "nes" else qa.label_budget,
                                   qa, bound, dev)
            verdicts = scorer.score(res.images, targets)
            row = {"prior": pname, "attack": att, "rows": len(targets), "targets": len(known),
                   "mean_queries": float(res.queries.mean()), "seconds": round(time.time() - t0, 1)}
            if res.extra and "found" in res.extra:
                row["start_found"] = float(np.mean(res.extra["found"]))
            for col, v in verdicts.items():
                if col.endswith("top5"):
                    per_t = pd.Series(np.asarray(v, float)).groupby(np.asarray(targets)).mean().to_numpy()
                    lo, hi = bootstrap_ci(per_t, cfg.sweep.bootstrap, cfg.run.seed)
                    row.update({col: float(per_t.mean()), f"{col}_lo": lo, f"{col}_hi": hi})
            print(json.dumps(row), flush=True)
            rows.append(row)
    pd.DataFrame(rows).to_csv(out / "query_attack_priors.csv", index=False)
    print(f"chance: {5 / bundle.n_eval:.3f}; written to {out / 'query_attack_priors.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
