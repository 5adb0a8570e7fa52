"""How similar distinct images of one label are: SSIM over all same-label pairs of a
setting's images (the docs' evidence that regular users who send distinct images cannot
reach the paper's T_ssim), for the filter's SSIM variants (``bench/ssim_pairs.py``)."""
from __future__ import annotations

import numpy as np

from ..defenses.filter.ssim import SSIMStack, _gauss_valid, _K1, _K2, ssim_batch

#: the SSIM variants of the sweep: (name, data range L on [0, 1] images, window)
VARIANTS = (("skimage default, L = 1", 1.0, "uniform7"), ("L = 255 on [0, 1] images", 255.0, "uniform7"),
            ("Gaussian 11x11 (TF/Wang), L = 1", 1.0, "gaussian11"))
QUANTILES = (0.5, 0.99, 0.999)
THRESHOLDS = (0.99, 0.999, 0.9999, 0.99999)


def _pairs_one_label(x: np.ndarray, data_range: float, window: str) -> np.ndarray:
    """SSIM of every pair i < j of ``x`` (n, H, W), row-major order of the pairs."""
    n = len(x)
    if n < 2:
        return np.zeros(0)
    out = []
    if window == "uniform7":
        st = SSIMStack.from_images(x, data_range=data_range)
        for i in range(n - 1):
            out.append(ssim_batch(x[i], st.take(slice(i + 1, None)), data_range=data_range))
        return np.concatenate(out)
    x = np.asarray(x, np.float64)                          # gaussian11: per-image window statistics once
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    m = _gauss_valid(x)
    v = _gauss_valid(x * x) - m * m
    for i in range(n - 1):
        mb, vb = m[i + 1:], v[i + 1:]
        cov = _gauss_valid(x[i][None] * x[i + 1:]) - m[i][None] * mb
        s = ((2 * m[i] * mb + c1) * (2 * cov + c2)) / ((m[i] ** 2 + mb * mb + c1) * (v[i] + vb + c2))
        out.append(s.reshape(len(mb), -1).mean(1))
    return np.concatenate(out)


def same_label_ssim(pools: dict, data_range: float = 1.0, window: str = "uniform7") -> np.ndarray:
    """SSIM of all same-label pairs: ``pools`` maps a label to its images (n, H, W) or
    (n, 1, H, W) in [0, 1]; returns every pair's SSIM (labels in order)."""
    parts = [_pairs_one_label(np.asarray(x).reshape(len(x), *np.asarray(x).shape[-2:]), data_range, window)
             for _, x in sorted(pools.items())]
    return np.concatenate(parts) if parts else np.zeros(0)


def pair_stats(values: np.ndarray) -> dict:
    """Count, max, quantiles and the share above each filter threshold."""
    v = np.asarray(values, np.float64)
    out = {"pairs": int(v.size), "max": float(v.max()) if v.size else float("nan")}
    for q in QUANTILES:
        out[f"q{q:g}"] = float(np.quantile(v, q)) if v.size else float("nan")
    for t in THRESHOLDS:
        out[f"above_{t:g}"] = float((v > t).mean()) if v.size else float("nan")
    return out


def pools_of(cfg, which: str = "all") -> dict:
    """A setting's per-label image pools as its regular users see them: ``all`` (R_T's
    training + held-out images, the sequence users' pool) or ``test`` (held-out only,
    the paper protocol's)."""
    import torch
    from ..data import load_bundle
    b = load_bundle(cfg.data)
    if which == "all":
        xs, ys = torch.cat([b.private_train.x, b.private_test.x]), torch.cat([b.private_train.y, b.private_test.y])
    else:
        xs, ys = b.private_test.x, b.private_test.y
    return {int(c): xs[ys == c].numpy().astype(np.float32) for c in torch.unique(ys).tolist()}


def pairs_table(rows: list[dict]) -> str:
    """Markdown: one row per (setting, pool, variant) with :func:`pair_stats`."""
    head = (["setting", "images", "SSIM", "pairs", "max"] + [f"{100 * q:g}th pct." for q in QUANTILES]
            + [f"> {t:g}" for t in THRESHOLDS])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["pool"], r["variant"], f"{r['pairs']:,}", f"{r['max']:.4f}"]
        cells += [f"{r[f'q{q:g}']:.4f}" for q in QUANTILES]
        cells += [f"{100 * r[f'above_{t:g}']:.2f}%" for t in THRESHOLDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
