"""Red team of the similarity filters (Algorithm 2 and the robust detector).

    python jobs/red_team.py [--preset orl] [--set red_team.benign_sessions=600] [--no-attacks] [--out DIR]
    ray job submit --working-dir . -- python jobs/red_team.py

Calibrates the robust detector's thresholds on one half of the benign identities (to
red_team.fpr_target), reports false positives on the other half, then runs every
near-duplicate strategy (dither, noise, shifts, rotations, photometric, JPEG, a mix; with
decoys, slowly, with fresh ids), the adaptive attacker and the black-box / label-only attacks
against raha, robust and robust + cross-client window.  Missing R_T / R_E / F are trained
first (Ray Tune, cached).  Outputs in OUT (default <out_root>/<run.name>/red_team):
red_team.md, calibration.csv, benign_fpr.csv, strategies.csv, adaptive.csv, attacks.csv,
robust_filter.json.  The work is :func:`raymia.pipelines.red_team.run`; also ``raymia-red-team``."""
from raymia.cli import red_team

if __name__ == "__main__":
    red_team()
