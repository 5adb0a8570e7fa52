"""Where the filter-state store keeps its tables: one SQLite file (the embedded default, one
node) or a PostgreSQL database (``postgresql://...``, for apps whose replicas run on several
nodes).  :class:`~raymia.serving.store.FilterStateStore` writes its SQL once (``?``
placeholders, upserts both engines accept); a backend supplies the connection, the schema's
column types, transactions with their locks, and the durability of a commit:

* **SQLite**: ``BEGIN IMMEDIATE`` takes the file's write lock (one writer at a time, any
  number of processes); commits are not fsync'd (``synchronous=NORMAL``) except a *durable*
  one (a block), whose WAL is fsync'd before the commit returns.  The file is 0600.
* **PostgreSQL**: ``BEGIN`` plus a transaction-scoped advisory lock per client the
  transaction touches (``pg_advisory_xact_lock`` on a 64-bit hash of the id, taken in
  sorted order so two replicas never deadlock): updates of one client are serialised
  across replicas and nodes, different clients proceed in parallel, and a new client's
  first insert is covered too (a row lock would have no row to lock).  The version
  check on every UPDATE stays as a second guard.  Ordinary commits use
  ``synchronous_commit=off`` (like SQLite's NORMAL: a server crash may lose the counting
  of the last queries, never a committed block); a durable commit sets
  ``synchronous_commit=on`` for its transaction, so the server has flushed its WAL before
  the 403 leaves.  Audit events take one more advisory lock, so event ids commit in
  order and a reader polling ``id > last`` misses none.
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

from ..config import ConfigError

TABLES = ("clients", "log", "requests", "meta", "events", "evidence", "quarantine")

# one schema for both engines; {int}/{real}/{blob}/{serial} are the engine's column types
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, version {int} NOT NULL, "
    "blocked {int} NOT NULL, count {int} NOT NULL, n_queries {int} NOT NULL, seq {int} NOT NULL, "
    "snap_seq {int} NOT NULL, snapshot {blob} NOT NULL, updated {real} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS log (client_id TEXT NOT NULL, seq {int} NOT NULL, c {int} NOT NULL, "
    "h {int} NOT NULL, w {int} NOT NULL, u8 {int} NOT NULL, image {blob} NOT NULL, PRIMARY KEY (client_id, seq))",
    "CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, verdict TEXT NOT NULL, created {real} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS clients_activity ON clients (blocked, updated)",
    "CREATE TABLE IF NOT EXISTS events (id {serial}, at {real} NOT NULL, kind TEXT NOT NULL, client_id TEXT, "
    "detail TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_client ON events (client_id, id)",
    "CREATE TABLE IF NOT EXISTS evidence (id {serial}, client_id TEXT NOT NULL, at {real} NOT NULL, "
    "detail TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS evidence_client ON evidence (client_id, id)",
    "CREATE TABLE IF NOT EXISTS quarantine (id {serial}, client_id TEXT NOT NULL, at {real} NOT NULL, "
    "error TEXT NOT NULL, row TEXT NOT NULL, snapshot {blob})",
)


def is_postgres(locator) -> bool:
    return isinstance(locator, str) and locator.split("://", 1)[0] in ("postgresql", "postgres")


def redact(locator) -> str:
    """The locator without a password (for messages, logs and the plan)."""
    s = str(locator)
    if not is_postgres(s):
        return s
    u = urlsplit(s)
    if u.password is None:
        return s
    host = u.hostname or ""
    netloc = f"{u.username or ''}:***@{host}" + (f":{u.port}" if u.port else "")
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def open_backend(locator):
    """SQLite for a path, PostgreSQL for a ``postgresql://`` URL."""
    return PostgresBackend(locator) if is_postgres(locator) else SqliteBackend(Path(locator))


# file systems on which SQLite's WAL (shared memory, POSIX locks on one host) is unsafe
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "lustre", "ceph", "glusterfs",
              "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "afs", "gpfs", "beegfs"}


