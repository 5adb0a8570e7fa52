"""Per-client filter state, reached by a replica in one of two ways (``serve.state_in``):
``replica`` (default): the replica holds the store itself (:class:`LocalRouter`);
``actors``: named Ray actors, sharded by client id (:class:`ShardRouter`), as follows.

Each :class:`FilterShard` actor owns the clients whose id hashes to its shard
(:func:`raymia.serving.store.shard_of`) and runs their checks one at a time, so the updates of
one client are serialised.  The states live in one SQLite file under the run directory
(:class:`raymia.serving.store.FilterStateStore`): a restarted actor, replica or app reads them
back, and every write is version-checked, so the file stays the one truth even if two
actors ever hold the same client.  The actors are named from the state file and the
filter parameters, so every replica finds the same ones; they are NOT detached: each
lives as long as the replica that created it (its owner), so a deleted app or one
redeployed with other parameters leaves no actor behind, and a replica that finds its
shard gone (owner replaced, actor killed) creates it again from the file.

The replica side (either router) gives every call a deadline
(``serve.shard_timeout_s``: past it the request fails closed with 503), keeps the shard
health that ``/healthz`` answers from (refreshed in the background at most every
``serve.health_interval_s``), and a local set of blocked client ids: a blocked client is
refused before the model runs (Algorithm 1 blocks for good; only an operator unblock,
seen through the store's events within one refresh, takes an id out)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any, Optional

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from raymia.serving.backends import is_postgres
from raymia.serving.store import FilterStateStore, shard_of

NAMESPACE = "raymia-serve"
HEAD_RESOURCE = "node:__internal_head__"     # Ray's resource of the head node
ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)
CLEARING_EVENTS = ("unblock", "purge", "purge_inactive")


def shard_names(state_path: str, params: dict, n_shards: int) -> list[str]:
    """Actor names of a state file's shards; the filter parameters are part of the name, so
    actors left running with other parameters are never reused."""
    key = json.dumps({"state": state_path, "params": params}, sort_keys=True)
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return [f"filter-{tag}-{i}of{n_shards}" for i in range(n_shards)]


class ShardService:
    """One shard of the per-client filter states: the methods a :class:`FilterShard` actor
    serves (one call at a time), or that a replica runs itself on one worker thread
    (``serve.state_in: replica``, :class:`LocalRouter`)."""

    def __init__(self, state_path: str, params: dict, shard: int, n_shards: int, store_opts: Optional[dict] = None):
        import logging
        import sys
        from raymia.defenses.filter.robust import params_from_dict
        audit = logging.getLogger("raymia.audit")
        if not audit.handlers:                 # one JSON line per event in this actor's log
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(message)s"))
            audit.addHandler(h)
            audit.setLevel(logging.INFO)
            audit.propagate = False
        self.shard, self.n_shards = shard, n_shards
        self.store = FilterStateStore(state_path, params_from_dict(params), **(store_opts or {}))
        self.pings = 0

    def _mine(self, client_id: str) -> None:
        if shard_of(client_id, self.n_shards) != self.shard:
            raise ValueError(f"client {client_id!r} does not belong to shard {self.shard}/{self.n_shards}")

    def check_many(self, items: list) -> list:
        """Verdicts for ``[(client_id, image, request_id[, embedding]), ...]`` in order, one commit for
        all; an input the filter refuses gives ``{"error": message}`` (state unchanged)."""
        for cid, *_ in items:
            self._mine(cid)
        return [{"error": str(r)} if isinstance(r, Exception) else r for r in self.store.check_many(items)]

    def inspect(self, client_id: str) -> Optional[dict]:
        self._mine(client_id)
        return self.store.get(client_id)

    def unblock(self, client_id: str) -> dict:
        self._mine(client_id)
        return self.store.reset(client_id)

    def block(self, client_id: str, reason: str = "") -> dict:
        self._mine(client_id)
        return self.store.block(client_id, reason)

    def purge(self, client_id: str) -> dict:
        self._mine(client_id)
        return self.store.purge(client_id)

    def why(self, client_id: str) -> dict:
        return self.store.why(client_id)

    def add_queries(self, counts: dict) -> int:
        for cid in counts:
            self._mine(cid)
        return self.store.add_queries(counts)

    # the file is shared: any shard answers for all clients
    def purge_inactive(self, older_than_s: Optional[float]) -> int:
        return self.store.purge_inactive(older_than_s)

    def list_clients(self, after: str, limit: int, blocked: Optional[bool]) -> dict:
        return self.store.list_clients(after, limit, blocked)

    def blocked(self, limit: int) -> list:
        return self.store.blocked_clients(limit)

    def events(self, after: int, limit: int) -> list:
        return self.store.events(after, limit)

    def quarantined(self, limit: int) -> list:
        return self.store.quarantined(limit)

    def ping(self, since: Optional[int] = None) -> dict:
        """Health; with ``since``, also the ids an unblock or purge cleared after event
        ``since`` (``cleared``: {client_id: event id}) and the last event id."""
        import os
        self.pings += 1
        out = {"shard": self.shard, "pid": os.getpid(), "pings": self.pings, "cache": self.store.cache_info()}
        if since is not None:
            last = self.store.last_event()
            out["last_event"] = last
            if since >= 0:
                evs = self.store.events(since, 10000, CLEARING_EVENTS)
                out["cleared"] = {e["client_id"]: e["id"] for e in evs if e["client_id"]}
                out["purged_all"] = any(e["client_id"] is None for e in evs)
                if evs:
                    out["last_event"] = max(last, evs[-1]["id"])
        return out




@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class FilterShard(ShardService):
    """A shard as a named Ray actor (``serve.state_in: actors``)."""


class ShardUnavailable(RuntimeError):
    pass


def warm_up(handles: list, timeout_s: float, method: str = "ping") -> list:
    """Indices of ``handles`` whose ``method`` (no arguments) did not return within ``timeout_s`` (all of
    them together), or raised."""
    if timeout_s <= 0:
        return []
    refs = [getattr(h, method).remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    bad = []
    for i, ref in enumerate(refs):
        if ref not in ready:
            bad.append(i)
            continue
        try:
            ray.get(ref)
        except Exception:
            bad.append(i)
    return bad


class _Router:
    """What a replica keeps whichever way it reaches the store: the batching of checks per
    shard, the set of blocked ids, the refused queries still to count, the cached health.
    Subclasses provide ``call_shard(i, method, *args, timeout_s=None)``."""

    def __init__(self, names: list, max_batch: int, timeout_s: float, health_interval_s: float):
        self.names, self.n = list(names), len(names)
        self.max_batch, self.timeout_s = max_batch, float(timeout_s)
        self.health_interval_s = float(health_interval_s)
        self.pending: list = [[] for _ in range(self.n)]
        self.busy = [False] * self.n
        self.blocked_ids: dict[str, int] = {}        # client id -> event mark of its blocked verdict
        self.cleared: dict[str, int] = {}            # client id -> event id of an unblock/purge seen
        self.refused: list[dict] = [{} for _ in range(self.n)]   # blocked ids' uncounted queries
        self.last_event: Optional[int] = None
        self.health: Optional[dict] = None           # {"ok", "at", "message", "shards"}
        self._refresher: Optional[asyncio.Task] = None

    async def call_shard(self, i: int, method: str, *args, timeout_s: Optional[float] = None) -> Any:
        raise NotImplementedError

    async def call(self, client_id: str, method: str, *args) -> Any:
        return await self.call_shard(shard_of(client_id, self.n), method, client_id, *args)

    # -- the replica's blocked set
    def is_blocked(self, client_id: str) -> bool:
        return client_id in self.blocked_ids

    def note_verdict(self, client_id: str, verdict: dict) -> None:
        if verdict.get("blocked") and not verdict.get("safe"):
            mark = int(verdict.get("mark", 0))
            if self.cleared.get(client_id, -1) <= mark:     # not unblocked after this verdict
                self.blocked_ids[client_id] = mark

    def refuse(self, client_id: str) -> None:
        """A query of a blocked id refused here: counted in its n_queries at the next flush."""
        d = self.refused[shard_of(client_id, self.n)]
        d[client_id] = d.get(client_id, 0) + 1

    def forget(self, client_id: str, event_id: Optional[int] = None) -> None:
        self.blocked_ids.pop(client_id, None)
        self.refused[shard_of(client_id, self.n)].pop(client_id, None)
        if event_id is not None:
            self.cleared[client_id] = max(event_id, self.cleared.get(client_id, -1))

    async def flush(self, shard: Optional[int] = None) -> None:
        for i in ([shard] if shard is not None else range(self.n)):
            counts, self.refused[i] = self.refused[i], {}
            if counts:
                try:
                    await self.call_shard(i, "add_queries", counts)
                except ShardUnavailable:
                    for c, n in counts.items():      # keep them for the next flush
                        self.refused[i][c] = self.refused[i].get(c, 0) + n
                    raise

    # -- health, refreshed in the background
    async def refresh(self) -> dict:
        t0 = time.time()
        since = -1 if self.last_event is None else self.last_event
        res = await asyncio.gather(*(self.call_shard(i, "ping", since if i == 0 else None,
                                                     timeout_s=min(self.timeout_s, 5.0)) for i in range(self.n)),
                                   return_exceptions=True)
        bad = [i for i, r in enumerate(res) if isinstance(r, BaseException)]
        if not isinstance(res[0], BaseException):
            r0 = res[0]
            for cid, eid in (r0.get("cleared") or {}).items():
                self.forget(cid, eid)
            if r0.get("purged_all"):
                pass        # an inactive purge never touches blocked clients: nothing to clear
            self.last_event = r0.get("last_event", self.last_event)
        try:
            await self.flush()
        except ShardUnavailable:
            pass
        self.health = {"ok": not bad, "at": time.time(), "took_s": round(time.time() - t0, 4),
                       "message": f"filter shard(s) {bad} do not answer" if bad else "",
                       "shards": [None if isinstance(r, BaseException) else {k: r[k] for k in ("shard", "pid", "pings", "cache")}
                                  for r in res]}
        return self.health

    def start(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:          # never let the loop die
                pass
            await asyncio.sleep(self.health_interval_s)

    async def cached_health(self) -> dict:
        """The last refresh's health; one refresh now when there is none yet or it is stale
        (the loop stuck for longer than a deadline plus two intervals)."""
        self.start()
        stale = self.timeout_s + 2 * self.health_interval_s
        if self.health is None or time.time() - self.health["at"] > stale:
            return await self.refresh()
        return self.health

    async def check(self, client_id: str, image, request_id: str, feature=None) -> dict:
        """The filter's verdict for one query.  Checks are batched per shard without a
        timer: a query goes out at once when no call to its shard is in flight from this
        replica, else with everything that queued up meanwhile (at most ``max_batch``
        per call): no added wait at low load, one call (and one commit) for many queries
        at high load."""
        i = shard_of(client_id, self.n)
        fut = asyncio.get_running_loop().create_future()
        item = (client_id, image, request_id) + (() if feature is None else (feature,))
        self.pending[i].append((item, fut))
        if not self.busy[i]:
            self.busy[i] = True
            asyncio.ensure_future(self._drain(i))
        verdict = await fut
        self.note_verdict(client_id, verdict)
        return verdict

    async def _drain(self, i: int) -> None:
        try:
            while self.pending[i]:
                batch, self.pending[i] = self.pending[i][:self.max_batch], self.pending[i][self.max_batch:]
                try:
                    verdicts = await self.call_shard(i, "check_many", [item for item, _ in batch])
                except Exception as e:          # ShardUnavailable etc.: every waiting query gets it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), v in zip(batch, verdicts):
                    if not fut.done():
                        fut.set_result(v)
        finally:
            self.busy[i] = False

    async def ping_all(self) -> list:
        return await asyncio.gather(*(self.call_shard(i, "ping") for i in range(self.n)))

    async def blocked(self, limit: int) -> list:
        return sorted(await self.call_shard(0, "blocked", limit))[:limit]

class ShardRouter(_Router):
    """The states in ``n_shards`` named actors (``serve.state_in: actors``); re-resolves a
    shard whose actor died (a killed actor is re-created from its name and reloads the
    store)."""

    def __init__(self, state_path: str, params: dict, n_shards: int, max_batch: int = 32, retries: int = 5,
                 timeout_s: float = 10.0, health_interval_s: float = 2.0, store_opts: Optional[dict] = None,
                 resolve: bool = True):
        super().__init__(shard_names(state_path, params, n_shards), max_batch, timeout_s, health_interval_s)
        self.state_path, self.params, self.retries = state_path, params, retries
        self.store_opts = store_opts or {}
        self.handles = [self._resolve(i) for i in range(n_shards)] if resolve else [None] * n_shards

    def _resolve(self, i: int):
        # A SQLite file lives on one host's local disk: its shard actors run on the head node
        # (where `serve run` created the file), whichever node asks; PostgreSQL: anywhere.
        pin = {} if is_postgres(self.state_path) else {"resources": {HEAD_RESOURCE: 0.001}}
        return FilterShard.options(name=self.names[i], namespace=NAMESPACE, get_if_exists=True, **pin).remote(
            self.state_path, self.params, i, self.n, self.store_opts)

    def warm_up(self, timeout_s: float) -> list:
        """Wait (blocking, at most ``timeout_s``) until every shard actor answers a ping: a
        fresh actor starts a worker and reads its store first, which can take longer than
        one request's deadline.  Returns the shards that did not answer (empty: all did);
        those are left to the request path, which fails closed as always."""
        return warm_up(self.handles, timeout_s)

    async def call_shard(self, i: int, method: str, *args, timeout_s: Optional[float] = None) -> Any:
        """One call with a deadline (retries on a dead actor included); past it, or after
        the retries, :class:`ShardUnavailable` (the request fails closed: 503)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        last: Optional[BaseException] = None
        for attempt in range(self.retries):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await asyncio.wait_for(getattr(self.handles[i], method).remote(*args), timeout=left)
            except asyncio.TimeoutError:
                raise ShardUnavailable(f"filter shard {i} did not answer within {limit:g} s") from None
            except ACTOR_ERRORS as e:       # died for good (or is restarting): find or re-create it
                last = e
                await asyncio.sleep(min(0.05 * 2 ** attempt, max(0.0, deadline - time.monotonic())))
                self.handles[i] = self._resolve(i)
        raise ShardUnavailable(f"filter shard {i} is unavailable ({type(last).__name__ if last else 'deadline'})")


