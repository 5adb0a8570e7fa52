"""A stateful detector beside Algorithm 2 (``filter.kind: robust``; not in the filter paper).

Algorithm 2 compares raw pixels (SSIM > T_ssim and a mean hash within T_hash): a one-grey-level
dither, a one-pixel shift or fresh noise on every query walks around it.  This detector
compares queries where such changes do not move them:

* **Fingerprint** (a perceptual hash in the pHash / PIHA family): the query in grey, resized to
  a canonical ``base`` side, standardised (zero mean, unit variance: brightness and contrast
  changes vanish), its central square averaged down to a ``grid`` x ``grid`` image (noise and JPEG artefacts
  average out), its 2-D DCT's lowest ``dct`` x ``dct`` coefficients without the DC term, each
  one bit (above or below their median): 120 bits in two ``uint64`` words for the defaults.
* **Shift search**: the query is fingerprinted at every shift of up to ``shift`` pixels in
  each direction (windows of the central square, no padding), and its distance to a remembered query is the smallest
  Hamming distance over those variants, so re-cropping by a few pixels does not help.
* **Long memory**: the fingerprints of the client's last ``memory`` answered queries (16 bytes
  each; 4096 by default), compared with XOR + popcount in one vectorised pass.
* **Strikes**: a query within ``t_bits`` of any remembered one is a strike; ``l_sp`` strikes
  (within the last ``window`` queries, 0 = ever) block the client for good, as Algorithm 1
  does.
* **Clusters** (``l_near``, 0 = off): a query within ``t_bits`` of at least ``l_near``
  remembered queries blocks the client at once: ``l_near + 1`` near-duplicates sit in the
  memory, however many unrelated queries came between them (decoys, a slow attack), which
  the strike window alone lets expire.
* **Feature clusters** (``feat_k``, 0 = off): the fingerprint only sees pixels, and an
  attacker who knows it disguises every query past it (:class:`~raymia.filter_sim.redteam.EvasiveOracle`).
  A query attack needs the model's answer to the image it means to ask about, so its
  disguised queries must keep the model's view of the image: the victim's own
  embedding (R_T's penultimate features, unit length) of each query is remembered
  (the last ``feat_memory``), and a query whose embedding has cosine similarity at least
  ``feat_sim`` with at least ``feat_k`` remembered ones blocks the client at once.  The
  embedding comes from the model's forward pass, so the check takes it as an argument.
* Benign users re-send a photo a few times and send several photos of themselves, so
  ``t_bits``, ``l_sp``, ``window``, ``l_near`` and ``feat_sim``/``feat_k`` are calibrated
  on held-out benign traffic to a target false-positive rate (:mod:`raymia.pipelines.red_team`).
* :class:`CrossClientWindow`: the last ``size`` fingerprints of *all* clients; a query that
  is near the queries of ``k`` or more other client ids within that window is refused
  (Sybil attacks: fresh ids per query gain nothing).  It refuses the query, it does not
  block the id, so nobody can lock another client out through it.

:class:`RobustClientState` has the interface of
:class:`~raymia.defenses.filter.ClientFilterState` (``check``, ``to_bytes``/``from_bytes``,
``blocked``, ``count``, ``n_queries``), so the Serve store keeps either.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Hashable, List, Optional, Tuple

import numpy as np

from .params import FilterInputError, FilterResult, _is_int, _is_real, _validate_query
from .state import seal, unseal

_MAGIC = b"RMRB1"


@dataclass(frozen=True)
class RobustParams:
    """Parameters of the robust detector (see the module docstring).

    t_bits   a query is near a remembered one when their Hamming distance (minimum over the
             query's shifted variants) is at most t_bits (of ``dct**2 - 1`` bits)
    l_sp     strikes that block the client
    window   strikes count only within the client's last ``window`` queries (0 = all)
    l_near   a query near at least l_near remembered queries blocks the client (0 = off)
    feat_k   a query whose embedding has cosine similarity >= feat_sim with at least feat_k
             remembered embeddings blocks the client (0 = off; then no embedding is needed)
    feat_sim that similarity
    feat_memory  embeddings remembered per client
    memory   fingerprints remembered per client
    shift    query variants shifted by -shift..shift pixels (at the ``base`` side), both axes
    base     canonical side the query is resized to before fingerprinting; the fingerprint
             is taken of its central (base - 2 shift) square, so a shift of up to ``shift``
             pixels brings no border pixel in (the shifted variants are exact)
    grid     side of the averaged image whose DCT is taken (divides base - 2 shift)
    dct      side of the block of lowest DCT coefficients kept (dct*dct - 1 bits)
    """
    t_bits: int = 16
    l_sp: int = 6
    window: int = 0
    l_near: int = 0
    feat_k: int = 0
    feat_sim: float = 0.9
    feat_memory: int = 512
    memory: int = 4096
    shift: int = 2
    base: int = 32
    grid: int = 14
    dct: int = 11
    data_range: float = 1.0
    max_side: int = 1024
    max_channels: int = 4

    kind = "robust"

    def __post_init__(self):
        bad = []
        for name in ("l_sp", "memory", "feat_memory", "base", "grid", "dct", "max_side", "max_channels"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                bad.append(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("t_bits", "window", "shift", "l_near", "feat_k"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                bad.append(f"{name} must be an integer >= 0, got {v!r}")
        if not _is_real(self.feat_sim) or not -1.0 <= float(self.feat_sim) <= 1.0:
            bad.append(f"feat_sim must be a cosine similarity in [-1, 1], got {self.feat_sim!r}")
        if not _is_real(self.data_range) or float(self.data_range) <= 0:
            bad.append(f"data_range must be a finite number > 0, got {self.data_range!r}")
        if not bad:
            if not 2 <= self.dct <= 16:       # <= 255 bits: the distances are summed in uint8
                bad.append(f"dct must be 2..16, got {self.dct}")
            inner = self.base - 2 * self.shift
            if inner < self.dct or self.grid < self.dct or inner % self.grid:
                bad.append(f"grid must be >= dct and divide base - 2 shift, got grid {self.grid}, "
                           f"base {self.base}, shift {self.shift}")
        if bad:
            raise ValueError("invalid robust filter parameters: " + "; ".join(bad))
        object.__setattr__(self, "data_range", float(self.data_range))
        object.__setattr__(self, "feat_sim", float(self.feat_sim))

    @property
    def words(self) -> int:
        """uint64 words per fingerprint."""
        return (self.dct * self.dct - 1 + 63) // 64

    @property
    def snapshot_every(self) -> int:
        """Stored snapshots of this state are small (8 bytes per word per remembered query)."""
        return 64

    @classmethod
    def from_obj(cls, obj: Any, **overrides) -> "RobustParams":
        names = [f.name for f in fields(cls)]
        kw = ({n: obj[n] for n in names if n in obj} if isinstance(obj, dict)
              else {n: getattr(obj, n) for n in names if hasattr(obj, n)})
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_config(cls, section: Any, **overrides) -> "RobustParams":
        try:
            return cls.from_obj(section, **overrides)
        except ValueError as e:
            from ...config import ConfigError
            raise ConfigError(f"robust_filter: {e}") from None

    def to_dict(self) -> dict:
        return {"kind": "robust", **asdict(self)}

    @property
    def capacity(self) -> int:
        return self.memory

    def thresholds(self) -> dict:
        return {"t_bits": self.t_bits, "l_sp": self.l_sp, "window": self.window, "l_near": self.l_near,
                "feat_k": self.feat_k, "feat_sim": self.feat_sim, "memory": self.memory}

    def state_class(self):
        return RobustClientState

    def label(self) -> str:
        w = f" window={self.window}" if self.window else ""
        w += f" l_near={self.l_near}" if self.l_near else ""
        w += f" feat_k={self.feat_k} feat_sim={self.feat_sim:g}" if self.feat_k else ""
        return f"robust t_bits={self.t_bits} L={self.l_sp}{w} memory={self.memory} shift={self.shift}"


def params_from_dict(d: dict):
    """FilterParams (Algorithm 2) or RobustParams from their ``to_dict``."""
    from .params import FilterParams
    d = dict(d)
    if d.pop("kind", "raha") == "robust":
        return RobustParams(**d)
    return FilterParams(**d)


# ----------------------------------------------------------------------------- fingerprints

def _dct_matrix(n: int, k: int) -> np.ndarray:
    """The first k rows of the orthonormal DCT-II matrix of size n."""
    i = np.arange(n)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _resize(g: np.ndarray, side: int) -> np.ndarray:
    """Grey (H, W) to (side, side): block means when the sides are multiples, else
    bilinear interpolation (both deterministic numpy)."""
    h, w = g.shape
    if h % side == 0 and w % side == 0:
        return g.reshape(side, h // side, side, w // side).mean((1, 3))
    ys, xs = (np.arange(side) + 0.5) * h / side - 0.5, (np.arange(side) + 0.5) * w / side - 0.5
    y0, x0 = np.clip(np.floor(ys).astype(int), 0, h - 1), np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = np.clip(ys - y0, 0, 1)[:, None], np.clip(xs - x0, 0, 1)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bot = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


class Fingerprinter:
    """Fingerprints of one query: its own (unshifted) and those of its shifted variants.

    The block averaging down to ``grid`` x ``grid`` and the 2-D DCT are one linear map, so
    each variant's coefficients are ``M @ window @ M.T`` with ``M = DCT @ blockmean``
    (``dct`` x inner): one batched matrix product for all variants."""

    def __init__(self, p: RobustParams):
        self.p = p
        inner = p.base - 2 * p.shift
        k = inner // p.grid
        avg = np.kron(np.eye(p.grid), np.full((1, k), 1.0 / k))       # (grid, inner) block means
        self.m = _dct_matrix(p.grid, p.dct) @ avg                     # (dct, inner)
        s = p.shift
        self.offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
        self.centre = self.offsets.index((0, 0))
        self.nbits = p.dct * p.dct - 1

    def variants(self, q: np.ndarray) -> np.ndarray:
        """(n_variants, words) uint64 fingerprints of ``q`` (C, H, W) in [0, data_range]."""
        p = self.p
        g = _resize(q.mean(0, dtype=np.float64) / p.data_range, p.base)
        s, inner = p.shift, p.base - 2 * p.shift
        stack = np.stack([g[s + dy:s + dy + inner, s + dx:s + dx + inner] for dy, dx in self.offsets])
        stack = stack - stack.mean((1, 2), keepdims=True)
        stack = stack / (stack.std((1, 2), keepdims=True) + 1e-6)
        coef = (self.m @ stack @ self.m.T).reshape(len(stack), -1)[:, 1:]
        bits = coef > np.median(coef, axis=1, keepdims=True)
        pad = np.zeros((len(bits), self.p.words * 64), bool)
        pad[:, :self.nbits] = bits
        return np.packbits(pad, axis=1).view(">u8").astype(np.uint64)

    def one(self, q: np.ndarray) -> np.ndarray:
        """The unshifted fingerprint, (words,) uint64."""
        return self.variants(q)[self.centre]


def _hamming_min_cols(variants: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """:func:`hamming_min` against a column-major memory ``cols`` (words, capacity) whose
    first ``n`` columns are used: each word's row is contiguous, so no copy is made."""
    if n == 0:
        return np.zeros(0, np.int64)
    d = None                      # (V, n) uint8 distances, one word at a time (no (V, n, words) temporary)
    for w in range(cols.shape[0]):
        part = np.bitwise_count(cols[w, None, :n] ^ variants[:, w:w + 1])
        d = part if d is None else np.add(d, part, out=d)
    return d.min(0).astype(np.int64)


def hamming_min(variants: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """For every remembered fingerprint (M, words), the smallest Hamming distance to any of
    the query's variants (V, words)."""
    memory = np.asarray(memory, np.uint64).reshape(-1, variants.shape[-1])
    return _hamming_min_cols(variants, np.ascontiguousarray(memory.T), memory.shape[0])


# ----------------------------------------------------------------------------- per client

class RobustClientState:
    """One client of the robust detector: remembered fingerprints, strikes, the block."""

    def __init__(self, params: RobustParams):
        if not isinstance(params, RobustParams):
            raise TypeError(f"params must be RobustParams, got {type(params).__name__}")
        self.params = params
        self.count = 0                       # strikes (capped at l_sp: blocked)
        self.n_queries = 0
        self.strikes: List[int] = []         # query numbers of the last l_sp strikes
        self._shape: Optional[Tuple[int, int, int]] = None
        self._mem = np.zeros((params.words, params.memory), np.uint64)   # column-major: one row per word
        self._n = 0                          # fingerprints remembered
        self._head = 0                       # next slot of the ring
        self._fp = Fingerprinter(params)
        self._feat: Optional[np.ndarray] = None   # (feat_memory, dim) unit embeddings, allocated at the first
        self._nf = 0                              # embeddings remembered
        self._fhead = 0

    @property
    def blocked(self) -> bool:
        return self.count >= self.params.l_sp

    @property
    def shape(self) -> Optional[Tuple[int, int, int]]:
        return self._shape

    def __len__(self) -> int:
        return self._n

    def memory(self) -> np.ndarray:
        """Remembered fingerprints, oldest first (a copy)."""
        m = self.params.memory
        if self._n < m:
            return self._mem[:, :self._n].T.copy()
        return np.concatenate([self._mem[:, self._head:], self._mem[:, :self._head]], axis=1).T.copy()

    def nbytes(self) -> int:
        return 512 + int(self._mem.nbytes) + (0 if self._feat is None else int(self._feat.nbytes))

    def features(self) -> np.ndarray:
        """Remembered embeddings, oldest first (a copy; (0, 0) when none)."""
        if self._feat is None:
            return np.zeros((0, 0), np.float32)
        if self._nf < self.params.feat_memory:
            return self._feat[:self._nf].copy()
        return np.concatenate([self._feat[self._fhead:], self._feat[:self._fhead]])

    def _feature(self, feature: Any) -> Optional[np.ndarray]:
        """The query's embedding as a unit float32 vector (None when the rule is off)."""
        if not self.params.feat_k:
            return None
        if feature is None:
            raise FilterInputError("this robust detector (feat_k > 0) needs the model's embedding of the query")
        f = np.asarray(feature, np.float32).reshape(-1)
        norm = float(np.linalg.norm(f)) if f.size else 0.0
        if not np.isfinite(norm) or norm == 0.0 or (self._feat is not None and f.size != self._feat.shape[1]):
            raise FilterInputError(f"the query's embedding must be a finite non-zero vector of the client's "
                                   f"dimension, got {f.size} values")
        return f / norm

    def near_features(self, f: np.ndarray) -> int:
        """How many remembered embeddings have cosine similarity >= feat_sim with ``f``."""
        if self._feat is None or not self._nf:
            return 0
        return int(np.count_nonzero(self._feat[:self._nf] @ f >= self.params.feat_sim))

    def _remember_feature(self, f: np.ndarray) -> None:
        if self._feat is None:
            self._feat = np.zeros((self.params.feat_memory, f.size), np.float32)
        self._feat[self._fhead] = f
        self._fhead = (self._fhead + 1) % self.params.feat_memory
        self._nf = min(self._nf + 1, self.params.feat_memory)

    def near(self, variants: np.ndarray) -> int:
        """How many remembered queries lie within t_bits of a query with these variants."""
        d = _hamming_min_cols(variants, self._mem, self._n)
        return int(np.count_nonzero(d <= self.params.t_bits))

    def check(self, img: Any, variants: Optional[np.ndarray] = None, feature: Any = None) -> FilterResult:
        """Validate ``img`` (and, with ``feat_k``, its embedding ``feature``) and decide;
        :class:`FilterInputError` leaves the state unchanged."""
        p = self.params
        q = _validate_query(img, p, self._shape)     # reads max_channels, max_side, data_range
        f = self._feature(feature)
        v = self._fp.variants(q) if variants is None else variants
        self.n_queries += 1
        if self.blocked:
            return FilterResult(False, 0, self.count, True)
        matches = self.near(v)
        if f is not None and self.near_features(f) >= p.feat_k:
            self.count = p.l_sp
            return FilterResult(False, max(matches, p.feat_k), self.count, True)
        if matches:
            self.strikes = (self.strikes + [self.n_queries])[-p.l_sp:]
            recent = [s for s in self.strikes if not p.window or s > self.n_queries - p.window]
            self.count = p.l_sp if p.l_near and matches >= p.l_near else min(len(recent), p.l_sp)
            if self.blocked:
                return FilterResult(False, matches, self.count, True)
        elif p.window:
            self.count = sum(1 for s in self.strikes if s > self.n_queries - p.window)
        if self._shape is None:
            self._shape = tuple(q.shape)
        self._mem[:, self._head] = v[self._fp.centre]
        self._head = (self._head + 1) % p.memory
        self._n = min(self._n + 1, p.memory)
        if f is not None:
            self._remember_feature(f)
        return FilterResult(True, matches, self.count, False)

    # -- persistence (same contract as ClientFilterState)
    def to_bytes(self) -> bytes:
        header = {"params": self.params.to_dict(), "count": self.count, "n_queries": self.n_queries,
                  "strikes": self.strikes, "shape": None if self._shape is None else list(self._shape),
                  "len": self._n, "feat_len": self._nf, "feat_dim": 0 if self._feat is None else self._feat.shape[1]}
        raw = np.ascontiguousarray(self.memory()).astype("<u8").tobytes()
        return seal(_MAGIC, header, raw + np.ascontiguousarray(self.features()).astype("<f4").tobytes())

    @classmethod
    def from_bytes(cls, data: Any) -> "RobustClientState":
        fail = "not a raymia robust filter state"
        h, raw = unseal(data, _MAGIC, fail)
        try:
            pd_ = dict(h["params"])
            if pd_.pop("kind", None) != "robust":
                raise ValueError("kind")
            st = cls(RobustParams(**pd_))
            n, count, nq, strikes, shape = h["len"], h["count"], h["n_queries"], h["strikes"], h["shape"]
            nf, dim = h.get("feat_len", 0), h.get("feat_dim", 0)
            ok = (_is_int(n) and 0 <= n <= min(st.params.memory, nq) and _is_int(count)
                  and _is_int(nf) and 0 <= nf <= min(st.params.feat_memory, nq) and _is_int(dim)
                  and 0 <= dim <= 65536 and (nf == 0 or dim > 0)
                  and 0 <= count <= st.params.l_sp and _is_int(nq) and isinstance(strikes, list)
                  and all(_is_int(s) and 1 <= s <= nq for s in strikes)
                  and (shape is None or (isinstance(shape, list) and len(shape) == 3)))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise FilterInputError(f"{fail} (header)") from None
        if not ok or len(raw) != 8 * n * st.params.words + 4 * nf * dim:
            raise FilterInputError(f"{fail} (counters or memory size out of range)")
        if dim:
            feats = np.frombuffer(raw, dtype="<f4", offset=8 * n * st.params.words).reshape(nf, dim)
            if not np.isfinite(feats).all():
                raise FilterInputError(f"{fail} (embeddings not finite)")
            st._feat = np.zeros((st.params.feat_memory, dim), np.float32)
            st._feat[:nf] = feats
            st._nf, st._fhead = nf, nf % st.params.feat_memory
        raw = raw[:8 * n * st.params.words]
        st.count, st.n_queries, st.strikes = count, nq, list(strikes)
        st._shape = None if shape is None else tuple(int(v) for v in shape)
        st._mem[:, :n] = np.frombuffer(raw, dtype="<u8").reshape(n, st.params.words).T
        st._n, st._head = n, n % st.params.memory
        return st

    def __repr__(self) -> str:
        return (f"RobustClientState({self.params.label()}, strikes={self.count}, memory={self._n}, "
                f"queries={self.n_queries}, blocked={self.blocked})")


# ----------------------------------------------------------------------------- across clients

def pixel_digest(q: np.ndarray) -> int:
    """64-bit digest of the query's 8-bit pixels (exact duplicates share it)."""
    u8 = np.round(np.clip(np.asarray(q, np.float64), 0, None) * 255).astype(np.uint16).tobytes()
    return int.from_bytes(hashlib.blake2b(u8, digest_size=8).digest(), "little")


class CrossClientWindow:
    """The last ``size`` fingerprints of all clients.  :meth:`check` says whether a query
    is near the queries of at least ``k`` *other* client ids in that window (then it is
    refused: an attacker who spreads near-duplicate queries over fresh ids gets at most
    about ``k`` answers per cluster of near-duplicate queries within the window).
    Pixel-identical queries (the same file: a popular image many users send) are not
    counted: an exact copy tells an attacker nothing a first answer did not."""

    def __init__(self, params: RobustParams, size: int = 2048, k: int = 4):
        if not _is_int(size) or size < 1 or not _is_int(k) or k < 1:
            raise ValueError(f"size and k must be integers >= 1, got {size!r}, {k!r}")
        self.params, self.size, self.k = params, int(size), int(k)
        self._mem = np.zeros((params.words, self.size), np.uint64)      # column-major, as per client
        self._owner: List[Optional[Hashable]] = [None] * self.size
        self._digest = np.zeros(self.size, np.uint64)
        self._n = self._head = 0
        self._fp = Fingerprinter(params)
        self.refused = 0

    def others_near(self, client: Hashable, variants: np.ndarray, digest: int) -> int:
        d = _hamming_min_cols(variants, self._mem, self._n)
        idx = np.flatnonzero((d <= self.params.t_bits) & (self._digest[:self._n] != np.uint64(digest)))
        return len({self._owner[i] for i in idx} - {client})

    def check(self, client: Hashable, img: np.ndarray, variants: Optional[np.ndarray] = None) -> bool:
        """True: answer the query (it is remembered); False: refuse it (not remembered)."""
        q = np.asarray(img, np.float32).reshape((-1,) + np.shape(img)[-2:])
        v = self._fp.variants(q) if variants is None else variants
        dig = pixel_digest(q)
        if self.others_near(client, v, dig) >= self.k:
            self.refused += 1
            return False
        self._mem[:, self._head] = v[self._fp.centre]
        self._digest[self._head] = np.uint64(dig)
        self._owner[self._head] = client
        self._head = (self._head + 1) % self.size
        self._n = min(self._n + 1, self.size)
        return True
