"""SSIM of one grayscale query against a stack of images, vectorised (plain numpy).

:func:`ssim_batch` is numerically equal (to ~1e-7) to
``skimage.metrics.structural_similarity(a, b, data_range=R)`` with its defaults;
:class:`SSIMStack` caches the per-image half of the work so a buffer that is
compared against many queries is prepared only once.

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

import math
import numbers
import threading
from functools import lru_cache
from typing import Any, Iterable, Tuple

import numpy as np

SSIM_WIN = 7                 # skimage default window (uniform, 7x7)
#: SSIM windows: ``uniform7`` (skimage's default, the filter's default) and ``gaussian11``
#: (Wang et al. 2004 / ``tf.image.ssim`` / OpenCV's sample: 11x11 Gaussian, sigma 1.5,
#: population covariance) -- the latter only when a filter's ``ssim_window`` selects it
SSIM_WINDOWS = ("uniform7", "gaussian11")
GAUSS_WIN = 11
GAUSS_SIGMA = 1.5
_K1 = 0.01
_K2 = 0.03
_NP = SSIM_WIN * SSIM_WIN    # 49 pixels per window
_CHUNK_ELEMS = 1 << 15       # box sums run on <= 32k floats at a time (stays in L2)


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

    __slots__ = ("shape", "data_range", "img", "m1", "m1sq", "v48", "window")

    def __init__(self, shape, data_range, img, m1, m1sq, v48, window="uniform7"):  # internal; use from_images
        self.shape = shape
        self.data_range = data_range
        self.window = window  # gaussian11: SSIM computed from ``img`` alone (the 7x7 statistics unused)
        self.img = img      # (n, P) float32 pixels
        self.m1 = m1        # (n, P) window sum / 7
        self.m1sq = m1sq    # (n, P) m1**2 = (window sum)^2 / 49
        self.v48 = v48      # (n, P) window sum of x^2 - m1sq = 48 * sample variance

    @classmethod
    def from_images(cls, images: Any, *, data_range: float, window: str = "uniform7") -> "SSIMStack":
        """Prepare a stack (n, H, W) -- or one image (H, W) -- of grayscale images."""
        dr = _check_data_range(data_range)
        a = _stack_array(images)
        n, h, w = a.shape
        block = np.empty((4, n, h * w), np.float32)
        np.copyto(block[0].reshape(n, h, w), a, casting="unsafe")
        st = cls._prepare(block, (h, w), dr)
        st.window = _check_window(window)
        return st

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
                         self.m1sq[idx], self.v48[idx], self.window)

    @staticmethod
    def concat(stacks: Iterable["SSIMStack"]) -> "SSIMStack":
        stacks = list(stacks)
        if not stacks:
            raise ValueError("concat needs at least one stack")
        s0 = stacks[0]
        for s in stacks[1:]:
            if s.shape != s0.shape or s.data_range != s0.data_range or s.window != s0.window:
                raise ValueError("stacks differ in image shape, data_range or window")
        cat = lambda name: np.concatenate([getattr(s, name) for s in stacks])  # noqa: E731
        return SSIMStack(s0.shape, s0.data_range, cat("img"), cat("m1"), cat("m1sq"), cat("v48"), s0.window)

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


def _check_window(window: Any) -> str:
    if window not in SSIM_WINDOWS:
        raise ValueError(f"SSIM window must be one of {', '.join(SSIM_WINDOWS)}, got {window!r}")
    return window


@lru_cache(maxsize=4)
def _gauss_taps() -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel for sigma 1.5, truncate 3.5 (radius 5),
    as ``skimage.metrics.structural_similarity(gaussian_weights=True)`` uses it."""
    r = int(3.5 * GAUSS_SIGMA + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / GAUSS_SIGMA) ** 2)
    k = k / k.sum()
    k.flags.writeable = False
    return k


