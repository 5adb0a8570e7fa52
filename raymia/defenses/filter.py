"""Query-similarity filter against model inversion (Raha et al., Algorithms 1 and 2).

The server keeps, for every client session, a FIFO buffer of the client's last
``N_B`` query images and a suspicious-query counter.  A new query is compared
with every buffered image; a buffered image *matches* when

    SSIM(buffered, query) > T_ssim   and   |hash(buffered) - hash(query)| < T_hash

and each match adds one to the counter.  Once the counter reaches ``L_sp`` the
session is UNSAFE and stays blocked.  This module holds the pieces, in plain
numpy (no Ray, no torch needed):

* :func:`ssim_batch` -- SSIM of one grayscale query against a stack of images
  in one vectorised pass, numerically equal (to ~1e-7) to
  ``skimage.metrics.structural_similarity(a, b, data_range=R)`` with its
  defaults.  :class:`SSIMStack` caches the per-image half of the work so a
  buffer that is compared against many queries is prepared only once.
* :func:`mean_hash` / :func:`downsample` -- the paper's "simple hash".
* :class:`FilterParams` -- the filter configuration (Table 1 via
  :meth:`FilterParams.paper`).
* :class:`ClientFilterState` -- one client session: Algorithm 2, input
  validation, compact ``to_bytes``/``from_bytes``.
* :class:`GlobalIndex` -- an optional cross-client check (not in the paper)
  for an attacker who spreads near-identical queries over several client ids.

SSIM implementation notes
-------------------------
skimage's default SSIM uses a 7x7 uniform window, K1=0.01, K2=0.03, sample
(co)variances (factor 49/48) and averages the SSIM map after cropping 3 pixels
from every border.  Every window centred in that cropped region lies entirely
inside the image, so only "valid" 7x7 window sums are needed and the border
mode of the filter never matters.  Window sums are computed for all images of a
stack at once on one flat float32 array with 8 shifted additions (4 per axis);
positions whose window would wrap around a row or an image end are excluded
from the mean.

Per pixel the SSIM is rewritten as ``S = (1 - a) * (1 - b)`` with
``a = (mu_q - mu_b)^2 / (mu_q^2 + mu_b^2 + C1)`` and
``b = var(q - b) / (var_q + var_b + C2)``, and ``1 - S = a + b - a*b`` is what
gets averaged.  ``var(q - b)`` comes from the window sums of the squared
difference image, so near-identical images -- the regime that the filter's
thresholds (0.999 .. 0.99999) probe -- keep full relative precision although
the arithmetic is float32; results are returned as float64.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import struct
import threading
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple

import numpy as np

__all__ = [
    "FilterInputError",
    "FilterParams",
    "FilterResult",
    "ClientFilterState",
    "GlobalIndex",
    "GlobalResult",
    "MultiClientFilter",
    "SSIMStack",
    "ssim_batch",
    "mean_hash",
    "downsample",
    "PAPER_TABLE1",
    "SSIM_WIN",
]

SSIM_WIN = 7                 # skimage default window (uniform, 7x7)
_K1 = 0.01
_K2 = 0.03
_NP = SSIM_WIN * SSIM_WIN    # 49 pixels per window
_CHUNK_ELEMS = 1 << 15       # box sums run on <= 32k floats at a time (stays in L2)


class FilterInputError(ValueError):
    """A query image the filter refuses (wrong type, dtype, shape, NaN/inf, range).

    Raised before anything is changed: the client state is exactly as before.
    """


# --------------------------------------------------------------------------
# 7x7 window sums on a flat float32 stack
# --------------------------------------------------------------------------

_tls = threading.local()


def _arena(name: str, n: int) -> np.ndarray:
    """A per-thread float32 work array of at least ``n`` elements, reused across calls.

    Reusing work arrays matters: fresh arrays of a few hundred kB come from
    mmap and cost more in page faults than the arithmetic done on them.
    """
    d = getattr(_tls, "arena", None)
    if d is None:
        d = _tls.arena = {}
    a = d.get(name)
    if a is None or a.size < n:
        a = d[name] = np.empty(max(n, 4096), np.float32)
    return a


def _scratch(n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _arena("box1", n), _arena("box2", n), _arena("box3", n)


def _box7(planes: np.ndarray, out: np.ndarray, width: int) -> None:
    """7x7 window sums of every plane of ``planes`` (n, H*W), written to ``out``.

    ``out[i, r*W + c]`` is the sum of plane ``i`` over rows ``r..r+6`` and
    columns ``c..c+6`` for ``r <= H-7`` and ``c <= W-7``.  Other positions hold
    finite values (sums over wrapped windows, or 0) that callers must ignore.
    ``planes`` is used as scratch and destroyed.  Both arrays are float32 and
    C-contiguous.
    """
    n, p = planes.shape
    per = max(1, _CHUNK_ELEMS // p)
    src = planes.reshape(-1)
    dst = out.reshape(-1)
    t1, t2, t3 = _scratch(min(n, per) * p)
    w = width
    w2, w3, w4, w6 = 2 * w, 3 * w, 4 * w, 6 * w
    for p0 in range(0, n, per):
        a = p0 * p
        b = min(n, p0 + per) * p
        x = src[a:b]
        o = dst[a:b]
        ln = b - a
        # horizontal: 2-, 4-, 3- then 7-sums (7 = 4 + 3)
        s2 = np.add(x[:-1], x[1:], out=t1[:ln - 1])
        s4 = np.add(s2[:-2], s2[2:], out=t2[:ln - 3])
        s3 = np.add(s2[:-1], x[2:], out=t3[:ln - 2])
        h = np.add(s4[:-3], s3[4:], out=t1[:ln - 6])
        lh = ln - 6
        # vertical, same scheme with shifts of whole rows
        v2 = np.add(h[:-w], h[w:], out=t2[:lh - w])
        v4 = np.add(v2[:-w2], v2[w2:], out=t3[:lh - w3])
        v3 = np.add(v2[:-w], h[w2:], out=x[:lh - w2])
        lv = lh - w6
        np.add(v4[:-w3], v3[w4:], out=o[:lv])
        o[lv:] = 0.0


@lru_cache(maxsize=64)
def _garbage_inf(h: int, w: int) -> np.ndarray:
    """(H*W,) float32: 0 where the 7x7 window is inside the image, +inf elsewhere."""
    g = np.full((h, w), np.inf, np.float32)
    g[: h - SSIM_WIN + 1, : w - SSIM_WIN + 1] = 0.0
    g = g.reshape(-1)
    g.flags.writeable = False
    return g


def _check_data_range(data_range: Any) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    dr = float(data_range)
    if not (math.isfinite(dr) and dr > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return dr


def _real_array(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.bool_ or a.dtype.kind not in "uif":
        raise ValueError(f"{what} must hold real numbers (int or float), got dtype {a.dtype}")
    return a


class SSIMStack:
    """Images (n, H, W) with their local statistics precomputed for :func:`ssim_batch`.

    Holds, per image, the float32 pixels and the 7x7 window first moment and
    variance term.  Comparing a query against a prepared stack costs about half
    of comparing it against raw images, so a buffer that meets many queries
    (the filter's case) should be prepared once.  Rows can be selected with
    :meth:`take` and stacks joined with :meth:`concat`; a row's SSIM against a
    query does not depend on which other rows share the stack.
    """

    __slots__ = ("shape", "data_range", "img", "m1", "m1sq", "v48")

    def __init__(self, shape, data_range, img, m1, m1sq, v48):  # internal; use from_images
        self.shape = shape
        self.data_range = data_range
        self.img = img      # (n, P) float32 pixels
        self.m1 = m1        # (n, P) window sum / 7
        self.m1sq = m1sq    # (n, P) m1**2 = (window sum)^2 / 49
        self.v48 = v48      # (n, P) window sum of x^2 - m1sq = 48 * sample variance

    @classmethod
    def from_images(cls, images: Any, *, data_range: float) -> "SSIMStack":
        """Prepare a stack (n, H, W) -- or one image (H, W) -- of grayscale images."""
        dr = _check_data_range(data_range)
        a = _stack_array(images)
        n, h, w = a.shape
        block = np.empty((4, n, h * w), np.float32)
        np.copyto(block[0].reshape(n, h, w), a, casting="unsafe")
        return cls._prepare(block, (h, w), dr)

    @classmethod
    def _prepare(cls, block: np.ndarray, shape: Tuple[int, int], dr: float) -> "SSIMStack":
        """``block[0]`` holds float32 images (n, P); fills block[1:4] with the statistics."""
        img = block[0]
        n, p = img.shape
        planes = _arena("prep_planes", 2 * n * p)[: 2 * n * p].reshape(2 * n, p)
        np.divide(img, 7.0, out=planes[:n])
        np.square(img, out=planes[n:])
        # window sums land in block[1] (sum x / 7) and block[2] (sum x^2)
        _box7(planes, block[1:3].reshape(2 * n, p), shape[1])
        m1, v48, m1sq = block[1], block[2], block[3]
        np.square(m1, out=m1sq)
        np.subtract(v48, m1sq, out=v48)
        return cls(shape, dr, img, m1, m1sq, v48)

    def __len__(self) -> int:
        return self.img.shape[0]

    def take(self, idx: Any) -> "SSIMStack":
        """Rows ``idx`` (an index array or slice) as a new stack."""
        return SSIMStack(self.shape, self.data_range, self.img[idx], self.m1[idx],
                         self.m1sq[idx], self.v48[idx])

    @staticmethod
    def concat(stacks: Iterable["SSIMStack"]) -> "SSIMStack":
        stacks = list(stacks)
        if not stacks:
            raise ValueError("concat needs at least one stack")
        s0 = stacks[0]
        for s in stacks[1:]:
            if s.shape != s0.shape or s.data_range != s0.data_range:
                raise ValueError("stacks differ in image shape or data_range")
        cat = lambda name: np.concatenate([getattr(s, name) for s in stacks])  # noqa: E731
        return SSIMStack(s0.shape, s0.data_range, cat("img"), cat("m1"), cat("m1sq"), cat("v48"))

    def images(self) -> np.ndarray:
        """The stored float32 images, shape (n, H, W) (a view)."""
        return self.img.reshape((-1,) + self.shape)


def _stack_array(images: Any) -> np.ndarray:
    a = _real_array(images, "images")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"images must have shape (n, H, W) or (H, W), got {a.shape}")
    if a.shape[1] < SSIM_WIN or a.shape[2] < SSIM_WIN:
        raise ValueError(f"images must be at least {SSIM_WIN}x{SSIM_WIN}, "
                         f"got {a.shape[1]}x{a.shape[2]}")
    return a


def ssim_batch(query: Any, buffer: Any, *, data_range: float) -> np.ndarray:
    """SSIM of one grayscale image against each image of a stack, shape (n,) float64.

    ``query`` is (H, W); ``buffer`` is (n, H, W), one (H, W) image, or an
    :class:`SSIMStack` prepared with the same ``data_range``.  The value equals
    ``skimage.metrics.structural_similarity(query, buffer[i], data_range=data_range)``
    with skimage's defaults (7x7 uniform window, K1=0.01, K2=0.03, sample
    covariance, mean over the map cropped by 3 pixels) up to float32 rounding:
    about 1e-7 for images whose values lie in a range of width ``data_range``,
    and relatively tighter still as the images approach identity.  Images must
    be at least 7x7 and finite (a ValueError is raised otherwise).
    """
    dr = _check_data_range(data_range)
    if isinstance(buffer, SSIMStack):
        stack = buffer
        if stack.data_range != dr:
            raise ValueError(f"stack was prepared with data_range={stack.data_range}, "
                             f"called with {dr}")
    else:
        a = _stack_array(buffer)
        n, h, w = a.shape
        block = _arena("raw_stack", 4 * n * h * w)[: 4 * n * h * w].reshape(4, n, h * w)
        np.copyto(block[0].reshape(n, h, w), a, casting="unsafe")
        stack = SSIMStack._prepare(block, (h, w), dr)
    q = _real_array(query, "query")
    if q.shape != stack.shape:
        raise ValueError(f"query shape {q.shape} does not match buffer images {stack.shape}")
    out = _ssim_prepared(q, stack, dr)
    if not np.isfinite(out).all():
        raise ValueError("SSIM is not finite: the query or the buffer holds NaN/inf "
                         "(or values too large for float32)")
    return out


@lru_cache(maxsize=64)
def _query_consts(h: int, w: int, dr: float) -> Tuple[np.ndarray, np.ndarray]:
    """49*C1 and 48*C2 per pixel, +inf where the 7x7 window leaves the image.

    The +inf makes both SSIM terms exactly 0 at those positions, so they drop
    out of the row sums without a separate masking pass.
    """
    gar = _garbage_inf(h, w)
    c1 = (gar + np.float32(_NP * (_K1 * dr) ** 2)).astype(np.float32)
    c2 = (gar + np.float32((_NP - 1) * (_K2 * dr) ** 2)).astype(np.float32)
    c1.flags.writeable = False
    c2.flags.writeable = False
    return c1, c2


def _ssim_prepared(q: np.ndarray, st: SSIMStack, dr: float) -> np.ndarray:
    n = len(st)
    if n == 0:
        return np.empty(0, np.float64)
    h, w = st.shape
    p = h * w
    c1g, c2g = _query_consts(h, w, dr)
    k = (n + 2) * p
    # planes: (q - b_i)^2 for every i, then q/7 and q^2
    planes = _arena("q_planes", k)[:k].reshape(n + 2, p)
    qf = planes[n + 1]
    np.copyto(qf.reshape(h, w), q, casting="unsafe")
    d = planes[:n]
    np.subtract(qf, st.img, out=d)
    np.square(d, out=d)
    np.divide(qf, 7.0, out=planes[n])
    np.square(qf, out=qf)
    sums = _arena("q_sums", k)[:k].reshape(n + 2, p)
    _box7(planes, sums, w)
    wd = sums[:n]                        # window sums of (q - b)^2
    m1q = sums[n]
    tq = np.square(m1q)
    kq = np.add(tq, c1g)                 # m1q^2 + 49*C1
    kv = np.subtract(sums[n + 1], tq)
    kv += c2g                            # 48*var_q + 48*C2
    u2 = np.subtract(m1q, st.m1, out=planes[:n])
    np.square(u2, out=u2)                # (window sum of q - b)^2 / 49
    ab = _arena("q_ab", 2 * n * p)[: 2 * n * p].reshape(2 * n, p)
    a, bb = ab[:n], ab[n:]
    np.add(st.m1sq, kq, out=a)
    np.divide(u2, a, out=a)              # luminance term a = (mu_q-mu_b)^2 / (mu_q^2+mu_b^2+C1)
    np.add(st.v48, kv, out=bb)
    np.subtract(wd, u2, out=wd)          # 48 * var(q - b)
    np.divide(wd, bb, out=bb)            # b = var(q-b) / (var_q + var_b + C2)
    # mean of 1 - S = a + b - a*b over the valid region (a = b = 0 elsewhere)
    s_ab = np.einsum("ij->i", ab).astype(np.float64)
    s_prod = np.einsum("ij,ij->i", a, bb).astype(np.float64)
    one_minus = s_ab[:n] + s_ab[n:] - s_prod
    return 1.0 - one_minus / ((h - SSIM_WIN + 1) * (w - SSIM_WIN + 1))


# --------------------------------------------------------------------------
# The simple hash: mean intensity after downsampling
# --------------------------------------------------------------------------

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
    """
    n_b: int = 10
    t_ssim: float = 0.999
    t_hash: float = 0.001
    l_sp: int = 4
    hash_size: int = 8
    data_range: float = 1.0
    max_side: int = 1024
    max_channels: int = 4

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

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"N_B={self.n_b} T_ssim={self.t_ssim:g} T_hash={self.t_hash:g} L_sp={self.l_sp}"


