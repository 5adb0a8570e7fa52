"""Cross-client check (beyond the paper): :class:`GlobalIndex` links client ids that
send near-identical queries (Sybil / collusion) and blocks the group;
:class:`MultiClientFilter` is the server side of Algorithm 1 for many clients."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Tuple

import numpy as np

from .params import FilterInputError, FilterParams, _is_int, _validate_query
from .state import ClientFilterState, _query_hash, _RingStack


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
            ring = self._ring = _RingStack(self.size, q.shape, p.data_range, p.ssim_window)
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