def _gauss_valid(a: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian window means of (..., H, W), valid positions only
    (..., H-10, W-10): the region over which SSIM is averaged, where the filter's border
    mode never matters."""
    k = _gauss_taps()
    n = len(k)
    w = a.shape[-1] - n + 1
    h = a.shape[-2] - n + 1
    t = k[0] * a[..., :, 0:w]
    for i in range(1, n):
        t = t + k[i] * a[..., :, i:i + w]
    o = k[0] * t[..., 0:h, :]
    for i in range(1, n):
        o = o + k[i] * t[..., i:i + h, :]
    return o


def ssim_gaussian(query: np.ndarray, images: np.ndarray, dr: float) -> np.ndarray:
    """SSIM with an 11x11 Gaussian window (sigma 1.5), population (co)variances, K1 0.01,
    K2 0.03, averaged over the positions whose window lies inside the image, in float64:
    ``skimage.metrics.structural_similarity(q, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=dr)`` for float64 images, as
    ``tf.image.ssim``.  ``query`` (H, W), ``images`` (n, H, W); returns (n,) float64."""
    q = np.asarray(query, np.float64)
    b = np.asarray(images, np.float64).reshape((-1,) + q.shape)
    if min(q.shape) < GAUSS_WIN:
        raise ValueError(f"images must be at least {GAUSS_WIN}x{GAUSS_WIN} for the gaussian11 SSIM window, "
                         f"got {q.shape[0]}x{q.shape[1]}")
    c1, c2 = (_K1 * dr) ** 2, (_K2 * dr) ** 2
    mq, mb = _gauss_valid(q), _gauss_valid(b)
    vq = _gauss_valid(q * q) - mq * mq
    vb = _gauss_valid(b * b) - mb * mb
    cov = _gauss_valid(q[None] * b) - mq[None] * mb
    s = ((2 * mq * mb + c1) * (2 * cov + c2)) / ((mq * mq + mb * mb + c1) * (vq + vb + c2))
    return s.reshape(len(b), -1).mean(1)


def ssim_batch(query: Any, buffer: Any, *, data_range: float, window: str = "uniform7") -> np.ndarray:
    """SSIM of one grayscale image against each image of a stack, shape (n,) float64.

    ``query`` is (H, W); ``buffer`` is (n, H, W), one (H, W) image, or an
    :class:`SSIMStack` prepared with the same ``data_range``.  The value equals
    ``skimage.metrics.structural_similarity(query, buffer[i], data_range=data_range)``
    with skimage's defaults (7x7 uniform window, K1=0.01, K2=0.03, sample
    covariance, mean over the map cropped by 3 pixels) up to float32 rounding:
    about 1e-7 for images whose values lie in a range of width ``data_range``,
    and relatively tighter still as the images approach identity.  Images must
    be at least 7x7 and finite (a ValueError is raised otherwise).

    ``window="gaussian11"`` (or a stack prepared with it) gives :func:`ssim_gaussian`
    instead: the 11x11 Gaussian window of Wang et al. / ``tf.image.ssim`` (images at
    least 11x11).
    """
    dr = _check_data_range(data_range)
    window = _check_window(window)
    if isinstance(buffer, SSIMStack):
        window = buffer.window
        stack = buffer
        if stack.data_range != dr:
            raise ValueError(f"stack was prepared with data_range={stack.data_range}, "
                             f"called with {dr}")
    elif window == "gaussian11":          # raw images: computed from them directly, in their own precision
        a = _stack_array(buffer)
        q = _real_array(query, "query")
        if q.shape != a.shape[1:]:
            raise ValueError(f"query shape {q.shape} does not match buffer images {a.shape[1:]}")
        out = ssim_gaussian(q, a, dr)
        if not np.isfinite(out).all():
            raise ValueError("SSIM is not finite: the query or the buffer holds NaN/inf")
        return out
    else:
        a = _stack_array(buffer)
        n, h, w = a.shape
        block = _arena("raw_stack", 4 * n * h * w)[: 4 * n * h * w].reshape(4, n, h * w)
        np.copyto(block[0].reshape(n, h, w), a, casting="unsafe")
        stack = SSIMStack._prepare(block, (h, w), dr)
        stack.window = window
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
    if st.window == "gaussian11":
        return ssim_gaussian(q, st.images(), dr)
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
