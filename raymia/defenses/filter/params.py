"""The filter's configuration (:class:`FilterParams`, Table 1 via
:meth:`FilterParams.paper`, the config section via :meth:`FilterParams.from_config`),
the outcome of one check (:class:`FilterResult`) and the validation of a query
image (:class:`FilterInputError`), shared by the per-client and the cross-client filter."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Tuple

import numpy as np

from ...paper import PAPER_TABLE1
from .ssim import SSIM_WIN, SSIM_WINDOWS


class FilterInputError(ValueError):
    """A query image the filter refuses (wrong type, dtype, shape, NaN/inf, range).

    Raised before anything is changed: the client state is exactly as before.
    """


# --------------------------------------------------------------------------
# Filter configuration (Table 1)
# --------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass(frozen=True)
class FilterParams:
    """Configuration of the similarity filter.

    n_b        buffer size N_B (last queries kept per client)
    t_ssim     a buffered image matches when SSIM > t_ssim ...
    t_hash     ... and |hash - hash'| < t_hash (hash in units of ``data_range``)
    l_sp       limit L_sp: the client is UNSAFE (blocked for good) once count >= l_sp
    hash_size  side of the downsampled image the hash averages
    data_range images lie in [0, data_range]; SSIM's L
    max_side   largest accepted image side (bounds per-client memory)
    max_channels  largest accepted channel count
    ssim_window   ``uniform7`` (skimage's default SSIM, the default) or ``gaussian11``
               (11x11 Gaussian, sigma 1.5, as Wang et al. / tf.image.ssim; an ablation).
               Left out of :meth:`to_dict` at its default, so the serialised states and
               the sweep's unit ids of default filters are what they were before it existed.
    """
    n_b: int = 10
    t_ssim: float = 0.999
    t_hash: float = 0.001
    l_sp: int = 4
    hash_size: int = 8
    data_range: float = 1.0
    max_side: int = 1024
    max_channels: int = 4
    ssim_window: str = "uniform7"

    def __post_init__(self):
        bad = []
        for name in ("n_b", "l_sp", "hash_size", "max_side", "max_channels"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                bad.append(f"{name} must be an integer >= 1, got {v!r}")
        if not _is_real(self.t_ssim) or not -1.0 <= float(self.t_ssim) <= 1.0:
            bad.append(f"t_ssim must be a number in [-1, 1], got {self.t_ssim!r}")
        if not _is_real(self.t_hash) or float(self.t_hash) < 0:
            bad.append(f"t_hash must be a finite number >= 0, got {self.t_hash!r}")
        if not _is_real(self.data_range) or float(self.data_range) <= 0:
            bad.append(f"data_range must be a finite number > 0, got {self.data_range!r}")
        if self.ssim_window not in SSIM_WINDOWS:
            bad.append(f"ssim_window must be one of {', '.join(SSIM_WINDOWS)}, got {self.ssim_window!r}")
        if _is_int(self.max_side) and self.max_side < SSIM_WIN:
            bad.append(f"max_side must be >= {SSIM_WIN} (the SSIM window), got {self.max_side}")
        if bad:
            raise ValueError("invalid filter parameters: " + "; ".join(bad))
        for name in ("n_b", "l_sp", "hash_size", "max_side", "max_channels"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("t_ssim", "t_hash", "data_range"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def paper(cls, k: int, setting: str = "mnist", **overrides) -> "FilterParams":
        """Configuration ``k`` (1-based) of the paper's Table 1.  ``setting`` picks the
        L_sp row: ``mnist`` (4) or ``celeba``/``faces`` (8)."""
        if not _is_int(k) or not 1 <= k <= len(PAPER_TABLE1):
            raise ValueError(f"paper configuration must be 1..{len(PAPER_TABLE1)}, got {k!r}")
        key = {"faces": "celeba"}.get(setting, setting)
        row = PAPER_TABLE1[k - 1]
        if key not in row["l_sp"]:
            raise ValueError(f"setting must be one of mnist, celeba, faces; got {setting!r}")
        kw = {"n_b": row["n_b"], "t_ssim": row["t_ssim"], "t_hash": row["t_hash"], "l_sp": row["l_sp"][key]}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_obj(cls, obj: Any, **overrides) -> "FilterParams":
        """Parameters taken by field name from a mapping or an object with those
        attributes (e.g. the config's ``filter`` section); missing names keep defaults."""
        names = [f.name for f in fields(cls)]
        if isinstance(obj, dict):
            kw = {n: obj[n] for n in names if n in obj}
        else:
            kw = {n: getattr(obj, n) for n in names if hasattr(obj, n)}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_config(cls, section: Any, **overrides) -> "FilterParams":
        """The filter of a config's ``filter`` section (:class:`raymia.config.FilterCfg`,
        whose fields are these parameters; ``max_side``/``max_channels`` keep their
        defaults) -- the one way Serve, the sweep and the config's validation build it.
        An invalid value raises :class:`raymia.config.ConfigError` naming the section."""
        try:
            return cls.from_obj(section, **overrides)
        except ValueError as e:
            from ...config import ConfigError
            raise ConfigError(f"filter: {e}") from None

    def to_dict(self) -> dict:
        """The parameters by name; ``ssim_window`` only when it is not the default."""
        d = asdict(self)
        if d["ssim_window"] == "uniform7":
            del d["ssim_window"]
        return d

    # -- what the state store reads of either detector (RobustParams has the same)
    @property
    def snapshot_every(self) -> int:
        """Logged queries between stored snapshots (a snapshot holds the whole buffer)."""
        return 2 * self.n_b

    @property
    def capacity(self) -> int:
        """Queries one client's state remembers."""
        return self.n_b

    def thresholds(self) -> dict:
        return {"t_ssim": self.t_ssim, "t_hash": self.t_hash, "l_sp": self.l_sp}

    def state_class(self):
        from .state import ClientFilterState
        return ClientFilterState

    def label(self) -> str:
        win = "" if self.ssim_window == "uniform7" else f" SSIM={self.ssim_window}"
        return f"N_B={self.n_b} T_ssim={self.t_ssim:g} T_hash={self.t_hash:g} L_sp={self.l_sp}{win}"


@dataclass(frozen=True)
class FilterResult:
    """Outcome of one :meth:`ClientFilterState.check`.

    safe     True: the query may go to the model; False: refused (client blocked)
    matches  buffered images that matched this query (0 when already blocked)
    count    the client's suspicious counter after this query (capped at L_sp, as
             Algorithm 2 returns as soon as the limit is reached)
    blocked  the client is blocked (now and for good)
    """
    safe: bool
    matches: int
    count: int
    blocked: bool


# --------------------------------------------------------------------------
# Validation shared by the per-client and the global filter
# --------------------------------------------------------------------------

def _validate_query(img: Any, p: FilterParams, shape: Optional[Tuple[int, int, int]]) -> np.ndarray:
    """The query as a new float32 (C, H, W) array, or :class:`FilterInputError`."""
    if not isinstance(img, np.ndarray):
        raise FilterInputError(f"query must be a numpy array, got {type(img).__name__}")
    if img.dtype.kind != "f":
        raise FilterInputError(f"query must be a float array with values in [0, {p.data_range:g}], "
                               f"got dtype {img.dtype}")
    if img.ndim == 2:
        chw = (1,) + img.shape
    elif img.ndim == 3:
        chw = img.shape
    else:
        raise FilterInputError(f"query must have shape (H, W) or (C, H, W), got {img.shape}")
    c, h, w = chw
    if not 1 <= c <= p.max_channels:
        raise FilterInputError(f"query has {c} channels; expected 1..{p.max_channels} as (C, H, W)")
    if not (SSIM_WIN <= h <= p.max_side and SSIM_WIN <= w <= p.max_side):
        raise FilterInputError(f"query is {h}x{w}; each side must lie in [{SSIM_WIN}, {p.max_side}]")
    if shape is not None and tuple(chw) != tuple(shape):
        raise FilterInputError(f"query shape {tuple(chw)} (as C,H,W) differs from this client's "
                               f"earlier queries {tuple(shape)}")
    if not np.isfinite(img).all():
        raise FilterInputError("query contains NaN or inf")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > p.data_range:
        raise FilterInputError(f"query values must lie in [0, {p.data_range:g}], got [{lo:.4g}, {hi:.4g}]")
    return np.array(img, dtype=np.float32, copy=True).reshape(chw)
