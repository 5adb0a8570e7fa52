"""Per-client filter state in named Ray actors, sharded by client id.

Each :class:`FilterShard` actor owns the clients whose id hashes to its shard
(:func:`raymia.serving.store.shard_of`) and runs their checks one at a time, so the updates of
one client are serialised.  The states live in one SQLite file under the run directory
(:class:`raymia.serving.store.FilterStateStore`): a restarted actor, replica or app reads them
back, and every write is version-checked, so the file stays the one truth even if two
actors ever hold the same client.  The actors are detached and named from the state
file, so every replica (and a redeployed app) finds the same ones."""
from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any, Optional

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from raymia.serving.store import FilterStateStore, shard_of

NAMESPACE = "raymia-serve"
ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)


def shard_names(state_path: str, params: dict, n_shards: int) -> list[str]:
    """Actor names of a state file's shards; the filter parameters are part of the name, so
    actors left running with other parameters (detached actors outlive the app) are never
    reused."""
    key = json.dumps({"state": state_path, "params": params}, sort_keys=True)
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return [f"filter-{tag}-{i}of{n_shards}" for i in range(n_shards)]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class FilterShard:
    """One shard of the per-client filter states (a plain actor: one call at a time)."""

    def __init__(self, state_path: str, params: dict, shard: int, n_shards: int):
        from raymia.defenses.filter import FilterParams
        self.shard, self.n_shards = shard, n_shards
        self.store = FilterStateStore(state_path, FilterParams(**params))

    def _mine(self, client_id: str) -> None:
        if shard_of(client_id, self.n_shards) != self.shard:
            raise ValueError(f"client {client_id!r} does not belong to shard {self.shard}/{self.n_shards}")

    def check_many(self, items: list) -> list:
        """Verdicts for ``[(client_id, image, request_id), ...]`` in order, one commit for
        all; an input the filter refuses gives ``{"error": message}`` (state unchanged)."""
        for cid, _, _ in items:
            self._mine(cid)
        return [{"error": str(r)} if isinstance(r, Exception) else r for r in self.store.check_many(items)]

    def inspect(self, client_id: str) -> Optional[dict]:
        self._mine(client_id)
        return self.store.get(client_id)

    def unblock(self, client_id: str) -> dict:
        self._mine(client_id)
        return self.store.reset(client_id)

    def blocked(self, limit: int) -> list:
        return [c for c in self.store.blocked_clients(limit) if shard_of(c, self.n_shards) == self.shard]

    def ping(self) -> dict:
        import os
        return {"shard": self.shard, "pid": os.getpid(), "cached_clients": len(self.store.cache)}


class ShardRouter:
    """Replica-side handles to the shard actors; re-resolves a shard whose actor died
    (a killed actor is re-created from its name and reloads the state file)."""

    def __init__(self, state_path: str, params: dict, n_shards: int, max_batch: int = 32, retries: int = 5):
        self.state_path, self.params, self.n = state_path, params, n_shards
        self.names = shard_names(state_path, params, n_shards)
        self.max_batch, self.retries = max_batch, retries
        self.pending: list = [[] for _ in range(n_shards)]
        self.busy = [False] * n_shards
        self.handles = [self._resolve(i) for i in range(n_shards)]

    def _resolve(self, i: int):
        return FilterShard.options(name=self.names[i], namespace=NAMESPACE, get_if_exists=True,
                                   lifetime="detached").remote(self.state_path, self.params, i, self.n)

    async def call_shard(self, i: int, method: str, *args) -> Any:
        last: Optional[BaseException] = None
        for attempt in range(self.retries):
            try:
                return await getattr(self.handles[i], method).remote(*args)
            except ACTOR_ERRORS as e:       # died for good (or is restarting): find or re-create it
                last = e
                await asyncio.sleep(0.05 * 2 ** attempt)
                self.handles[i] = self._resolve(i)
        raise ShardUnavailable(f"filter shard {i} is unavailable ({type(last).__name__})")

    async def call(self, client_id: str, method: str, *args) -> Any:
        return await self.call_shard(shard_of(client_id, self.n), method, client_id, *args)

    async def check(self, client_id: str, image, request_id: str) -> dict:
        """The filter's verdict for one query.  Checks are batched per shard without a
        timer: a query goes out at once when no call to its shard is in flight from this
        replica, else with everything that queued up meanwhile (at most ``max_batch``
        per call): no added wait at low load, one call (and one commit) for many queries
        at high load."""
        i = shard_of(client_id, self.n)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i].append(((client_id, image, request_id), fut))
        if not self.busy[i]:
            self.busy[i] = True
            asyncio.ensure_future(self._drain(i))
        return await fut

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
        parts = await asyncio.gather(*(self.call_shard(i, "blocked", limit) for i in range(self.n)))
        return sorted(c for p in parts for c in p)[:limit]


class ShardUnavailable(RuntimeError):
    pass