#: Table 1 of Raha et al.: N_B, T_ssim, T_hash per configuration; L_sp per data set.
PAPER_TABLE1: List[dict] = [
    {"config": 1, "n_b": 10, "t_ssim": 0.99990, "t_hash": 0.00010, "l_sp": {"mnist": 4, "celeba": 8}},
    {"config": 2, "n_b": 10, "t_ssim": 0.99999, "t_hash": 0.00001, "l_sp": {"mnist": 4, "celeba": 8}},
    {"config": 3, "n_b": 10, "t_ssim": 0.99900, "t_hash": 0.00100, "l_sp": {"mnist": 4, "celeba": 8}},
]


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


def _query_hash(q: np.ndarray, p: FilterParams) -> float:
    return mean_hash(q, p.hash_size)


class _RingStack:
    """Fixed-capacity ring of (C, H, W) images with their SSIM statistics, per channel."""

    def __init__(self, capacity: int, shape: Tuple[int, int, int], data_range: float):
        c, h, w = shape
        self.shape, self.cap, self.c, self.dr = shape, capacity, c, data_range
        block = np.zeros((4, capacity * c, h * w), np.float32)
        self.stack = SSIMStack((h, w), data_range, block[0], block[1], block[2], block[3])
        self.hashes = np.zeros(capacity, np.float64)
        self.start = 0
        self.size = 0

    def order(self) -> np.ndarray:
        """Slots oldest first."""
        return (self.start + np.arange(self.size)) % self.cap

    def push(self, q: np.ndarray, h: float) -> int:
        """Enqueue (evicting the oldest when full); returns the slot written."""
        if self.size < self.cap:
            slot = (self.start + self.size) % self.cap
            self.size += 1
        else:
            slot = self.start
            self.start = (self.start + 1) % self.cap
        prep = SSIMStack.from_images(q, data_range=self.dr)       # (C, P) rows
        rows = slice(slot * self.c, (slot + 1) * self.c)
        st = self.stack
        st.img[rows], st.m1[rows], st.m1sq[rows], st.v48[rows] = prep.img, prep.m1, prep.m1sq, prep.v48
        self.hashes[slot] = h
        return slot

    def ssim(self, q: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Mean-over-channels SSIM of ``q`` (C, H, W) against the images in ``slots``
        (physical slot indices), in the order of ``slots``."""
        st, c = self.stack, self.c
        if len(slots) == self.size:
            # every buffered image: slots 0..size-1 (the ring only wraps once full), so
            # the statistics are read in place, without copying rows
            out = np.zeros(self.size, np.float64)
            for ch in range(c):
                rows = slice(ch, self.size * c, c)
                view = SSIMStack(st.shape, self.dr, st.img[rows], st.m1[rows], st.m1sq[rows], st.v48[rows])
                out += _ssim_prepared(q[ch], view, self.dr)
            return out[slots] / c
        out = np.zeros(len(slots), np.float64)
        for ch in range(c):
            out += _ssim_prepared(q[ch], st.take(slots * c + ch), self.dr)
        return out / c

    def images(self) -> np.ndarray:
        """Buffered images oldest first, (n, C, H, W) float32 (a copy)."""
        c, h, w = self.shape
        rows = (self.order()[:, None] * c + np.arange(c)).reshape(-1)
        return self.stack.img[rows].reshape(-1, c, h, w)


# --------------------------------------------------------------------------
# One client session: Algorithm 2
# --------------------------------------------------------------------------

_MAGIC = b"RMIAFLT\x01"
_DIGEST = 16
_MAX_HEADER = 1 << 16


class ClientFilterState:
    """Filter state of one client session (Algorithm 1's buffer B and counter).

    :meth:`check` runs Algorithm 2 on a query: if the counter has reached L_sp the
    query is UNSAFE; otherwise every buffered image whose hash differs by less than
    T_hash and whose SSIM exceeds T_ssim adds one to the counter, returning UNSAFE as
    soon as it reaches L_sp; a query found SAFE is enqueued (FIFO, N_B images).  A
    blocked client stays blocked and its buffer no longer changes.

    Not thread-safe: run one ``check`` at a time per state (e.g. one actor or lock per
    client).  Memory per client: 4 float32 arrays of N_B x C x H x W (the images and
    their window statistics).
    """

    def __init__(self, params: FilterParams):
        if not isinstance(params, FilterParams):
            raise TypeError(f"params must be FilterParams, got {type(params).__name__}")
        self.params = params
        self.count = 0
        self.n_queries = 0
        self._ring: Optional[_RingStack] = None

    # -- state
    @property
    def blocked(self) -> bool:
        return self.count >= self.params.l_sp

    @property
    def shape(self) -> Optional[Tuple[int, int, int]]:
        """(C, H, W) of this client's queries, fixed by its first query."""
        return None if self._ring is None else self._ring.shape

    def __len__(self) -> int:
        """Images in the buffer."""
        return 0 if self._ring is None else self._ring.size

    def buffer_images(self) -> np.ndarray:
        """The buffer oldest first, (n, C, H, W) float32 (a copy)."""
        if self._ring is None:
            return np.zeros((0, 1, 1, 1), np.float32)
        return self._ring.images()

    # -- Algorithm 2
    def check(self, img: Any) -> FilterResult:
        """Validate ``img`` (float (H, W) or (C, H, W) in [0, data_range]) and run
        Algorithm 2.  Raises :class:`FilterInputError` -- leaving the state exactly as
        it was -- for anything else."""
        p = self.params
        q = _validate_query(img, p, self.shape)
        self.n_queries += 1
        if self.count >= p.l_sp:
            return FilterResult(False, 0, self.count, True)
        h = _query_hash(q, p)
        matches = 0
        ring = self._ring
        if ring is not None and ring.size:
            slots = ring.order()
            near = slots[np.abs(ring.hashes[slots] - h) < p.t_hash]     # cheap test first
            if near.size:
                matches = int(np.count_nonzero(ring.ssim(q, near) > p.t_ssim))
        if matches:
            self.count = min(self.count + matches, p.l_sp)
            if self.count >= p.l_sp:
                return FilterResult(False, matches, self.count, True)
        if ring is None:
            ring = self._ring = _RingStack(p.n_b, q.shape, p.data_range)
        ring.push(q, h)
        return FilterResult(True, matches, self.count, False)

    # -- persistence
    def to_bytes(self) -> bytes:
        """Compact, self-checking serialisation (magic, JSON header, float32 buffer
        oldest first, blake2b digest).  ``from_bytes(to_bytes())`` restores an
        identical state, and ``to_bytes`` of that state gives the same bytes."""
        header = {
            "params": self.params.to_dict(),
            "count": self.count,
            "n_queries": self.n_queries,
            "shape": None if self._ring is None else list(self._ring.shape),
            "len": len(self),
        }
        hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        body = _MAGIC + struct.pack("<I", len(hb)) + hb
        if len(self):
            body += np.ascontiguousarray(self._ring.images(), dtype="<f4").tobytes()
        return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()

    @classmethod
    def from_bytes(cls, data: Any) -> "ClientFilterState":
        """Inverse of :meth:`to_bytes`; anything else raises :class:`FilterInputError`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FilterInputError(f"filter state must be bytes, got {type(data).__name__}")
        b = bytes(data)
        fail = "not a raymia filter state"
        if len(b) < len(_MAGIC) + 4 + _DIGEST or not b.startswith(_MAGIC):
            raise FilterInputError(f"{fail} (bad magic or too short)")
        body, digest = b[:-_DIGEST], b[-_DIGEST:]
        if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
            raise FilterInputError(f"{fail} (checksum mismatch: truncated or modified)")
        (hlen,) = struct.unpack_from("<I", body, len(_MAGIC))
        off = len(_MAGIC) + 4
        if hlen > _MAX_HEADER or off + hlen > len(body):
            raise FilterInputError(f"{fail} (bad header length)")
        try:
            header = json.loads(body[off:off + hlen].decode())
        except (UnicodeDecodeError, ValueError):
            raise FilterInputError(f"{fail} (header is not JSON)") from None
        expect = {"params", "count", "n_queries", "shape", "len"}
        if not isinstance(header, dict) or set(header) != expect:
            raise FilterInputError(f"{fail} (header keys)")
        pd_ = header["params"]
        names = {f.name for f in fields(FilterParams)}
        if not isinstance(pd_, dict) or set(pd_) != names:
            raise FilterInputError(f"{fail} (parameter keys)")
        try:
            params = FilterParams(**pd_)
        except ValueError as e:
            raise FilterInputError(f"{fail} ({e})") from None
        count, nq, n, shape = header["count"], header["n_queries"], header["len"], header["shape"]
        if not (_is_int(count) and 0 <= count <= params.l_sp and _is_int(nq) and nq >= 0
                and _is_int(n) and 0 <= n <= min(params.n_b, nq)):
            raise FilterInputError(f"{fail} (counter, query count or buffer length out of range)")
        raw = body[off + hlen:]
        st = cls(params)
        st.count, st.n_queries = count, nq
        if shape is None:
            if n or raw:
                raise FilterInputError(f"{fail} (buffer without a shape)")
            return st
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) for v in shape)):
            raise FilterInputError(f"{fail} (bad shape)")
        c, h, w = shape
        if not (1 <= c <= params.max_channels and SSIM_WIN <= h <= params.max_side
                and SSIM_WIN <= w <= params.max_side):
            raise FilterInputError(f"{fail} (shape {shape} outside the parameters' limits)")
        if len(raw) != n * c * h * w * 4:
            raise FilterInputError(f"{fail} (buffer size does not match the header)")
        imgs = np.frombuffer(raw, dtype="<f4").reshape(n, c, h, w).astype(np.float32)
        if not np.isfinite(imgs).all() or (n and (imgs.min() < 0 or imgs.max() > params.data_range)):
            raise FilterInputError(f"{fail} (buffered images are not finite or outside [0, data_range])")
        st._ring = _RingStack(params.n_b, (c, h, w), params.data_range)
        for im in imgs:
            st._ring.push(im, _query_hash(im, params))
        return st

    def __repr__(self) -> str:
        return (f"ClientFilterState({self.params.label()}, count={self.count}, "
                f"buffer={len(self)}, queries={self.n_queries}, blocked={self.blocked})")


# --------------------------------------------------------------------------
# Cross-client check (beyond the paper)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalResult:
    """Outcome of one :meth:`GlobalIndex.check`.

    safe     False when the client's group is blocked
    matches  recent queries of *other* clients that matched this query
    count    suspicious counter of the client's group after this query
    blocked  the client's group is blocked
    group    number of client ids linked into this client's group
    """
    safe: bool
    matches: int
    count: int
    blocked: bool
    group: int


class GlobalIndex:
    """Cross-client similarity check against an attacker who spreads near-identical
    queries over several client ids (Sybil / collusion).  Not part of the paper.

    Keeps the last ``size`` queries of all clients in a hash index (buckets of width
    T_hash, so only queries whose hash can still match are looked at) and compares a
    new query, with the per-client rule (SSIM > T_ssim and |hash diff| < T_hash), to
    the recent queries of the *other* clients.  Each match links the two client ids
    into one group (union-find) and adds one to the group's counter; at ``l_sp``
    matches the whole group is blocked for good.  Repeats within one client are left
    to :class:`ClientFilterState`.

    The union-find keeps every client id it has seen (blocked groups must be
    remembered); a long-running server should rebuild the index periodically.
    """

    def __init__(self, params: FilterParams, size: int = 1000, l_sp: Optional[int] = None):
        if not isinstance(params, FilterParams):
            raise TypeError(f"params must be FilterParams, got {type(params).__name__}")
        if not _is_int(size) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if l_sp is not None and (not _is_int(l_sp) or l_sp < 1):
            raise ValueError(f"l_sp must be an integer >= 1 or None, got {l_sp!r}")
        self.params = params
        self.size = int(size)
        self.l_sp = int(l_sp) if l_sp is not None else params.l_sp
        self._ring: Optional[_RingStack] = None
        self._owner: List[Hashable] = [None] * self.size
        self._bucket_of = np.zeros(self.size, np.int64)
        self._buckets: Dict[int, set] = {}
        self._parent: Dict[Hashable, Hashable] = {}
        self._members: Dict[Hashable, int] = {}     # group root -> number of client ids
        self._gcount: Dict[Hashable, int] = {}      # group root -> suspicious counter
        self.n_queries = 0

    def _find(self, c: Hashable) -> Hashable:
        par = self._parent
        if c not in par:
            par[c] = c
            self._members[c] = 1
            self._gcount[c] = 0
            return c
        root = c
        while par[root] != root:
            root = par[root]
        while par[c] != root:            # path compression
            par[c], c = root, par[c]
        return root

    def _union(self, a: Hashable, b: Hashable) -> Hashable:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return ra
        if self._members[ra] < self._members[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra] += self._members.pop(rb)
        self._gcount[ra] += self._gcount.pop(rb)
        return ra

    def _bucket(self, h: float) -> int:
        t = self.params.t_hash
        return int(math.floor(h / t)) if t > 0 else 0

    def blocked(self, client: Hashable) -> bool:
        return self._gcount[self._find(client)] >= self.l_sp

    def group_of(self, client: Hashable) -> int:
        return self._members[self._find(client)]

    def check(self, client: Hashable, img: Any) -> GlobalResult:
        """Validate ``img`` like :meth:`ClientFilterState.check` and compare it with
        the other clients' recent queries; the query is indexed when found safe."""
        p = self.params
        q = _validate_query(img, p, None if self._ring is None else self._ring.shape)
        try:
            hash(client)
        except TypeError:
            raise FilterInputError(f"client id must be hashable, got {type(client).__name__}") from None
        self.n_queries += 1
        root = self._find(client)
        if self._gcount[root] >= self.l_sp:
            return GlobalResult(False, 0, self._gcount[root], True, self._members[root])
        h = _query_hash(q, p)
        matches = 0
        ring = self._ring
        if ring is not None and ring.size and p.t_hash > 0:
            b = self._bucket(h)
            cand = [s for k in (b - 1, b, b + 1) for s in self._buckets.get(k, ())]
            cand = np.asarray([s for s in cand if self._owner[s] != client
                               and abs(ring.hashes[s] - h) < p.t_hash], np.int64)
            if cand.size:
                hit = cand[ring.ssim(q, cand) > p.t_ssim]
                for s in hit.tolist():
                    root = self._union(client, self._owner[s])
                    self._gcount[root] += 1
                    matches += 1
                    if self._gcount[root] >= self.l_sp:
                        return GlobalResult(False, matches, self._gcount[root], True, self._members[root])
        if ring is None:
            ring = self._ring = _RingStack(self.size, q.shape, p.data_range)
        if ring.size == ring.cap:                    # evict the oldest from its bucket
            old = ring.start
            bs = self._buckets.get(int(self._bucket_of[old]))
            if bs is not None:
                bs.discard(old)
                if not bs:
                    del self._buckets[int(self._bucket_of[old])]
        slot = ring.push(q, h)
        self._owner[slot] = client
        self._bucket_of[slot] = self._bucket(h)
        self._buckets.setdefault(int(self._bucket_of[slot]), set()).add(slot)
        root = self._find(client)
        return GlobalResult(True, matches, self._gcount[root], False, self._members[root])


class MultiClientFilter:
    """The server side of Algorithm 1 for many clients: one :class:`ClientFilterState`
    per client id and, optionally, a :class:`GlobalIndex` across clients.  A query is
    answered only when the client's own filter finds it SAFE and (if enabled) the
    cross-client check does too."""

    def __init__(self, params: FilterParams, global_size: int = 0, global_l_sp: Optional[int] = None):
        self.params = params
        self.clients: Dict[Hashable, ClientFilterState] = {}
        self.index = GlobalIndex(params, global_size, global_l_sp) if global_size else None

    def state(self, client: Hashable) -> ClientFilterState:
        st = self.clients.get(client)
        if st is None:
            st = self.clients[client] = ClientFilterState(self.params)
        return st

    def check(self, client: Hashable, img: Any) -> Tuple[bool, str]:
        """(safe, who refused: "" | "client" | "global")."""
        st = self.state(client)
        if not st.check(img).safe:
            return False, "client"
        if self.index is not None and not self.index.check(client, img).safe:
            return False, "global"
        return True, ""

    def blocked(self, client: Hashable) -> bool:
        st = self.clients.get(client)
        own = st is not None and st.blocked
        return own or (self.index is not None and client in self.index._parent and self.index.blocked(client))
