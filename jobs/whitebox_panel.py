"""White-box attack panel (the attack issue's first goal: a white-box attack that leaks identity).

    python jobs/whitebox_panel.py [--preset orl] [--set whitebox.restarts=2] [--out DIR]
    ray job submit --working-dir . -- python jobs/whitebox_panel.py

Every attempt of ``whitebox.panel`` (the attacker's F, eigenface and mixed priors, pixels,
total variation, latent norm, augmentation in the loss, more iterations, victims trained
with a larger margin or adversarially) attacks R_T's targets at alpha = 1 with the same
restarts; R_E, the external face recognizer and the eigenfaces + SVM judge score each
reconstruction and the restart the attacker keeps.  The best attempt by the external judge
is run again on fresh restarts beside the alpha sweep's attack (paired).  Ceilings: the
targets' own photos projected into each prior.  Missing models are trained first (Ray Tune,
cached).  Outputs in OUT (default <out_root>/<run.name>/whitebox_panel): whitebox_panel.md,
whitebox_summary.csv, whitebox_trials.csv, ceilings.csv.  The work is
:func:`raymia.pipelines.whitebox_panel.run`; also ``raymia-whitebox-panel``."""
from raymia.cli import whitebox_panel

if __name__ == "__main__":
    whitebox_panel()
