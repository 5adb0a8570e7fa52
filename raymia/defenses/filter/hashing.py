"""The paper's "simple hash": mean intensity of the image downsampled to
``size x size`` (:func:`mean_hash`), and the adaptive average pooling it rests on
(:func:`downsample`)."""
from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Any

import numpy as np

from .ssim import _real_array


@lru_cache(maxsize=64)
def _pool_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) adaptive-average-pooling weights: output bin ``i`` averages input
    positions ``floor(i*n/size) .. ceil((i+1)*n/size) - 1`` (bins overlap by at most one
    position when ``size`` does not divide ``n``; plain block means when it does)."""
    m = np.zeros((size, n), np.float64)
    for i in range(size):
        a = (i * n) // size
        b = -((-(i + 1) * n) // size)
        m[i, a:b] = 1.0 / (b - a)
    m.flags.writeable = False
    return m


@lru_cache(maxsize=64)
def _hash_weights(n: int, size: int) -> np.ndarray:
    """Per-position weight of the mean of the pooled axis: ``mean_i(pool[i]) . x``."""
    w = _pool_matrix(n, size).mean(axis=0)
    w.flags.writeable = False
    return w


def downsample(img: Any, size: int) -> np.ndarray:
    """Adaptive average pooling of the last two axes to ``size x size`` (float64)."""
    a = _real_array(img, "img").astype(np.float64, copy=False)
    if a.ndim < 2:
        raise ValueError(f"img must have at least 2 dimensions, got shape {a.shape}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    ph, pw = _pool_matrix(a.shape[-2], int(size)), _pool_matrix(a.shape[-1], int(size))
    return ph @ a @ pw.T


def mean_hash(img: Any, size: int) -> float:
    """The paper's "simple hash": mean pixel intensity of the image downsampled to
    ``size x size`` (all channels).  Equal to ``downsample(img, size).mean()`` but
    computed as one weighted sum.  When ``size`` divides the image sides the value is
    the plain mean intensity; otherwise border-adjacent rows/columns weigh a little
    differently."""
    a = _real_array(img, "img")
    if a.ndim < 2:
        raise ValueError(f"img must have at least 2 dimensions, got shape {a.shape}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    wh, ww = _hash_weights(a.shape[-2], int(size)), _hash_weights(a.shape[-1], int(size))
    a2 = a.reshape(-1, a.shape[-2], a.shape[-1])
    return float(np.einsum("h,chw,w->", wh, a2, ww, dtype=np.float64, casting="unsafe") / a2.shape[0])
