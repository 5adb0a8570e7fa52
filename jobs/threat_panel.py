"""Threat panel: the black-box (NES) and label-only attacks' success against their query
budget, for R_T alone, the dummy defense at its deployed alpha, Algorithm 2 at Table 1's
configurations, the robust detector, and the dummy defense behind a filter.

    python jobs/threat_panel.py [--preset orl] [--set threat_panel.budgets=[500,2000]] [--out DIR]
    ray job submit --working-dir . -- python jobs/threat_panel.py

Needs the alpha sweep's recommendation and R_dmy for the dummy settings (`make demo`);
missing R_T / R_E / F are trained first (Ray Tune, cached).  Outputs in OUT (default
<out_root>/<run.name>/threat_panel): threat_panel.md, threat_summary.csv, threat_rows.csv.
The work is :func:`raymia.pipelines.threat_panel.run`; also ``raymia-threat-panel``."""
from raymia.cli import threat_panel

if __name__ == "__main__":
    threat_panel()
