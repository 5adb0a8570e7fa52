"""Similarity-filter sweep (Raha et al.): Tune grid over (N_B, T_ssim, T_hash, L_sp) with Table 1's configs, attack and regular-user simulations on Ray actors, tables beside the paper's.

    python jobs/filter_sweep.py [--preset filter_mnist,filter_orl] [--set filter_sim.max_iters=2000] [--out DIR]
    ray job submit --working-dir . -- python jobs/filter_sweep.py

--preset takes one preset or a comma-separated list (one "setting" each; default: MNIST-5k
with LeNet5 and ORL faces with the small CNN); --set applies to every setting.  Missing
R_T / R_E are trained first (Ray Tune, cached by config hash).  Each simulated session
("unit") is written to OUT/units/ when done: a rerun skips finished units.

Outputs in OUT (default <out_root>/filter_sweep): filter_trials.parquet (one row per
simulated trial and config), filter_summary.csv (one row per config), tables.md,
detection_vs_fpr.png, max_iters_per_label_<setting>.png, noise.png, calibration.json.
The work is :func:`raymia.pipelines.filter_sweep.run`; also ``raymia-filter-sweep``."""
from raymia.cli import filter_sweep

if __name__ == "__main__":
    filter_sweep()
