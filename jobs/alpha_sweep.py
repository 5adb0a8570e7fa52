"""The dummy-model defense end to end: train what is missing (R_T, R_E, G, F, R_dmy per
variant), run the batched generator MIA over the alpha grid on Ray Tune attack workers
with an evaluator actor scoring top-5 hits, and write tables, plots and the alpha
recommendation.

    python jobs/alpha_sweep.py [--preset orl] [--set sweep.alpha_step=0.1] [--out DIR]
    python jobs/alpha_sweep.py --set "sweep.attacks=[whitebox,eot,nes,label]"   # the attack dimension
    ray job submit --working-dir . -- python jobs/alpha_sweep.py

Resumable: finished chunks of rows are kept under OUT/rows/ and skipped on rerun.
The work is :func:`raymia.pipelines.alpha_sweep.run`; also ``raymia-alpha-sweep``."""
from raymia.cli import alpha_sweep

if __name__ == "__main__":
    alpha_sweep()
