"""The similarity filter's per-client state in one SQLite file (WAL) or one PostgreSQL
database (:mod:`raymia.serving.backends`): a snapshot plus an append-only query log per
client, written in one transaction per batch of checks before the verdicts are returned;
any number of processes (on any number of nodes, with PostgreSQL) can hold the store and
the database stays the single source of truth; request ids make a retried check count once.  Operator
side: a bounded (LRU) in-memory cache, TTL purge of inactive unblocked clients, durable
(fsync'd) blocks, quarantine of corrupt snapshots, the evidence of every match and an
audit trail (``events`` table plus one JSON log line per event on ``raymia.audit``).

(~600 lines: every transaction over the one schema, so that each write path and its
durability rule read together.)"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..config import ConfigError
from .backends import open_backend


def shard_of(client_id: str, n_shards: int) -> int:
    """Stable shard of a client id (crc32, the same in every process)."""
    return zlib.crc32(client_id.encode("utf-8")) % n_shards


def _pack_image(image: np.ndarray) -> tuple[int, bytes]:
    """(1, uint8 bytes) when the float32 image is exactly k/255 (a decoded PNG/JPEG: the
    replay then gives the same bits), else (0, float32 bytes)."""
    q = np.rint(image * 255.0)
    if q.min() >= 0 and q.max() <= 255 and np.array_equal(q.astype(np.uint8).astype(np.float32) / 255.0, image):
        return 1, q.astype(np.uint8).tobytes()
    return 0, image.astype("<f4").tobytes()


def _unpack_image(blob: bytes, u8: int, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape))
    if u8:
        return np.frombuffer(blob, dtype=np.uint8, count=n).reshape(shape).astype(np.float32) / 255.0
    return np.frombuffer(blob, dtype="<f4", count=n).reshape(shape).astype(np.float32)


def _unpack_log(blob: bytes, u8: int, shape: tuple) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A logged query: the image and, after its bytes, the model's embedding of it when the
    detector takes one (the robust detector's feature rule), else None."""
    blob = bytes(blob)
    size = int(np.prod(shape)) * (1 if u8 else 4)
    if len(blob) < size or (len(blob) - size) % 4:
        raise ValueError(f"logged query of {len(blob)} bytes does not fit its shape {tuple(shape)}")
    rest = blob[size:]
    return _unpack_image(blob, u8, shape), (np.frombuffer(rest, dtype="<f4").copy() if rest else None)


audit_log = logging.getLogger("raymia.audit")


def audit_line(kind: str, **fields) -> str:
    """One audit record as a JSON line (``{"audit": kind, "at": ..., ...}``)."""
    return json.dumps({"audit": kind, "at": round(time.time(), 6), **fields}, sort_keys=True, default=str)


def emit_audit(kind: str, **fields) -> str:
    line = audit_line(kind, **fields)
    audit_log.warning(line)
    return line


def state_nbytes(st) -> int:
    """Memory of one cached client state (either detector's ``nbytes``)."""
    return int(st.nbytes())


class StateConflict(RuntimeError):
    """A client's stored state changed under us (another holder of the store wrote it)."""


@dataclass
class _Entry:
    version: int
    state: Any
    seq: int          # queries logged for this client so far
    snap_seq: int     # seq covered by the stored snapshot
    nbytes: int = 0   # state_nbytes(state), for the cache bound


