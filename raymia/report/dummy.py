"""Figures of the dummy-model defense: the paper's Fig. 5 (α sweep) and Fig. 6 (MIA grid),
and the defense search's Pareto plot (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..paper import PAPER_DUMMY  # noqa: E402

VARIANT_STYLE = {"paper": ("tab:red", "o"), "calibrated": ("tab:blue", "s")}
JUDGE_STYLE = {"external": (0, (1, 1)), "classical": (0, (3, 1, 1, 1))}


def alpha_sweep_plot(summary: pd.DataFrame, path, acc_target: float, chance_top5: float,
                     title: str = "") -> Path:
    """Fig. 5 of the dummy-model paper: MIA success (top-5, 95% CI over targets) and
    recognition accuracy of R' against alpha, one pair of curves per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for variant, g in summary.groupby("variant"):
        g = g.sort_values("alpha")
        color, marker = VARIANT_STYLE.get(variant, ("tab:gray", "^"))
        ax.plot(g["alpha"], g["mia_success_top5"], color=color, marker=marker, ms=4,
                label=f"MIA success (R_E), {variant}")
        ax.fill_between(g["alpha"], g["ci_low"], g["ci_high"], color=color, alpha=0.15)
        for judge, ls in JUDGE_STYLE.items():       # the independent judges' verdicts on the same rows
            if f"{judge}_top5" in g:
                ax.plot(g["alpha"], g[f"{judge}_top5"], color=color, ls=ls, marker=marker, ms=2, lw=1,
                        label=f"MIA success ({judge} judge), {variant}")
        ax.plot(g["alpha"], g["accuracy"], color=color, ls="--", label=f"accuracy of R', {variant}")
    ax.axhline(acc_target, color="k", lw=0.8, ls=":", label=f"R_T alone ({acc_target:.1%})")
    ax.axhline(chance_top5, color="gray", lw=0.8, ls="-.", label=f"top-5 chance ({chance_top5:.1%})")
    p = PAPER_DUMMY
    ax.scatter([1.0, p["alpha_recommended"]], [p["mia_success_alpha1"], p["mia_success_at_recommended"]],
               marker="*", s=120, color="goldenrod", zorder=5, label="paper: MIA 80% @1, ≤27% @0.25")
    ax.set_xlabel("α (weight of R_T)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "MIA success (top-5: R_E and the independent judges) and accuracy of R' = αR_T + (1−α)R_dmy")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def _show(ax, img: torch.Tensor) -> None:
    a = img.detach().cpu().float().clamp(0, 1).numpy()
    if a.shape[0] == 1:
        ax.imshow(a[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(a.transpose(1, 2, 0))
    ax.set_xticks([]); ax.set_yticks([])


def mia_grid(path, targets: list, real: dict, anchors: dict, recon: dict, alphas: list,
             variants: list, labels: Optional[dict] = None) -> Path:
    """Fig. 6 of the dummy-model paper: per target a real training image, the synthetic
    anchor and reconstructions at each alpha; one block of columns per variant.
    ``anchors[variant][t]``, ``recon[(variant, alpha, t)]``."""
    cols = 1 + len(variants) * (1 + len(alphas))
    fig, axes = plt.subplots(len(targets), cols, figsize=(cols * 0.95, len(targets) * 1.0 + 0.6), squeeze=False)
    for r, t in enumerate(targets):
        _show(axes[r, 0], real[t])
        axes[r, 0].set_ylabel((labels or {}).get(t, f"ID {t}"), fontsize=7)
        c = 1
        for v in variants:
            _show(axes[r, c], anchors[v][t]); c += 1
            for a in alphas:
                img = recon.get((v, a, t))
                if img is not None:
                    _show(axes[r, c], img)
                else:
                    axes[r, c].axis("off")
                c += 1
    heads = ["real"] + [h for v in variants for h in [f"anchor\n({v})"] + [f"α={a:g}\n{v}" for a in alphas]]
    for c, h in enumerate(heads):
        axes[0, c].set_title(h, fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def pareto_plot(points: pd.DataFrame, front: pd.DataFrame, path, acc_rt: float, tolerance: float) -> Path:
    """Accuracy of R' vs MIA success for every (defense, α) evaluated, the Pareto front,
    the accuracy floor the search keeps (R_T − tolerance) and the paper's headline point."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    styles = {"search": ("tab:gray", "o", 0.45), "check": ("tab:blue", "s", 0.8)}
    for src, g in points.groupby("source"):
        color, marker, a = styles.get(src, ("tab:green", "^", 0.7))
        if src == "check":
            for d, gd in g.groupby("defense"):
                c = {"best": "tab:green", "paper": "tab:red", "calibrated": "tab:blue"}.get(d, color)
                ax.scatter(gd["mia_success_top5"], gd["accuracy"], s=22, marker=marker, color=c, alpha=a,
                           label=f"check: {d} (per seed, per α)")
        else:
            ax.scatter(g["mia_success_top5"], g["accuracy"], s=14, marker=marker, color=color, alpha=a,
                       label="search trials (per α)")
    f = front.sort_values("mia_success_top5")
    ax.step(f["mia_success_top5"], f["accuracy"], where="post", color="k", lw=1.0, label="Pareto front")
    ax.axhline(acc_rt - tolerance, color="k", ls=":", lw=0.8, label=f"accuracy floor (R_T − {tolerance:.0%})")
    p = PAPER_DUMMY
    ax.scatter([p["mia_success_at_recommended"]], [p["accuracy_at_recommended"]], marker="*", s=160,
               color="goldenrod", zorder=5, label="paper: MIA ≤27% at acc >95% (VGGFace2)")
    ax.set_xlabel("MIA success (top-5 of R_E, per trial)")
    ax.set_ylabel("accuracy of R′ on held-out faces")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
