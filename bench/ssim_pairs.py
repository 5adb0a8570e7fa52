"""SSIM over all same-label pairs of a filter setting's images (the statistic behind
docs/filter.md's "no regular user who sends distinct images can reach T_ssim"):

    python bench/ssim_pairs.py --preset filter_mnist,filter_orl --out docs/ssim_pairs.md

Per setting and image pool (``all``: R_T's training + held-out images of each label, what
the sequence users send; ``test``: the held-out images, the paper protocol's) and per SSIM
variant of the sweep (skimage's default with L = 1, L = 255 on [0, 1] images, the 11x11
Gaussian window of TF / Wang et al.): the number of pairs, the largest SSIM, quantiles
and the share of pairs above each of the filter's thresholds.  Writes a markdown table."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from raymia.config import load_config
from raymia.filter_sim.pairs import VARIANTS, pair_stats, pairs_table, pools_of, same_label_ssim


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="filter_mnist,filter_orl")
    ap.add_argument("--pool", choices=["all", "test", "both"], default="both")
    ap.add_argument("--variants", default="0,1,2", help="indices into the SSIM variants (0: L=1, 1: L=255, 2: gaussian)")
    ap.add_argument("--set", action="append", default=[], help="config overrides, as the jobs' --set")
    ap.add_argument("--out", default="", help="markdown file to write (default: print only)")
    a = ap.parse_args(argv)
    rows = []
    for preset in [p for p in a.preset.split(",") if p]:
        cfg = load_config(preset, a.set)
        for pool in (["all", "test"] if a.pool == "both" else [a.pool]):
            pools = pools_of(cfg, pool)
            for i in [int(v) for v in a.variants.split(",")]:
                name, dr, win = VARIANTS[i]
                t = time.time()
                st = pair_stats(same_label_ssim(pools, dr, win))
                rows.append({"setting": preset, "pool": f"{pool} ({sum(map(len, pools.values()))} images, "
                             f"{len(pools)} labels)", "variant": name, **st})
                print(f"[ssim_pairs] {preset} {pool} {name}: {st['pairs']} pairs, max {st['max']:.4f} "
                      f"({time.time() - t:.1f}s)", flush=True)
    text = pairs_table(rows)
    print(text)
    if a.out:
        Path(a.out).write_text(f"<!-- python bench/ssim_pairs.py --preset {a.preset} --pool {a.pool} -->\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
