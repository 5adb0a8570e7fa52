"""The similarity filter's per-client state in one SQLite file (WAL): a snapshot plus an
append-only query log per client, written in one transaction per batch of checks before
the verdicts are returned; any number of processes can hold the store and the file stays
the single source of truth; request ids make a retried check count once."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import ConfigError


def shard_of(client_id: str, n_shards: int) -> int:
    """Stable shard of a client id (crc32, the same in every process)."""
    return zlib.crc32(client_id.encode("utf-8")) % n_shards


def _pack_image(image: np.ndarray) -> tuple[int, bytes]:
    """(1, uint8 bytes) when the float32 image is exactly k/255 (a decoded PNG/JPEG: the
    replay then gives the same bits), else (0, float32 bytes)."""
    q = np.rint(image * 255.0)
    if q.min() >= 0 and q.max() <= 255 and np.array_equal(q.astype(np.uint8).astype(np.float32) / 255.0, image):
        return 1, sqlite3.Binary(q.astype(np.uint8).tobytes())
    return 0, sqlite3.Binary(image.astype("<f4").tobytes())


def _unpack_image(blob: bytes, u8: int, shape: tuple) -> np.ndarray:
    if u8:
        return np.frombuffer(blob, dtype=np.uint8).reshape(shape).astype(np.float32) / 255.0
    return np.frombuffer(blob, dtype="<f4").reshape(shape).astype(np.float32)


class StateConflict(RuntimeError):
    """A client's stored state changed under us (another holder of the store wrote it)."""


@dataclass
class _Entry:
    version: int
    state: Any
    seq: int          # queries logged for this client so far
    snap_seq: int     # seq covered by the stored snapshot