class LocalRouter(_Router):
    """The store held by the replica itself (``serve.state_in: replica``): no actor hop on
    the hot path.  Each batch of checks is still one transaction on the shared store (SQLite
    file or PostgreSQL) that re-reads every client's stored version, so any number of
    replicas hold it at once exactly as any number of shard actors may; the store's calls
    run on one worker thread of the replica, under the same deadline (past it: 503, fail
    closed)."""

    def __init__(self, state_path: str, params: dict, max_batch: int = 32, timeout_s: float = 10.0,
                 health_interval_s: float = 2.0, store_opts: Optional[dict] = None):
        from concurrent.futures import ThreadPoolExecutor
        super().__init__(["replica-local"], max_batch, timeout_s, health_interval_s)
        self.service = ShardService(state_path, params, 0, 1, store_opts)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="raymia-filter")

    async def call_shard(self, i: int, method: str, *args, timeout_s: Optional[float] = None) -> Any:
        limit = self.timeout_s if timeout_s is None else timeout_s
        fut = asyncio.get_running_loop().run_in_executor(self.pool, getattr(self.service, method), *args)
        try:
            return await asyncio.wait_for(fut, timeout=limit)
        except asyncio.TimeoutError:
            raise ShardUnavailable(f"the filter state store did not answer within {limit:g} s") from None



