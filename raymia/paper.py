"""Every reference number of the two papers raymia reproduces, in one place.

Reports print ours beside these; nothing else in raymia hard-codes a paper number."""
from __future__ import annotations

#: Kotsuji & Nakamura (VISAPP 2025), §5.2 / Fig. 5 (VGGFace2, 27 targets x 3 trials)
PAPER_DUMMY = {"rt_accuracy": 0.958, "mia_success_alpha1": 0.80, "alpha_recommended": 0.25,
               "mia_success_at_recommended": 0.27, "accuracy_at_recommended": 0.95}


def dummy_headline() -> str:
    """The dummy-model paper's headline as one sentence for reports and logs."""
    p = PAPER_DUMMY
    return (f"paper: R_T {p['rt_accuracy']:.1%}, MIA {p['mia_success_alpha1']:.0%} at alpha=1, "
            f"<={p['mia_success_at_recommended']:.0%} at alpha={p['alpha_recommended']:g} "
            f"with accuracy > {p['accuracy_at_recommended']:.0%}")