class FilterStateStore:
    """Per-client :class:`~raymia.defenses.filter.ClientFilterState` in one SQLite file (WAL).

    Each client has a snapshot (``ClientFilterState.to_bytes``) and an append-only log of
    the queries checked since (one image each); loading replays the log on the snapshot
    through ``check`` (deterministic), then restores the stored counter and query count,
    so a block is never lost.  A new snapshot is written every ``snapshot_every`` logged
    queries (default 2 N_B), which keeps writes at about one image per query instead of the
    whole buffer (an 8-bit image, as PNG/JPEG requests give, is logged as its bytes).
    Queries of an already blocked client change only its query count.

    ``check_many([(client, image, request_id), ...])`` runs the queries in order inside one
    ``BEGIN IMMEDIATE`` transaction (group commit): each loads its client's state (from the
    in-memory cache when the stored version is unchanged, so another holder's writes are
    always seen), runs the filter and stores the result; the commit happens before any
    verdict is returned, so a killed holder never loses a counted query, and any number of
    processes may hold the store.  The verdict of each request id is kept for
    ``request_ttl_s``: a retried request gets the same verdict without counting twice.  A
    refused input (:class:`~raymia.defenses.filter.FilterInputError`) changes nothing.
    The filter parameters are stored in the file; opening it with other parameters is
    refused (its buffers and counters were built under the old ones).
    """

    def __init__(self, path, params, request_ttl_s: float = 600.0, snapshot_every: Optional[int] = None):
        from ..defenses.filter import ClientFilterState, FilterInputError
        self.path, self.params, self.ttl = Path(path), params, float(request_ttl_s)
        self._input_error = FilterInputError
        self.snapshot_every = int(snapshot_every or 2 * params.n_b)
        self._cls = ClientFilterState
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, version INTEGER NOT NULL, "
            "blocked INTEGER NOT NULL, count INTEGER NOT NULL, n_queries INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "snap_seq INTEGER NOT NULL, snapshot BLOB NOT NULL, updated REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS log (client_id TEXT NOT NULL, seq INTEGER NOT NULL, c INTEGER NOT NULL, "
            "h INTEGER NOT NULL, w INTEGER NOT NULL, u8 INTEGER NOT NULL, image BLOB NOT NULL, "
            "PRIMARY KEY (client_id, seq)) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, verdict TEXT NOT NULL, "
            "created REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
        self._check_params()
        self.cache: dict[str, _Entry] = {}
        self.lock = threading.Lock()
        self.writes, self._next_prune = 0, 256

    def _check_params(self) -> None:
        mine = json.dumps(dataclasses.asdict(self.params), sort_keys=True)
        with self._tx():
            row = self.db.execute("SELECT value FROM meta WHERE key='filter_params'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('filter_params', ?)", (mine,))
            elif row[0] != mine:
                raise ConfigError(
                    f"the filter state file {self.path} was written with other filter parameters ({row[0]}) than "
                    f"this app's ({mine}); keep the old parameters, or set serve.state_path to a new file "
                    "(the old file keeps its clients' blocks)")

    @contextlib.contextmanager
    def _tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading
    def _load(self, client_id: str) -> _Entry:
        row = self.db.execute("SELECT version FROM clients WHERE client_id=?", (client_id,)).fetchone()
        hit = self.cache.get(client_id)
        if hit is not None and hit.version == (row[0] if row else 0):
            return hit
        if row is None:
            e = _Entry(0, self._cls(self.params), 0, 0)
        else:
            version, count, nq, seq, snap_seq, blob = self.db.execute(
                "SELECT version, count, n_queries, seq, snap_seq, snapshot FROM clients WHERE client_id=?",
                (client_id,)).fetchone()
            st = self._cls.from_bytes(bytes(blob))
            for c, h, w, u8, img in self.db.execute("SELECT c, h, w, u8, image FROM log WHERE client_id=? AND "
                                                    "seq>? ORDER BY seq", (client_id, snap_seq)):
                if not st.blocked:
                    st.check(_unpack_image(img, u8, (c, h, w)))
            st.count, st.n_queries = int(count), int(nq)     # the stored counters are the truth
            e = _Entry(int(version), st, int(seq), int(snap_seq))
        self.cache[client_id] = e
        return e

    @staticmethod
    def describe(st) -> dict:
        return {"blocked": bool(st.blocked), "count": int(st.count), "n_queries": int(st.n_queries)}

    def get(self, client_id: str) -> Optional[dict]:
        with self.lock:
            row = self.db.execute("SELECT version, updated FROM clients WHERE client_id=?", (client_id,)).fetchone()
            if row is None:
                return None
            e = self._load(client_id)
            return {"client_id": client_id, **self.describe(e.state), "version": row[0], "updated": row[1],
                    "buffered": len(e.state), "limit": int(self.params.l_sp), "buffer_size": int(self.params.n_b)}

    def blocked_clients(self, limit: int = 1000) -> list[str]:
        with self.lock:
            rows = self.db.execute("SELECT client_id FROM clients WHERE blocked=1 ORDER BY updated DESC LIMIT ?",
                                   (int(limit),)).fetchall()
        return [r[0] for r in rows]

    # -- writing: always inside one IMMEDIATE transaction, so nobody else writes meanwhile
    def _store(self, client_id: str, e: _Entry, st, image: Optional[np.ndarray], snapshot: bool,
               request_id: Optional[str], verdict: dict, now: float) -> _Entry:
        """Store the state after one change: the logged query (``image``; None when only
        the counters changed) or a new snapshot.  Returns the new cache entry."""
        snapshot = snapshot or e.version == 0       # a new client starts with a snapshot
        seq = e.seq + (1 if image is not None or snapshot else 0)
        snap_seq = seq if snapshot else e.snap_seq
        counters = (int(st.blocked), int(st.count), int(st.n_queries), seq, snap_seq)
        if e.version == 0:
            cur = self.db.execute("INSERT INTO clients VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                  (client_id, *counters, sqlite3.Binary(st.to_bytes()), now))
        elif snapshot:
            cur = self.db.execute("UPDATE clients SET version=version+1, blocked=?, count=?, n_queries=?, seq=?, "
                                  "snap_seq=?, snapshot=?, updated=? WHERE client_id=? AND version=?",
                                  (*counters, sqlite3.Binary(st.to_bytes()), now, client_id, e.version))
        else:
            cur = self.db.execute("UPDATE clients SET version=version+1, blocked=?, count=?, n_queries=?, seq=?, "
                                  "snap_seq=?, updated=? WHERE client_id=? AND version=?",
                                  (*counters, now, client_id, e.version))
        if cur.rowcount != 1:
            raise StateConflict(f"client {client_id!r}: stored version changed inside a write transaction")
        if snapshot:
            self.db.execute("DELETE FROM log WHERE client_id=? AND seq<=?", (client_id, seq))
        elif image is not None:
            u8, blob = _pack_image(image)
            self.db.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?)", (client_id, seq, *image.shape, u8, blob))
        if request_id is not None:
            self.db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", (request_id, json.dumps(verdict), now))
        self.writes += 1
        return _Entry(e.version + 1, st, seq, snap_seq)

    def _check_one(self, client_id: str, image, request_id: Optional[str], now: float) -> dict:
        if request_id is not None:
            row = self.db.execute("SELECT verdict FROM requests WHERE request_id=?", (request_id,)).fetchone()
            if row is not None:
                return {**json.loads(row[0]), "replayed": True}
        e = self._load(client_id)
        st, was_blocked = e.state, e.state.blocked
        r = st.check(image)            # FilterInputError: refused, state unchanged
        verdict = {"safe": bool(r.safe), "blocked": bool(r.blocked), "count": int(r.count),
                   "matches": int(r.matches), "n_queries": int(st.n_queries)}
        logged = None if was_blocked else np.asarray(image, dtype=np.float32).reshape(st.shape)
        snapshot = logged is not None and e.seq + 1 - e.snap_seq >= self.snapshot_every
        self.cache[client_id] = self._store(client_id, e, st, logged, snapshot, request_id, verdict, now)
        return {**verdict, "replayed": False}

    def _batch(self, fn, items) -> list:
        """Run ``fn(item, now)`` for every item in one transaction (group commit); any
        failure rolls all of them back and drops their cached states."""
        with self.lock:
            touched, out, now = set(), [], time.time()
            try:
                with self._tx():
                    for item in items:
                        touched.add(item[0])
                        out.append(fn(item, now))
            except BaseException:
                for c in touched:
                    self.cache.pop(c, None)        # the stored state is the truth
                raise
            if self.writes >= self._next_prune:
                self._next_prune = self.writes + 256
                self.db.execute("DELETE FROM requests WHERE created < ?", (now - self.ttl,))
            return out

    def check_many(self, items: Sequence[tuple]) -> list:
        """Algorithm 2 for several queries ``(client_id, image, request_id)``, in order, and
        one commit for all; per item its verdict ``{"safe", "blocked", "count", "matches",
        "n_queries", "replayed"}`` or the :class:`~raymia.defenses.filter.FilterInputError`
        that refused it (that client's state unchanged)."""
        def one(item, now):
            try:
                return self._check_one(item[0], item[1], item[2], now)
            except self._input_error as err:
                return err
        return self._batch(one, items)

    def check(self, client_id: str, image: np.ndarray, request_id: Optional[str] = None) -> dict:
        """One query (see :meth:`check_many`); a refused input raises FilterInputError."""
        (res,) = self.check_many([(client_id, image, request_id)])
        if isinstance(res, Exception):
            raise res
        return res

    def reset(self, client_id: str) -> dict:
        """Operator unblock: the client starts over with an empty buffer and counter."""
        def one(item, now):
            e, st = self._load(client_id), self._cls(self.params)
            self.cache[client_id] = self._store(client_id, e, st, None, True, None, {}, now)
            return {"client_id": client_id, **self.describe(st)}
        return self._batch(one, [(client_id,)])[0]

    def close(self) -> None:
        self.db.close()
