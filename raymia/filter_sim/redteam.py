"""Red team for the stateful filters (Algorithm 2 ``raha`` and the ``robust`` detector):
what an attacker who knows the filter tries, what benign users do, and the calibration of
the robust detector's thresholds on benign traffic (chosen on one half of the benign
identities, reported on the other).

* :class:`Gate` -- one deployed filter for many clients (per-client states, and for
  ``robust`` optionally the :class:`~raymia.defenses.filter.robust.CrossClientWindow`):
  ``ask(client, image) -> answered``.
* :func:`strategy_queries` -- the near-duplicate strategies (same PNG, grey-level dither,
  noise, shifts, rotations, photometric changes, JPEG re-encoding, a mix of them, decoys at
  several ratios, slow attacks, a fresh id per query, ids with API keys) as query streams.
* :func:`adaptive_queries` -- an OARS-style adaptive attacker that knows the robust
  detector: per query it picks, among candidate transformations, the least distorting one
  whose fingerprint is farther than ``t_bits`` from everything it sent before.
* :class:`GatedOracle` -- an attack oracle behind a gate: the black-box (NES) and the
  label-only attacks of :mod:`raymia.attacks` run unchanged, a refused query ends the row.
* :func:`benign_sessions` -- benign traffic: several photos of oneself, the same photo
  re-sent, crops, re-encodes, popular images many users send, interleaved into one stream.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..attacks.oracle import Oracle
from ..defenses.filter.robust import CrossClientWindow, Fingerprinter, RobustParams, hamming_min


# ----------------------------------------------------------------------------- the deployed filter

class Gate:
    """A filter in front of a model for many clients.  ``params``: FilterParams (Algorithm 2)
    or RobustParams; ``cross``: a CrossClientWindow (robust only) checked after the client's
    own state; a query it refuses is not answered, but the client is not blocked by it.
    ``embed``: images (N, C, H, W) -> their unit R_T embeddings (N, D), needed when the
    robust detector's feature rule is on (``feat_k``); :meth:`ask` takes a query's
    embedding if the caller has it already (from the model's forward pass)."""

    def __init__(self, params, cross: Optional[CrossClientWindow] = None,
                 embed: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.params, self.cross, self.embed = params, cross, embed
        self.robust = isinstance(params, RobustParams)
        self.needs_features = self.robust and params.feat_k > 0
        if self.needs_features and embed is None:
            raise ValueError("the robust detector's feature rule (feat_k > 0) needs an embed function")
        self._fp = Fingerprinter(params) if self.robust else None
        self.states: Dict[Hashable, object] = {}
        self.refused_cross = 0

    def state(self, client: Hashable):
        st = self.states.get(client)
        if st is None:
            st = self.states[client] = self.params.state_class()(self.params)
        return st

    def features(self, images: Sequence[np.ndarray], chunk: int = 512) -> Optional[np.ndarray]:
        """The embeddings of ``images`` in batches (None when the gate needs none)."""
        if not self.needs_features:
            return None
        x = np.asarray(images, np.float32)
        return np.concatenate([self.embed(x[i:i + chunk]) for i in range(0, len(x), chunk)])

    def ask(self, client: Hashable, image: np.ndarray, feature: Optional[np.ndarray] = None) -> bool:
        q = np.asarray(image, np.float32)
        st = self.state(client)
        if not self.robust:
            return st.check(q).safe
        if self.needs_features and feature is None:
            feature = self.embed(q[None])[0]
        v = self._fp.variants(q.reshape((-1,) + q.shape[-2:]))
        if not st.check(q, v, feature).safe:
            return False
        if self.cross is not None and not self.cross.check(client, q, v):
            self.refused_cross += 1
            return False
        return True

    def blocked(self, client: Hashable) -> bool:
        st = self.states.get(client)
        return bool(st is not None and st.blocked)


# ----------------------------------------------------------------------------- transformations

def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    c, h, w = img.shape
    s = max(abs(dy), abs(dx))
    if not s:
        return img.copy()
    pad = np.pad(img, ((0, 0), (s, s), (s, s)), mode="edge")
    return pad[:, s - dy:s - dy + h, s - dx:s - dx + w].copy()


def rotate(img: np.ndarray, deg: float) -> np.ndarray:
    from scipy.ndimage import rotate as _rot
    return np.clip(np.stack([_rot(ch, deg, reshape=False, order=1, mode="nearest") for ch in img]), 0, 1)


def scale(img: np.ndarray, f: float) -> np.ndarray:
    """Zoom about the centre by ``f`` (same size out)."""
    from scipy.ndimage import affine_transform
    c, h, w = img.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    m = np.eye(2) / f
    off = centre - m @ centre
    return np.clip(np.stack([affine_transform(ch, m, off, order=1, mode="nearest") for ch in img]), 0, 1)


def photometric(img: np.ndarray, gain: float, bias: float) -> np.ndarray:
    return np.clip(gain * img + bias, 0, 1)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at ``quality`` and decode (8-bit, as a client would)."""
    from PIL import Image
    u8 = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    pil = Image.fromarray(u8[0] if u8.shape[0] == 1 else np.moveaxis(u8, 0, -1))
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255.0
    return out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)


def to_u8(img: np.ndarray) -> np.ndarray:
    """What a PNG of ``img`` decodes to."""
    return np.round(np.clip(img, 0, 1) * 255).astype(np.float32) / 255.0


def crop_resize(img: np.ndarray, side: int, top: int, left: int) -> np.ndarray:
    """A ``side`` x ``side`` crop at (top, left), resized back to the image's size."""
    import torch.nn.functional as F
    c, h, w = img.shape
    t = torch.from_numpy(np.ascontiguousarray(img[:, top:top + side, left:left + side]))[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1).numpy()


def random_mix(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small changes a near-duplicate attacker combines: shift <= 2 px, rotation <= 3 deg,
    gain/bias, mild noise, sometimes a JPEG re-encode."""
    out = shift(img, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
    out = rotate(out, float(rng.uniform(-3, 3)))
    out = photometric(out, float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.04, 0.04)))
    out = np.clip(out + rng.normal(0, 0.02, out.shape), 0, 1)
    if rng.random() < 0.5:
        out = jpeg(out, int(rng.integers(50, 95)))
    return to_u8(out)


# ----------------------------------------------------------------------------- strategies

# name -> (description, how each attack query is made from the face: f(face, i, rng))
NEAR_DUPLICATES: Dict[str, Tuple[str, Callable]] = {
    "same_png": ("the same PNG every time", lambda f, i, r: to_u8(f)),
    "dither": ("+ (i mod 11)/255 on every pixel", lambda f, i, r: np.clip(to_u8(f) + (i % 11) / 255.0, 0, 1)),
    "noise_0.03": ("fresh Gaussian noise, sigma 0.03", lambda f, i, r: np.clip(f + r.normal(0, 0.03, f.shape), 0, 1)),
    "shift_2px": ("random shift of up to 2 px", lambda f, i, r: shift(f, int(r.integers(-2, 3)), int(r.integers(-2, 3)))),
    "rotate_4deg": ("random rotation of up to 4 degrees", lambda f, i, r: rotate(f, float(r.uniform(-4, 4)))),
    "photometric": ("random gain 0.8-1.2 and bias +-0.08",
                    lambda f, i, r: photometric(f, float(r.uniform(0.8, 1.2)), float(r.uniform(-0.08, 0.08)))),
    "jpeg": ("JPEG re-encoding at quality 30-95", lambda f, i, r: jpeg(f, int(r.integers(30, 96)))),
    "mixed": ("shift + rotation + gain/bias + noise + JPEG", lambda f, i, r: random_mix(f, r)),
}

# streams: (description, decoys per attack query, fresh id per query)
STREAMS: Dict[str, Tuple[str, int, bool]] = {
    "plain": ("attack queries only, one id", 0, False),
    "decoys_1to1": ("an unrelated image after every attack query", 1, False),
    "decoys_1to4": ("four unrelated images after every attack query", 4, False),
    "slow_1to20": ("twenty unrelated images after every attack query (a slow attack)", 20, False),
    "new_ids": ("a fresh client id for every query (self-declared ids)", 0, True),
}


_DECOY_MOVES = [(flip, dy, dx) for flip in (False, True) for dy in (0, 6, -6) for dx in (0, 6, -6)]


def decoy(pool: np.ndarray, j: int) -> np.ndarray:
    """The j-th decoy: pool image j mod n, mirrored and/or moved by 6 px on later passes
    through the pool (18 distinct versions per image, none near another for the detector),
    so that an attacker's decoys are never repeats of each other."""
    flip, dy, dx = _DECOY_MOVES[(j // len(pool)) % len(_DECOY_MOVES)]
    im = pool[j % len(pool)]
    im = im[:, :, ::-1] if flip else im
    return to_u8(shift(np.ascontiguousarray(im), dy, dx)).astype(np.float32)


def strategy_queries(face: np.ndarray, decoys: np.ndarray, make: Callable, n_attack: int, n_decoys: int,
                     fresh_ids: bool, rng: np.random.Generator, client: str = "attacker"
                     ) -> List[Tuple[str, np.ndarray, bool]]:
    """The query stream: (client id, image, is an attack query); the decoys are distinct
    images (:func:`decoy`, in a random order of the pool)."""
    out, order, j = [], rng.permutation(len(decoys)), 0
    for i in range(n_attack):
        out.append((f"{client}-{i}" if fresh_ids else client, make(face, i, rng).astype(np.float32), True))
        for _ in range(n_decoys):
            out.append((client, decoy(decoys[order], j), False))
            j += 1
    return out


@dataclass
class StreamResult:
    answered_attack: int       # attack queries answered (of n_attack)
    first_refused: int         # 1-based number (among attack queries) of the first refused one; 0 = none
    total_queries_at_block: int  # queries of the stream sent when the first attack query was refused
    n_attack: int


def run_stream(gate: Gate, stream: Sequence[Tuple[str, np.ndarray, bool]]) -> StreamResult:
    answered = first = at = k = 0
    feats = gate.features([img for _, img, _ in stream])
    for j, (cid, img, is_attack) in enumerate(stream, 1):
        ok = gate.ask(cid, img, None if feats is None else feats[j - 1])
        if is_attack:
            k += 1
            if ok:
                answered += 1
            elif not first:
                first, at = k, j
    return StreamResult(answered, first, at, k)


def disguise(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One random transformation of ``img`` at ``strength`` in (0, 1]: shift up to 6 px,
    rotation up to 12 degrees, zoom 0.85-1.15, gain/bias, noise, all scaled by strength;
    8-bit as sent."""
    s = float(strength)
    im = shift(img, int(rng.integers(-6, 7) * s), int(rng.integers(-6, 7) * s))
    im = rotate(im, float(rng.uniform(-12, 12) * s))
    im = scale(im, float(1 + rng.uniform(-0.15, 0.15) * s))
    im = photometric(im, float(1 + rng.uniform(-0.2, 0.2) * s), float(rng.uniform(-0.08, 0.08) * s))
    return to_u8(np.clip(im + rng.normal(0, 0.03 * s, im.shape), 0, 1)).astype(np.float32)


def _distance(variants: np.ndarray, sent: np.ndarray, nbits: int) -> int:
    """Hamming distance of a query (its shifted variants) to the nearest of ``sent`` (M, words)."""
    return int(hamming_min(variants, sent).min()) if len(sent) else nbits


def adaptive_queries(face: np.ndarray, params: RobustParams, n_attack: int, rng: np.random.Generator,
                     candidates: int = 24) -> Tuple[List[np.ndarray], List[float], List[int]]:
    """OARS-style adaptive attacker against the robust detector, which it knows (its
    fingerprint, the shift search, t_bits): for every query it draws ``candidates``
    transformations of growing strength (:func:`disguise`) and sends the least distorting
    one (highest SSIM to the face) whose distance to everything it sent before exceeds
    t_bits; with none, the farthest.  Returns the queries, their SSIM to the face and
    their distances."""
    from skimage.metrics import structural_similarity
    fp = Fingerprinter(params)
    sent: List[np.ndarray] = []
    out, ssims, dists = [], [], []
    for i in range(n_attack):
        best, mem = None, np.asarray(sent, np.uint64)
        for c in range(candidates):
            im = disguise(face, (c + 1) / candidates, rng)
            v = fp.variants(im)
            d = _distance(v, mem, fp.nbits)
            q = float(structural_similarity(face[0], im[0], data_range=1.0))
            key = (d > params.t_bits, q if d > params.t_bits else d)
            if best is None or key > best[0]:
                best = (key, im, q, d, v[fp.centre])
        _, im, q, d, own = best
        sent.append(own)
        out.append(im)
        ssims.append(q)
        dists.append(d)
    return out, ssims, dists


# ----------------------------------------------------------------------------- attacks behind a gate

class GatedOracle(Oracle):
    """An oracle behind a :class:`Gate`: each row is one client (``client_ids[r]``); its
    queries pass the gate in order and the first refused one ends the row (as a 403 does
    over HTTP).  The answers come from ``inner`` (e.g. an InProcessOracle)."""

    def __init__(self, inner: Oracle, gate: Gate, client_ids: Sequence[Hashable]):
        super().__init__(inner.n_rows, inner.n_classes, inner.labels_only, inner.top_k)
        self.inner, self.gate, self.ids = inner, gate, list(client_ids)

    def _ask(self, images, rows):
        x = images.float().clamp(0, 1).cpu().numpy()
        rr = rows.numpy()
        ok = np.zeros(len(rr), bool)
        feats = self.gate.features(x)
        for j, r in enumerate(rr):
            if self.blocked_at[r]:
                continue
            self.sent[r] += 1
            if self.gate.ask(self.ids[r], x[j], None if feats is None else feats[j]):
                ok[j] = True
                self.answered[r] += 1
            else:
                self.blocked_at[r] = self.sent[r]
        n = len(rr)
        labels = torch.full((n,), -1, dtype=torch.long)
        probs = None if self.labels_only else torch.full((n, self.n_classes), float("nan"))
        idx = np.flatnonzero(ok)
        if idx.size:
            rep = self.inner.query(images[idx], rows[idx])
            labels[idx] = rep.labels
            if probs is not None:
                probs[idx] = rep.probs
        return probs, labels, torch.from_numpy(ok)


class EvasiveOracle(Oracle):
    """The adaptive attacker combined with a query attack: in front of ``inner`` (e.g. a
    :class:`GatedOracle` with the robust detector) it replaces every query image by the
    first of ``candidates`` transformations of growing strength (:func:`disguise`) whose
    fingerprint is farther than t_bits from everything its row sent before (none: the
    farthest of them), and hands the answer back as the answer to the image it meant to
    ask about: the attack (NES, label-only) runs unchanged on answers to disguised queries.
    ``ssim[r]`` keeps, per row, the SSIM of each sent image to the intended one."""

    def __init__(self, inner: Oracle, params: RobustParams, seed: int, candidates: int = 24):
        super().__init__(inner.n_rows, inner.n_classes, inner.labels_only, inner.top_k)
        self.inner, self.params, self.candidates = inner, params, int(candidates)
        self.fp = Fingerprinter(params)
        self.rng = np.random.default_rng(seed)
        self.sent_fp: List[List[np.ndarray]] = [[] for _ in range(self.n_rows)]
        self.ssim: List[List[float]] = [[] for _ in range(self.n_rows)]

    def _disguised(self, img: np.ndarray, r: int) -> np.ndarray:
        from skimage.metrics import structural_similarity
        best, mem = None, np.asarray(self.sent_fp[r], np.uint64)
        for c in range(self.candidates):
            im = disguise(img, (c + 1) / self.candidates, self.rng)
            v = self.fp.variants(im)
            d = _distance(v, mem, self.fp.nbits)
            if best is None or d > best[0]:
                best = (d, im, v[self.fp.centre])
            if d > self.params.t_bits:
                break
        _, im, own = best
        self.sent_fp[r].append(own)
        self.ssim[r].append(float(structural_similarity(img[0], im[0], data_range=1.0)))
        return im

    def _ask(self, images, rows):
        x = images.float().clamp(0, 1).cpu().numpy()
        rr = rows.numpy()
        before = self.inner.sent.copy()
        sent = np.stack([self._disguised(x[j], int(r)) for j, r in enumerate(rr)])
        rep = self.inner.query(torch.from_numpy(sent), rows)
        for r in np.unique(rr):          # a row blocked within this call: its later disguises were never sent
            unsent = int(np.count_nonzero(rr == r)) - int(self.inner.sent[r] - before[r])
            if unsent:
                del self.ssim[r][-unsent:], self.sent_fp[r][-unsent:]
        self.answered[:], self.sent[:], self.blocked_at[:] = self.inner.answered, self.inner.sent, self.inner.blocked_at
        return rep.probs, rep.labels, rep.answered


# ----------------------------------------------------------------------------- benign traffic

def benign_sessions(photos: Dict[Hashable, np.ndarray], popular: np.ndarray, n: int, rng: np.random.Generator,
                    p_popular: float = 0.3, p_heavy: float = 0.05, heavy: Tuple[int, int] = (40, 120)
                    ) -> List[List[np.ndarray]]:
    """``n`` benign sessions.  ``photos``: identity -> its photos (k, C, H, W); ``popular``:
    images that many users send.  Each session is one user: 1-3 photos of one identity, each
    sent 1-3 times (a re-send is the same PNG, a JPEG re-encode, a 1-2 px re-crop or a 24-30
    px crop resized back), plus with probability ``p_popular`` one or two popular images
    (themselves sometimes re-encoded).  With probability ``p_heavy`` the user is a heavy one
    instead (a photo-tagging client): ``heavy`` (min, max) distinct images of everyone."""
    ids = list(photos)
    every = np.concatenate([photos[k] for k in ids] + [popular])
    out = []
    for _ in range(n):
        if rng.random() < p_heavy:
            k = int(rng.integers(heavy[0], min(heavy[1], len(every)) + 1))
            out.append([to_u8(every[i]).astype(np.float32) for i in rng.choice(len(every), k, replace=False)])
            continue
        pid = ids[int(rng.integers(len(ids)))]
        mine = photos[pid]
        k = int(rng.integers(1, min(3, len(mine)) + 1))
        sess = []
        for i in rng.choice(len(mine), k, replace=False):
            base = mine[i]
            for r in range(int(rng.integers(1, 4))):
                kind = "same" if r == 0 else rng.choice(["same", "jpeg", "recrop", "crop"])
                h = base.shape[-1]
                if kind == "same":
                    im = base
                elif kind == "jpeg":
                    im = jpeg(base, int(rng.integers(60, 96)))
                elif kind == "recrop":
                    im = shift(base, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
                else:
                    side = int(rng.integers(int(0.75 * h), h - 1))
                    im = crop_resize(base, side, int(rng.integers(0, h - side + 1)), int(rng.integers(0, h - side + 1)))
                sess.append(to_u8(im).astype(np.float32))
        if rng.random() < p_popular:
            for j in rng.choice(len(popular), int(rng.integers(1, 3)), replace=False):
                im = popular[j] if rng.random() < 0.5 else jpeg(popular[j], int(rng.integers(60, 96)))
                sess.append(to_u8(im).astype(np.float32))
        order = rng.permutation(len(sess))
        out.append([sess[i] for i in order])
    return out


def interleave(sessions: List[List[np.ndarray]], rng: np.random.Generator, prefix: str = "user"
               ) -> List[Tuple[str, np.ndarray]]:
    """One global stream of the sessions' queries (each session's order kept)."""
    pos = [0] * len(sessions)
    live = [i for i, s in enumerate(sessions) if s]
    out = []
    while live:
        j = int(rng.integers(len(live)))
        i = live[j]
        out.append((f"{prefix}-{i}", sessions[i][pos[i]]))
        pos[i] += 1
        if pos[i] == len(sessions[i]):
            live.pop(j)
    return out


def false_positives(gate: Gate, stream: List[Tuple[str, np.ndarray]], feats: Optional[np.ndarray] = None) -> dict:
    """Run benign traffic through a gate: sessions blocked, and sessions with any refusal.
    ``feats``: the stream's embeddings when already computed (else the gate computes them
    if it needs them)."""
    refused: Dict[str, int] = {}
    if feats is None:
        feats = gate.features([img for _, img in stream])
    for j, (cid, img) in enumerate(stream):
        if not gate.ask(cid, img, None if feats is None else feats[j]):
            refused[cid] = refused.get(cid, 0) + 1
    clients = {cid for cid, _ in stream}
    blocked = sum(gate.blocked(c) for c in clients)
    return {"sessions": len(clients), "queries": len(stream), "blocked": int(blocked),
            "refused_any": len(refused), "fpr_blocked": blocked / max(1, len(clients)),
            "fpr_refused": len(refused) / max(1, len(clients))}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    from scipy.stats import beta
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def split_identities(photos: Dict[Hashable, np.ndarray], rng: np.random.Generator):
    """Two disjoint halves of the identities: calibration, report."""
    ids = list(photos)
    order = rng.permutation(len(ids))
    half = len(ids) // 2
    cal = {ids[i]: photos[ids[i]] for i in order[:half]}
    rep = {ids[i]: photos[ids[i]] for i in order[half:]}
    return cal, rep

