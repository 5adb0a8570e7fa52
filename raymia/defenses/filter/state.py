"""One client session of the filter: :class:`ClientFilterState` (Algorithm 2, its
compact ``to_bytes``/``from_bytes``) on a fixed-capacity ring of buffered images with
their SSIM statistics (``_RingStack``, also used by the cross-client index)."""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import fields
from typing import Any, Optional, Tuple

import numpy as np

from .hashing import mean_hash
from .params import FilterInputError, FilterParams, FilterResult, _is_int, _validate_query
from .ssim import SSIM_WIN, SSIMStack, _ssim_prepared


def _query_hash(q: np.ndarray, p: FilterParams) -> float:
    return mean_hash(q, p.hash_size)


class _RingStack:
    """Fixed-capacity ring of (C, H, W) images with their SSIM statistics, per channel."""

    def __init__(self, capacity: int, shape: Tuple[int, int, int], data_range: float, window: str = "uniform7"):
        c, h, w = shape
        self.shape, self.cap, self.c, self.dr, self.window = shape, capacity, c, data_range, window
        block = np.zeros((4, capacity * c, h * w), np.float32)
        self.stack = SSIMStack((h, w), data_range, block[0], block[1], block[2], block[3], window)
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
                view = SSIMStack(st.shape, self.dr, st.img[rows], st.m1[rows], st.m1sq[rows], st.v48[rows],
                                 self.window)
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


def seal(magic: bytes, header: dict, payload: bytes) -> bytes:
    """A serialised filter state: magic, JSON header (length-prefixed), payload, blake2b digest."""
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = magic + struct.pack("<I", len(hb)) + hb + payload
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def unseal(data: Any, magic: bytes, fail: str) -> Tuple[Any, bytes]:
    """Inverse of :func:`seal`: (header, payload), or :class:`FilterInputError` for anything
    that is not bytes of that kind with an intact digest and a JSON header."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FilterInputError(f"filter state must be bytes, got {type(data).__name__}")
    b = bytes(data)
    if len(b) < len(magic) + 4 + _DIGEST or not b.startswith(magic):
        raise FilterInputError(f"{fail} (bad magic or too short)")
    body, digest = b[:-_DIGEST], b[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise FilterInputError(f"{fail} (checksum mismatch: truncated or modified)")
    (hlen,) = struct.unpack_from("<I", body, len(magic))
    off = len(magic) + 4
    if hlen > _MAX_HEADER or off + hlen > len(body):
        raise FilterInputError(f"{fail} (bad header length)")
    try:
        header = json.loads(body[off:off + hlen].decode())
    except (UnicodeDecodeError, ValueError):
        raise FilterInputError(f"{fail} (header is not JSON)") from None
    return header, body[off + hlen:]


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
        # what the last check compared by SSIM (buffer positions oldest first, SSIMs, hash
        # differences, buffer length), or None: the evidence a server keeps of a match
        self.compared: Optional[tuple] = None

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

    def nbytes(self) -> int:
        """Memory of this state: its ring of N_B images and their SSIM statistics."""
        ring = self._ring
        if ring is None:
            return 512
        sk = ring.stack
        return 512 + sum(int(a.nbytes) for a in (sk.img, sk.m1, sk.m1sq, sk.v48, ring.hashes))

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
        self.compared = None
        if self.count >= p.l_sp:
            return FilterResult(False, 0, self.count, True)
        h = _query_hash(q, p)
        matches = 0
        ring = self._ring
        if ring is not None and ring.size:
            slots = ring.order()
            diffs = np.abs(ring.hashes[slots] - h)
            pos = np.flatnonzero(diffs < p.t_hash)                      # cheap test first
            if pos.size:
                ssim = ring.ssim(q, slots[pos])
                matches = int(np.count_nonzero(ssim > p.t_ssim))
                self.compared = (pos, ssim, diffs[pos], int(ring.size))
        if matches:
            self.count = min(self.count + matches, p.l_sp)
            if self.count >= p.l_sp:
                return FilterResult(False, matches, self.count, True)
        if ring is None:
            ring = self._ring = _RingStack(p.n_b, q.shape, p.data_range, p.ssim_window)
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
        raw = np.ascontiguousarray(self._ring.images(), dtype="<f4").tobytes() if len(self) else b""
        return seal(_MAGIC, header, raw)

    @classmethod
    def from_bytes(cls, data: Any) -> "ClientFilterState":
        """Inverse of :meth:`to_bytes`; anything else raises :class:`FilterInputError`."""
        fail = "not a raymia filter state"
        header, raw = unseal(data, _MAGIC, fail)
        expect = {"params", "count", "n_queries", "shape", "len"}
        if not isinstance(header, dict) or set(header) != expect:
            raise FilterInputError(f"{fail} (header keys)")
        pd_ = header["params"]
        names = {f.name for f in fields(FilterParams)}
        if not isinstance(pd_, dict) or set(pd_) not in (names, names - {"ssim_window"}):
            raise FilterInputError(f"{fail} (parameter keys)")
        try:
            params = FilterParams(**pd_)
        except ValueError as e:
            raise FilterInputError(f"{fail} ({e})") from None
        count, nq, n, shape = header["count"], header["n_queries"], header["len"], header["shape"]
        if not (_is_int(count) and 0 <= count <= params.l_sp and _is_int(nq) and nq >= 0
                and _is_int(n) and 0 <= n <= min(params.n_b, nq)):
            raise FilterInputError(f"{fail} (counter, query count or buffer length out of range)")
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
        st._ring = _RingStack(params.n_b, (c, h, w), params.data_range, params.ssim_window)
        for im in imgs:
            st._ring.push(im, _query_hash(im, params))
        return st

    def __repr__(self) -> str:
        return (f"ClientFilterState({self.params.label()}, count={self.count}, "
                f"buffer={len(self)}, queries={self.n_queries}, blocked={self.blocked})")
