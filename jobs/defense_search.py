"""Defense search with the attack in the loop: a Ray Tune search over the dummy-model
defense's design, every trial training its R_dmy and attacking the released model over
the alpha grid; then the best defense and the paper / calibrated baselines are checked
with several seeds against the naive and an adaptive (EOT) attacker.

    python jobs/defense_search.py [--preset orl] [--set search.num_samples=20] [--out DIR]
    python jobs/defense_search.py --search-only | --check-only [--local]
    ray job submit --working-dir . -- python jobs/defense_search.py

Resumable: both Tune experiments live under OUT/tune/ and a rerun continues them.
The work is :func:`raymia.pipelines.defense_search.run`; also ``raymia-defense-search``."""
from raymia.cli import defense_search

if __name__ == "__main__":
    defense_search()