class FilterStateStore:
    """Per-client :class:`~raymia.defenses.filter.ClientFilterState` in one SQLite file (WAL)
    or, for ``path`` a ``postgresql://`` URL, one PostgreSQL database.

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

    def __init__(self, path, params, request_ttl_s: float = 600.0, snapshot_every: Optional[int] = None,
                 cache_clients: int = 5000, cache_bytes: int = 512 << 20, client_ttl_s: float = 0.0):
        from ..defenses.filter import FilterInputError
        self.params, self.ttl = params, float(request_ttl_s)
        self._input_error = FilterInputError
        self.snapshot_every = int(snapshot_every or params.snapshot_every)
        self._cls = params.state_class()
        self.cache_clients, self.cache_bytes = int(cache_clients), int(cache_bytes)
        self.client_ttl_s = float(client_ttl_s)
        self.db = open_backend(path)
        self.where = self.db.where
        self.cache: "OrderedDict[str, _Entry]" = OrderedDict()
        self.cache_used = 0                 # bytes of the cached states (state_nbytes)
        self.lock = threading.Lock()
        self.writes, self._next_prune = 0, 256
        self._pending_audit: list = []
        self._durable = False
        self._empty_blob = self._cls(self.params).to_bytes()
        self.stats = {"evicted": 0, "fsyncs": 0, "fsync_s": 0.0, "quarantined": 0, "purged": 0}
        self._check_params()

    def _check_params(self) -> None:
        mine = json.dumps(self.params.to_dict(), sort_keys=True)     # ssim_window only when not the default
        with self._tx():
            self.db.execute("INSERT INTO meta VALUES ('filter_params', ?) ON CONFLICT DO NOTHING", (mine,))
            row = self.db.execute("SELECT value FROM meta WHERE key='filter_params'").fetchone()
            if row[0] != mine:
                raise ConfigError(
                    f"the filter state store {self.where} was written with other filter parameters ({row[0]}) "
                    f"than this app's ({mine}); keep the old parameters, or set serve.state_path "
                    "(serve.state_url) to a new file (database); the old one keeps its clients' blocks")

    @contextlib.contextmanager
    def _tx(self, clients=()):
        """One write transaction holding the locks of ``clients`` (or, inside one already,
        part of it); audit lines happen after the outermost commit, never for a rollback; a
        commit that blocks a client is durable (the backend's ``commit``) before it returns."""
        if self.db.in_transaction:
            self.db.lock_clients(clients)
            yield
            return
        self.db.begin(clients)
        try:
            yield
        except BaseException:
            self.db.rollback()
            self._pending_audit.clear()
            self._durable = False
            raise
        durable, self._durable = self._durable, False
        dt = self.db.commit(durable)
        if durable:
            self.stats["fsyncs"] += 1
            self.stats["fsync_s"] += dt
        lines, self._pending_audit = self._pending_audit, []
        for line in lines:
            audit_log.warning(line)

    def _audit(self, kind: str, client_id: Optional[str], now: float, **detail) -> None:
        """An audit event (inside the current transaction): a row in ``events`` and, once
        committed, one JSON line on the ``raymia.audit`` logger."""
        self.db.lock_events()            # event ids commit in order (PostgreSQL)
        self.db.execute("INSERT INTO events (at, kind, client_id, detail) VALUES (?, ?, ?, ?)",
                        (now, kind, client_id, json.dumps(detail, sort_keys=True, default=str)))
        self._pending_audit.append(audit_line(kind, client_id=client_id, **detail))

    # -- the bounded cache
    def _put(self, client_id: str, e: _Entry) -> None:
        old = self.cache.pop(client_id, None)
        if old is not None:
            self.cache_used -= old.nbytes
        e.nbytes = state_nbytes(e.state)
        self.cache[client_id] = e
        self.cache_used += e.nbytes
        while len(self.cache) > 1 and (len(self.cache) > self.cache_clients or self.cache_used > self.cache_bytes):
            _, ev = self.cache.popitem(last=False)      # least recently used; the file keeps it (blocks too)
            self.cache_used -= ev.nbytes
            self.stats["evicted"] += 1

    def _drop(self, client_id: str) -> None:
        old = self.cache.pop(client_id, None)
        if old is not None:
            self.cache_used -= old.nbytes

    def cache_info(self) -> dict:
        return {"entries": len(self.cache), "bytes": int(self.cache_used), "max_entries": self.cache_clients,
                "max_bytes": self.cache_bytes, **self.stats}

    # -- reading
    def _load(self, client_id: str) -> _Entry:
        row = self.db.execute("SELECT version FROM clients WHERE client_id=?", (client_id,)).fetchone()
        hit = self.cache.get(client_id)
        if hit is not None and hit.version == (row[0] if row else 0):
            self.cache.move_to_end(client_id)
            return hit
        if row is None:
            e = _Entry(0, self._cls(self.params), 0, 0)
        else:
            full = self.db.execute("SELECT version, blocked, count, n_queries, seq, snap_seq, snapshot, updated "
                                   "FROM clients WHERE client_id=?", (client_id,)).fetchone()
            version, blocked, count, nq, seq, snap_seq, blob, _ = full
            try:
                st = self._cls.from_bytes(bytes(blob))
                for c, h, w, u8, img in self.db.execute("SELECT c, h, w, u8, image FROM log WHERE client_id=? AND "
                                                        "seq>? ORDER BY seq", (client_id, snap_seq)):
                    if not st.blocked:
                        q, f = _unpack_log(img, u8, (c, h, w))
                        st.check(q) if f is None else st.check(q, feature=f)
                st.count, st.n_queries = int(count), int(nq)     # the stored counters are the truth
                e = _Entry(int(version), st, int(seq), int(snap_seq))
            except Exception as err:      # a corrupt snapshot or log: set it aside, start clean
                e = self._quarantine(client_id, full, err)
        self._put(client_id, e)
        return e

    def _quarantine(self, client_id: str, full: tuple, err: Exception) -> _Entry:
        """Keep a client's unreadable snapshot aside (table ``quarantine``, with its counters)
        and give the client a clean state: empty buffer and counter 0, or still blocked
        when it was (corruption never undoes a block)."""
        version, blocked, count, nq, seq, snap_seq, blob, updated = full
        st = self._cls(self.params)
        st.n_queries = int(nq)
        if blocked:
            st.count = int(self.params.l_sp)
        now = time.time()
        msg = f"{type(err).__name__}: {err}"[:500]
        with self._tx([client_id]):
            n_log = self.db.execute("SELECT count(*) FROM log WHERE client_id=?", (client_id,)).fetchone()[0]
            row = {"version": version, "blocked": blocked, "count": count, "n_queries": nq, "seq": seq,
                   "snap_seq": snap_seq, "updated": updated, "log_rows": n_log}
            self.db.execute("INSERT INTO quarantine (client_id, at, error, row, snapshot) VALUES (?, ?, ?, ?, ?)",
                            (client_id, now, msg, json.dumps(row), blob))
            self.db.execute("DELETE FROM log WHERE client_id=?", (client_id,))
            cur = self.db.execute("UPDATE clients SET version=version+1, count=?, seq=?, snap_seq=?, snapshot=?, "
                                  "updated=? WHERE client_id=? AND version=?",
                                  (int(st.count), int(seq), int(seq), st.to_bytes(), now, client_id, version))
            if cur.rowcount != 1:
                raise StateConflict(f"client {client_id!r}: stored version changed during quarantine")
            self._audit("quarantine", client_id, now, error=msg, blocked=bool(blocked), n_queries=int(nq))
            self._durable = self._durable or bool(blocked)
        self.stats["quarantined"] += 1
        return _Entry(int(version) + 1, st, int(seq), int(seq))

    @staticmethod
    def describe(st) -> dict:
        return {"blocked": bool(st.blocked), "count": int(st.count), "n_queries": int(st.n_queries)}

    def get(self, client_id: str) -> Optional[dict]:
        with self.lock:
            row = self.db.execute("SELECT version, updated FROM clients WHERE client_id=?", (client_id,)).fetchone()
            if row is None:
                return None
            e = self._load(client_id)
            row = self.db.execute("SELECT version, updated FROM clients WHERE client_id=?", (client_id,)).fetchone()
            nq = self.db.execute("SELECT count(*) FROM quarantine WHERE client_id=?", (client_id,)).fetchone()[0]
            return {"client_id": client_id, **self.describe(e.state), "version": row[0], "updated": row[1],
                    "buffered": len(e.state), "limit": int(self.params.l_sp),
                    "buffer_size": int(self.params.capacity),
                    **({"quarantined": int(nq)} if nq else {})}

    def blocked_clients(self, limit: int = 1000) -> list[str]:
        with self.lock:
            rows = self.db.execute("SELECT client_id FROM clients WHERE blocked=1 ORDER BY updated DESC LIMIT ?",
                                   (int(limit),)).fetchall()
        return [r[0] for r in rows]

    def list_clients(self, after: str = "", limit: int = 100, blocked: Optional[bool] = None) -> dict:
        """One page of clients ordered by id (keyset paging: pass ``next`` as ``after``)."""
        limit = max(1, min(int(limit), 1000))
        where, args = "client_id > ?", [after or ""]
        if blocked is not None:
            where += " AND blocked = ?"
            args.append(int(bool(blocked)))
        with self.lock:
            rows = self.db.execute(f"SELECT client_id, blocked, count, n_queries, updated FROM clients WHERE {where} "
                                   "ORDER BY client_id LIMIT ?", (*args, limit + 1)).fetchall()
        page = [{"client_id": r[0], "blocked": bool(r[1]), "count": int(r[2]), "n_queries": int(r[3]),
                 "updated": r[4]} for r in rows[:limit]]
        return {"clients": page, "next": page[-1]["client_id"] if len(rows) > limit else None}

    def why(self, client_id: str, limit: int = 200) -> dict:
        """Why a client was blocked: the evidence of every query that raised its counter
        (which buffered earlier queries it matched, with their SSIM and hash differences)
        and its block / unblock / purge / quarantine events; kept after unblock and purge."""
        with self.lock:
            ev = self.db.execute("SELECT id, at, detail FROM evidence WHERE client_id=? ORDER BY id DESC LIMIT ?",
                                 (client_id, int(limit))).fetchall()
            evs = self.db.execute("SELECT id, at, kind, detail FROM events WHERE client_id=? ORDER BY id DESC "
                                  "LIMIT ?", (client_id, int(limit))).fetchall()
        return {"client_id": client_id,
                "evidence": [{"id": i, "at": at, **json.loads(d)} for i, at, d in reversed(ev)],
                "events": [{"id": i, "at": at, "kind": k, **json.loads(d)} for i, at, k, d in reversed(evs)],
                "thresholds": self.params.thresholds()}

    def events(self, after: int = 0, limit: int = 100, kinds: Optional[Sequence[str]] = None) -> list:
        where, args = "id > ?", [int(after)]
        if kinds:
            where += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        with self.lock:
            rows = self.db.execute(f"SELECT id, at, kind, client_id, detail FROM events WHERE {where} ORDER BY id "
                                   "LIMIT ?", (*args, max(1, min(int(limit), 10000)))).fetchall()
        return [{"id": i, "at": at, "kind": k, "client_id": c, **json.loads(d)} for i, at, k, c, d in rows]

    def last_event(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def quarantined(self, limit: int = 100) -> list:
        with self.lock:
            rows = self.db.execute("SELECT id, client_id, at, error, row, length(snapshot) FROM quarantine "
                                   "ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
        return [{"id": i, "client_id": c, "at": at, "error": err, "row": json.loads(r), "snapshot_bytes": n}
                for i, c, at, err, r, n in rows]

    def footprint(self, checkpoint: bool = False) -> dict:
        """Bytes on disk (SQLite: file + WAL, after a WAL checkpoint when asked; PostgreSQL:
        the tables with indexes and TOAST, after a VACUUM when asked) and clients stored."""
        with self.lock:
            size = self.db.nbytes(checkpoint)
            n = self.db.execute("SELECT count(*) FROM clients").fetchone()[0]
        return {"clients": int(n), "bytes": int(size)}

    # -- writing: always inside one IMMEDIATE transaction, so nobody else writes meanwhile
    def _store(self, client_id: str, e: _Entry, st, image: Optional[np.ndarray], snapshot: bool,
               request_id: Optional[str], verdict: dict, now: float, feature: Optional[np.ndarray] = None) -> _Entry:
        """Store the state after one change: the logged query (``image``, and its embedding
        ``feature`` when the detector takes one; None when only the counters changed) or a
        new snapshot.  Returns the new cache entry.  A new
        client's row starts with the empty state's snapshot (~0.3 KB) plus its first query
        in the log (one image), not with a snapshot of a full buffer."""
        new = e.version == 0
        snapshot = snapshot or (new and image is None)
        seq = e.seq + (1 if image is not None or snapshot else 0)
        snap_seq = seq if snapshot else e.snap_seq
        counters = (int(st.blocked), int(st.count), int(st.n_queries), seq, snap_seq)
        if new:
            blob = st.to_bytes() if snapshot else self._empty_blob
            cur = self.db.execute("INSERT INTO clients VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                  (client_id, *counters, blob, now))
        elif snapshot:
            cur = self.db.execute("UPDATE clients SET version=version+1, blocked=?, count=?, n_queries=?, seq=?, "
                                  "snap_seq=?, snapshot=?, updated=? WHERE client_id=? AND version=?",
                                  (*counters, st.to_bytes(), now, client_id, e.version))
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
            if feature is not None:
                blob += np.asarray(feature, "<f4").reshape(-1).tobytes()
            self.db.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?)", (client_id, seq, *image.shape, u8, blob))
        if request_id is not None:
            self.db.execute("INSERT INTO requests VALUES (?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
                            "verdict=excluded.verdict, created=excluded.created", (request_id, json.dumps(verdict), now))
        self.writes += 1
        return _Entry(e.version + 1, st, seq, snap_seq)

    def _evidence(self, client_id: str, st, r, near: Optional[tuple], now: float, **extra) -> None:
        compared = []
        if near is not None:
            pos, ssim, diffs, size = near
            first = st.n_queries - 1 - size + 1          # query number of the oldest buffered image
            compared = [{"query": int(first + p), "buffer_pos": int(p), "ssim": round(float(s), 6),
                         "hash_diff": float(d), "matched": bool(s > self.params.t_ssim)}
                        for p, s, d in zip(pos, ssim, diffs)]
        detail = {"query": int(st.n_queries), "matches": int(r.matches), "count": int(r.count),
                  "blocked": bool(r.blocked), "compared": compared, **extra}
        self.db.execute("INSERT INTO evidence (client_id, at, detail) VALUES (?, ?, ?)",
                        (client_id, now, json.dumps(detail, sort_keys=True)))

    def _check_one(self, client_id: str, image, request_id: Optional[str], now: float, feature=None) -> dict:
        if request_id is not None:
            row = self.db.execute("SELECT verdict FROM requests WHERE request_id=?", (request_id,)).fetchone()
            if row is not None:
                return {**json.loads(row[0]), "replayed": True}
        e = self._load(client_id)
        st, was_blocked = e.state, e.state.blocked
        # FilterInputError: refused, state unchanged
        r = st.check(image) if feature is None else st.check(image, feature=feature)
        near = getattr(st, "compared", None)   # Algorithm 2's SSIM comparisons of this check (robust: none)
        verdict = {"safe": bool(r.safe), "blocked": bool(r.blocked), "count": int(r.count),
                   "matches": int(r.matches), "n_queries": int(st.n_queries)}
        logged = None if was_blocked else np.asarray(image, dtype=np.float32).reshape(st.shape)
        snapshot = logged is not None and e.seq + 1 - e.snap_seq >= self.snapshot_every
        self._put(client_id, self._store(client_id, e, st, logged, snapshot, request_id, verdict, now,
                                         None if feature is None else np.asarray(feature, np.float32)))
        if r.matches:
            self._evidence(client_id, st, r, near, now)
        if r.blocked and not was_blocked:                # the transition: audited and fsync'd before the 403
            self._audit("block", client_id, now, count=int(r.count), n_queries=int(st.n_queries), by="filter")
            self._durable = True
        return {**verdict, "replayed": False}

    def _batch(self, fn, items) -> list:
        """Run ``fn(item, now)`` for every item in one transaction (group commit); any
        failure rolls all of them back and drops their cached states."""
        with self.lock:
            touched, out, now = set(), [], time.time()
            try:
                with self._tx([item[0] for item in items]):
                    for item in items:
                        touched.add(item[0])
                        out.append(fn(item, now))
            except BaseException:
                for c in touched:
                    self._drop(c)              # the stored state is the truth
                raise
            if self.writes >= self._next_prune:
                self._next_prune = self.writes + 256
                self.db.execute("DELETE FROM requests WHERE created < ?", (now - self.ttl,))
                if self.client_ttl_s > 0:
                    self._purge_inactive(self.client_ttl_s, now)
            return out

    def check_many(self, items: Sequence[tuple]) -> list:
        """The filter for several queries ``(client_id, image, request_id[, embedding])`` (the
        embedding: the model's, for the robust detector's feature rule), in order, and
        one commit for all; per item its verdict ``{"safe", "blocked", "count", "matches",
        "n_queries", "replayed"}`` or the :class:`~raymia.defenses.filter.FilterInputError`
        that refused it (that client's state unchanged)."""
        def one(item, now):
            try:
                return self._check_one(item[0], item[1], item[2], now, item[3] if len(item) > 3 else None)
            except self._input_error as err:
                return err
        out = self._batch(one, items)
        if any(isinstance(v, dict) and v.get("blocked") for v in out):
            mark = self.last_event()
            out = [{**v, "mark": mark} if isinstance(v, dict) and v.get("blocked") else v for v in out]
        return out

    def check(self, client_id: str, image: np.ndarray, request_id: Optional[str] = None,
              feature: Optional[np.ndarray] = None) -> dict:
        """One query (see :meth:`check_many`); a refused input raises FilterInputError."""
        (res,) = self.check_many([(client_id, image, request_id) + (() if feature is None else (feature,))])
        if isinstance(res, Exception):
            raise res
        return res

    def reset(self, client_id: str, by: str = "admin") -> dict:
        """Operator unblock: the client starts over with an empty buffer and counter.  Its
        evidence and events stay (``why``)."""
        def one(item, now):
            e = self._load(client_id)
            before = self.describe(e.state)
            st = self._cls(self.params)
            self._put(client_id, self._store(client_id, e, st, None, True, None, {}, now))
            self._audit("unblock", client_id, now, before=before, by=by)
            return {"client_id": client_id, **self.describe(st)}
        return self._batch(one, [(client_id,)])[0]

    def block(self, client_id: str, reason: str = "", by: str = "admin") -> dict:
        """Operator block: the client is refused from now on, as if its counter had reached
        L_sp (durable before this returns); unblock undoes it."""
        def one(item, now):
            e = self._load(client_id)
            st = e.state
            if st.blocked:
                return {"client_id": client_id, **self.describe(st), "changed": False}
            st.count = int(self.params.l_sp)
            self._put(client_id, self._store(client_id, e, st, None, e.version == 0, None, {}, now))
            self.db.execute("INSERT INTO evidence (client_id, at, detail) VALUES (?, ?, ?)",
                            (client_id, now, json.dumps({"manual": True, "reason": reason, "by": by,
                                                         "n_queries": int(st.n_queries)})))
            self._audit("manual_block", client_id, now, reason=reason, by=by, n_queries=int(st.n_queries))
            self._durable = True
            return {"client_id": client_id, **self.describe(st), "changed": True}
        return self._batch(one, [(client_id,)])[0]

    def add_queries(self, counts: dict) -> int:
        """Queries of blocked clients that a replica refused by itself (no model, no check):
        added to their query counts, one statement per client per flush.  Clients no
        longer blocked (an unblock meanwhile) are skipped.  Returns the clients updated."""
        def one(item, now):
            cid, n = item
            cur = self.db.execute("UPDATE clients SET version=version+1, n_queries=n_queries+?, updated=? "
                                  "WHERE client_id=? AND blocked=1", (int(n), now, cid))
            hit = self.cache.get(cid)
            if cur.rowcount == 1 and hit is not None:
                hit.version += 1
                hit.state.n_queries += int(n)
            elif hit is not None:
                self._drop(cid)
            return cur.rowcount
        return sum(self._batch(one, list(counts.items()))) if counts else 0

    def purge(self, client_id: str, by: str = "admin") -> dict:
        """Forget one client's state (buffer, counters, log; blocked or not).  Its evidence
        and events stay.  Returns ``{"purged": bool}``."""
        def one(item, now):
            row = self.db.execute("SELECT blocked, n_queries FROM clients WHERE client_id=?", (client_id,)).fetchone()
            self.db.execute("DELETE FROM log WHERE client_id=?", (client_id,))
            self.db.execute("DELETE FROM clients WHERE client_id=?", (client_id,))
            self._drop(client_id)
            if row is not None:
                self._audit("purge", client_id, now, by=by, blocked=bool(row[0]), n_queries=int(row[1]))
                self.stats["purged"] += 1
            return {"client_id": client_id, "purged": row is not None, "was_blocked": bool(row and row[0])}
        return self._batch(one, [(client_id,)])[0]

    def _purge_inactive(self, older_than_s: float, now: float, by: str = "ttl", limit: int = 10000) -> int:
        ids = [r[0] for r in self.db.execute("SELECT client_id FROM clients WHERE blocked=0 AND updated < ? "
                                             "LIMIT ?", (now - older_than_s, int(limit)))]
        if not ids:
            return 0
        with self._tx(ids):
            for cid in ids:              # still unblocked and inactive under the lock: then forget it
                cur = self.db.execute("DELETE FROM clients WHERE client_id=? AND blocked=0 AND updated < ?",
                                      (cid, now - older_than_s))
                if cur.rowcount == 1:
                    self.db.execute("DELETE FROM log WHERE client_id=?", (cid,))
                self._drop(cid)
            self._audit("purge_inactive", None, now, by=by, clients=len(ids), older_than_s=float(older_than_s))
        self.stats["purged"] += len(ids)
        return len(ids)

    def purge_inactive(self, older_than_s: Optional[float] = None, by: str = "admin") -> int:
        """Forget every unblocked client inactive for ``older_than_s`` (default: the
        configured TTL); blocked clients are never purged this way.  Returns the count."""
        ttl = self.client_ttl_s if older_than_s is None else float(older_than_s)
        with self.lock:
            total = 0
            while True:
                n = self._purge_inactive(ttl, time.time(), by)
                total += n
                if n < 10000:
                    return total

    def close(self) -> None:
        self.db.close()