def mount_fstype(path: Path, mounts: str = "/proc/mounts") -> str:
    """The file-system type of the mount holding ``path`` ("" when unknown)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return ""
    p, best, kind = str(Path(path).resolve()), -1, ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, kind = len(mnt), parts[2]
    return kind


class SqliteBackend:
    kind = "sqlite"

    def __init__(self, path: Path, mounts: str = "/proc/mounts"):
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fs = mount_fstype(self.path.parent, mounts)
        if fs in NETWORK_FS:
            raise ConfigError(
                f"the filter state file {self.path} is on a network file system ({fs}), where SQLite's WAL can "
                "corrupt it; set serve.state_path to a local disk (one node) or serve.state_url to a "
                "postgresql:// database (several nodes)")
        self._secure()
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        # 8 KiB pages (new files only): a logged query (1 KiB as 8-bit, 4 KiB as float32 at 32x32)
        # fits in its leaf page instead of taking an overflow page of its own
        self.conn.execute("PRAGMA page_size=8192")
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: an ordinary commit is not fsync'd; a durable one is followed by an fsync of the WAL
        self.conn.execute("PRAGMA synchronous=NORMAL")
        types = {"int": "INTEGER", "real": "REAL", "blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}
        self.conn.executescript(";".join(s.format(**types) for s in SCHEMA) + ";")
        self._secure()

    def _secure(self) -> None:
        """The state file (and SQLite's -wal/-shm, which take its mode) readable by its owner only."""
        if not self.path.exists():
            os.close(os.open(str(self.path), os.O_CREAT | os.O_RDWR, 0o600))
        for f in (self.path, Path(str(self.path) + "-wal"), Path(str(self.path) + "-shm")):
            try:
                if f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
            except FileNotFoundError:
                pass

    def execute(self, sql: str, args: Iterable = ()):
        return self.conn.execute(sql, tuple(args))

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self, clients: Iterable[str] = ()) -> None:
        self.conn.execute("BEGIN IMMEDIATE")      # the file's write lock covers every client

    def lock_clients(self, clients: Iterable[str]) -> None:
        pass

    def lock_events(self) -> None:
        pass

    def commit(self, durable: bool) -> float:
        """Commit; a durable commit is fsync'd before this returns.  Returns the fsync's seconds."""
        self.conn.execute("COMMIT")
        if not durable:
            return 0.0
        t0 = time.perf_counter()
        try:
            fd = os.open(str(self.path) + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            fd = os.open(str(self.path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def nbytes(self, checkpoint: bool = False) -> int:
        """Bytes on disk (file + WAL; after a WAL checkpoint when asked)."""
        if checkpoint:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(os.path.getsize(f) for f in (str(self.path), str(self.path) + "-wal") if os.path.exists(f))

    def close(self) -> None:
        self.conn.close()


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a client id (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


_EVENTS_KEY = _lock_key("\x00raymia:events")
_SCHEMA_KEY = _lock_key("\x00raymia:schema")
_PLACEHOLDER = re.compile(r"\?")


class PostgresBackend:
    kind = "postgresql"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as err:                       # pragma: no cover - psycopg is a dependency
            raise ConfigError("serve.state_url is a PostgreSQL URL but psycopg is not installed "
                              "(pip install 'psycopg[binary]')") from err
        self._psycopg = psycopg
        self.url, self.where = url, redact(url)
        self.conn = None
        self._tx = False
        self._connect()
        types = {"int": "BIGINT", "real": "DOUBLE PRECISION", "blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY"}
        self.begin()
        try:
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_KEY,))   # concurrent creators
            for s in SCHEMA:
                self.conn.execute(s.format(**types))
        except BaseException:
            self.rollback()
            raise
        self.commit(False)

    def _connect(self) -> None:
        try:
            self.conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.OperationalError as err:
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot connect to the filter-state database {self.where}: {msg}") from None
        # ordinary commits do not wait for the WAL flush; durable ones do (commit)
        self.conn.execute("SET synchronous_commit TO off")

    def execute(self, sql: str, args: Iterable = ()):
        return self.conn.execute(_PLACEHOLDER.sub("%s", sql), tuple(args))

    @property
    def in_transaction(self) -> bool:
        return self._tx

    def begin(self, clients: Iterable[str] = ()) -> None:
        if self.conn is None or self.conn.closed or self.conn.broken:     # a restarted server: reconnect
            self._connect()
        self.conn.execute("BEGIN")
        self._tx = True
        self.lock_clients(clients)

    def lock_clients(self, clients: Iterable[str]) -> None:
        """More client locks inside the open transaction (re-entrant; released at its end)."""
        for key in sorted({_lock_key(c) for c in clients}):
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))

    def lock_events(self) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_KEY,))

    def commit(self, durable: bool) -> float:
        t0 = time.perf_counter()
        if durable:
            self.conn.execute("SET LOCAL synchronous_commit TO on")
        try:
            self.conn.execute("COMMIT")
        finally:
            self._tx = False
        return time.perf_counter() - t0 if durable else 0.0

    def rollback(self) -> None:
        self._tx = False
        if self.conn.broken or self.conn.closed:
            return
        self.conn.execute("ROLLBACK")

    def nbytes(self, checkpoint: bool = False) -> int:
        """Bytes of the store's tables with their indexes and TOAST (after a VACUUM when asked)."""
        if checkpoint:
            for t in TABLES:
                self.conn.execute(f"VACUUM {t}")
        row = self.conn.execute("SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0) "
                                "FROM unnest(%s::text[]) AS t", (list(TABLES),)).fetchone()
        return int(row[0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