@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class CrossClientIndex:
    """The robust detector's cross-client window (``robust_filter.cross_client``): the last
    ``cross_window`` fingerprints of all clients, in one actor (a plain actor: one check at a
    time).  In memory only: a restarted actor starts with an empty window, which costs an
    attacker's Sybil ids nothing they could not also get by waiting out the window."""

    def __init__(self, params: dict, size: int, k: int):
        from raymia.defenses.filter.robust import CrossClientWindow, params_from_dict
        self.window = CrossClientWindow(params_from_dict(params), size, k)

    def check(self, client_id: str, image) -> bool:
        return self.window.check(client_id, image)

    def stats(self) -> dict:
        return {"refused": self.window.refused, "size": self.window.size, "k": self.window.k}


class CrossRouter:
    """Replica side of the cross-client window: one named actor per state store and
    parameters, a deadline per call (past it: 503, fail closed)."""

    def __init__(self, state_path: str, params: dict, size: int, k: int, timeout_s: float = 10.0):
        key = json.dumps({"state": state_path, "params": params, "size": size, "k": k}, sort_keys=True)
        self.name = "cross-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        self.args, self.timeout_s = (params, size, k), float(timeout_s)
        self.handle = self._resolve()

    def warm_up(self, timeout_s: float) -> list:
        """As :meth:`ShardRouter.warm_up` for the index actor ([0] if it did not answer)."""
        return warm_up([self.handle], timeout_s, "stats")

    def _resolve(self):
        return CrossClientIndex.options(name=self.name, namespace=NAMESPACE, get_if_exists=True).remote(*self.args)

    async def check(self, client_id: str, image) -> bool:
        deadline = time.monotonic() + self.timeout_s
        for _ in range(3):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await asyncio.wait_for(self.handle.check.remote(client_id, image), timeout=left)
            except asyncio.TimeoutError:
                break
            except ACTOR_ERRORS:
                self.handle = self._resolve()
        raise ShardUnavailable(f"the cross-client index did not answer within {self.timeout_s:g} s")
