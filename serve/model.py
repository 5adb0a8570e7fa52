"""The ingress deployment: HTTP parsing and validation, the per-client similarity filter
(shard actors) and the released model with ``@serve.batch`` inference.

Routes (JSON answers; every refusal is ``{"error": code, "message": text}``):
  POST /predict                       image -> label and top-k confidences (403 once blocked)
  GET  /healthz                       liveness (cached shard health), the input the model takes
  GET  /admin/info                    model, alpha, filter parameters, replica counters  (admin token)
  GET  /admin/clients                 clients, paged (?after=&limit=&blocked=)           (admin token)
  GET  /admin/clients/{id}            one client's filter state                          (admin token)
  GET  /admin/clients/{id}/why        why it was blocked: matched queries and scores     (admin token)
  POST /admin/clients/{id}/unblock    reset one client's filter state                    (admin token)
  POST /admin/clients/{id}/block      block a client by hand (?reason=)                  (admin token)
  POST /admin/clients/{id}/purge      forget one client's state                          (admin token)
  POST /admin/purge                   forget unblocked clients inactive for ?inactive_s= (admin token)
  GET  /admin/events                  the audit trail (?after=&limit=)                   (admin token)
  GET  /admin/quarantine              corrupt snapshots set aside                        (admin token)
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from ray import serve as rserve
from starlette.requests import Request
from starlette.responses import JSONResponse

from raymia.config import config_from_dict
from raymia.serving.http import (InputSpec, RequestError, check_admin, check_client_id, check_content_length,
                                 identify, parse_predict, prediction, too_large)
from raymia.serving.backends import redact
from raymia.serving.plan import ServingPlan, load_serving_model
from raymia.serving.store import emit_audit

from raymia.serving.store import shard_of

from .state import CrossRouter, LocalRouter, ShardRouter, ShardUnavailable

log = logging.getLogger("ray.serve")

# A hand-written router, not a FastAPI ingress (@serve.ingress). I measured a FastAPI version
# of this replica (same methods, JSON handlers for 404/405) next to it in one Serve instance:
# smoke preset, bench/bench_serve.py's clients, 2 runs x 4 interleaved rounds on the shared
# 2-core box (load average 4-15). p50 differences changed sign from run to run (-2.3/+3.3 ms
# bare, +0.3/-2.8 ms defended, around 30-39 ms), so the load hid any latency difference.
# What did repeat: FastAPI cost 1.2-1.3 ms more replica CPU per request (13.1 -> 14.1 ms bare,
# 19.4 -> 20.2 ms defended, inflated by the load), and defended throughput was x0.92-0.93 in
# both runs. It would also change behaviour unless more handlers were added (307 redirects on a
# trailing slash, FastAPI's own 404/405 messages), and the routes take raw bodies, so its
# validation and OpenAPI add nothing. A fair test of latency needs the same A/B on a quiet
# machine (orl preset, p50 at concurrency 1 and req/s at 8 clients, both routers side by side).
ROUTES = {"/predict": ("POST",), "/healthz": ("GET",), "/admin/info": ("GET",), "/admin/clients": ("GET",),
          "/admin/purge": ("POST",), "/admin/events": ("GET",), "/admin/quarantine": ("GET",)}
CLIENT_ACTIONS = {"unblock": "POST", "block": "POST", "purge": "POST", "why": "GET"}


class Metrics:
    """Ray Serve metrics of one replica (exported with Ray's other metrics, tagged with
    deployment, replica and application): ``raymia_requests_total{outcome}`` (answered,
    refused = any other 4xx, blocked = 403 from the filter, refused_cross = 403 from the
    cross-client window (client not blocked), blocked_cached = 403 before
    the model ran, unavailable = 503) and ``raymia_filter_check_seconds``."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram
        self.requests = Counter("raymia_requests_total", description="POST /predict answers by outcome",
                                tag_keys=("outcome",))
        self.check = Histogram("raymia_filter_check_seconds", description="time of one filter check (shard call)",
                               boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0])
        self.admin_fail = Counter("raymia_admin_auth_failures_total", description="admin requests refused (401)")
        self.counts: dict[str, int] = {}

    def outcome(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.requests.inc(1, tags={"outcome": name})


@rserve.deployment(name="RaymiaModel")
class RaymiaModel:
    """One replica: the released model plus the filter's state (held here, or handles to
    the shard actors)."""

    def __init__(self, cfg_dict: dict, plan_dict: dict, filter_params: Optional[dict],
                 admin_digest: Optional[str], api_keys: Optional[dict]):
        from raymia.training import pick_device, set_threads
        self.cfg = config_from_dict(cfg_dict)
        s = self.cfg.serve
        self.plan = ServingPlan(**plan_dict)
        set_threads(s.torch_threads)
        self.device = pick_device(self.cfg.run.device)
        self.model, n_classes, shape = load_serving_model(self.plan, self.device, s.fold_bn)
        self.spec = InputSpec(shape[0], shape[1], shape[2], n_classes, min(s.top_k, n_classes), s.labels_only)
        self.limit = s.max_body_bytes
        self.admin_digest, self.api_keys = admin_digest, api_keys
        self.filter_params = filter_params
        # the robust detector's feature rule checks R_T's embedding of the query: the check
        # then waits for the forward pass instead of running beside it
        self.embeds = bool(filter_params and filter_params.get("kind") == "robust" and filter_params.get("feat_k"))
        store_opts = {"cache_clients": s.cache_clients, "cache_bytes": int(s.cache_mb * (1 << 20)),
                      "client_ttl_s": s.client_ttl_s}
        if not filter_params:
            self.shards = None
        elif s.state_in == "replica":
            self.shards = LocalRouter(self.plan.state_path, filter_params, s.batch_size, timeout_s=s.shard_timeout_s,
                                      health_interval_s=s.health_interval_s, store_opts=store_opts)
        else:
            self.shards = ShardRouter(self.plan.state_path, filter_params, s.shards, s.batch_size,
                                      timeout_s=s.shard_timeout_s, health_interval_s=s.health_interval_s,
                                      store_opts=store_opts)
        rf = self.cfg.robust_filter
        cross = filter_params and filter_params.get("kind") == "robust" and rf.cross_client
        self.cross = CrossRouter(self.plan.state_path, filter_params, rf.cross_window, rf.cross_k,
                                 s.shard_timeout_s) if cross else None
        # a fresh app's filter actors start a worker and read the store before they answer:
        # wait for them here, so that the app is ready only when its filter is (requests that
        # still find one silent fail closed, 503, as always)
        self.cold = [f"shard {i}" for i in (self.shards.warm_up(s.warmup_s) if isinstance(self.shards, ShardRouter)
                                            else [])]
        if self.cross is not None and self.cross.warm_up(s.warmup_s):
            self.cold.append("cross-client index")
        if self.cold:
            log.warning("raymia: %s did not answer within serve.warmup_s = %g s at start-up; their requests fail "
                        "closed (503) until they do", ", ".join(self.cold), s.warmup_s)
        self.metrics = Metrics()
        self.forwarded = 0          # images through the model
        self.infer.set_max_batch_size(s.batch_size)
        self.infer.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)
        # torch runs on its own thread: the event loop stays free for HTTP and filter calls
        self.torch_pool = ThreadPoolExecutor(1, thread_name_prefix="raymia-infer")

    # ------------------------------------------------------------------ model
    def forward(self, images: list) -> list:
        """Per image its confidence vector, or (confidences, R_T's unit embedding) when the
        filter's feature rule needs the embedding."""
        import torch
        from raymia.models import victim_embedding
        self.forwarded += len(images)
        x = torch.from_numpy(np.stack(images)).to(self.device)
        with torch.inference_mode():
            probs = list(self.model(x).float().cpu().numpy())
            if not self.embeds:
                return probs
            return list(zip(probs, victim_embedding(self.model, x).cpu().numpy()))

    @rserve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def infer(self, images: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self.torch_pool, self.forward, images)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> JSONResponse:
        predict = request.url.path.rstrip("/").endswith("/predict")
        try:
            status, body = await self.route(request)
            if predict:
                self.metrics.outcome("answered")
            return JSONResponse(body, status_code=status)
        except RequestError as e:
            if predict:
                self.metrics.outcome({"blocked": "blocked", "blocked_cached": "blocked_cached", "refused_cross": "refused_cross"}.get(
                    getattr(e, "outcome", e.code), "refused"))
            if e.status == 401 and e.code in ("missing_admin_token", "bad_admin_token"):
                self.metrics.admin_fail.inc()
                emit_audit("admin_auth_failure", reason=e.code, method=request.method, path=request.url.path[:200],
                           peer=getattr(request.client, "host", None))
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ShardUnavailable as e:
            if predict:
                self.metrics.outcome("unavailable")
            return JSONResponse({"error": "filter_unavailable", "message": f"{e}; the request was not served (the "
                                 "filter fails closed); retry shortly"}, status_code=503, headers={"Retry-After": "1"})
        except Exception:   # never a traceback to the client
            log.exception("raymia: unexpected error in %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal", "message": "internal error; the request was not served"},
                                status_code=500)

    async def route(self, request: Request) -> tuple:
        path, method = request.url.path, request.method
        prefix = request.scope.get("root_path") or ""
        if prefix and path.startswith(prefix):          # app deployed under a route prefix
            path = path[len(prefix):]
        path = path.rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["admin", "clients"]:
            if len(parts) == 3:
                self._method(method, ("GET",))
                return await self.admin_client(request, parts[2])
            if len(parts) == 4 and parts[3] in CLIENT_ACTIONS:
                self._method(method, (CLIENT_ACTIONS[parts[3]],))
                return await self.admin_action(request, parts[2], parts[3])
        allowed = ROUTES.get(path)
        if allowed is None:
            raise RequestError(404, "not_found", f"no route {path[:100]!r}; see GET /healthz and POST /predict")
        self._method(method, allowed)
        if path == "/predict":
            return await self.predict(request)
        if path == "/healthz":
            return await self.healthz()
        check_admin(request.headers, self.admin_digest, self.cfg.serve.admin_token_env)
        if path == "/admin/info":
            return 200, await self.info()
        shards = self._need_filter()
        q = request.query_params
        if path == "/admin/clients":
            blocked = _flag(q.get("blocked")) if "blocked" in q else None
            await self._flush_quietly()
            page = await shards.call_shard(0, "list_clients", q.get("after", ""), _int(q.get("limit"), 100, 1, 1000),
                                           blocked)
            return 200, {**page, "blocked": await shards.blocked(1000)}
        if path == "/admin/events":
            return 200, {"events": await shards.call_shard(0, "events", _int(q.get("after"), 0, 0, 1 << 62),
                                                           _int(q.get("limit"), 100, 1, 10000))}
        if path == "/admin/quarantine":
            return 200, {"quarantined": await shards.call_shard(0, "quarantined", _int(q.get("limit"), 100, 1, 1000))}
        older = q.get("inactive_s")
        if older is not None:
            try:
                older = float(older)
                assert older >= 0
            except (ValueError, AssertionError):
                raise RequestError(422, "bad_inactive_s", "inactive_s must be a number of seconds >= 0") from None
        elif not self.cfg.serve.client_ttl_s:
            raise RequestError(422, "bad_inactive_s", "serve.client_ttl_s is 0 (no TTL): pass ?inactive_s=SECONDS")
        return 200, {"purged": await shards.call_shard(0, "purge_inactive", older, timeout_s=max(
            60.0, self.cfg.serve.shard_timeout_s)), "inactive_s": older if older is not None else self.cfg.serve.client_ttl_s}

    async def _flush_quietly(self, shard: Optional[int] = None) -> None:
        try:
            await self.shards.flush(shard)
        except ShardUnavailable:
            pass

    @staticmethod
    def _method(method: str, allowed: tuple) -> None:
        if method not in allowed:
            raise RequestError(405, "method_not_allowed", f"method {method} not allowed here; use {', '.join(allowed)}",
                               {"Allow": ", ".join(allowed)})

    async def _body(self, request: Request) -> bytes:
        check_content_length(request.headers, self.limit)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.limit:
                raise too_large(n, self.limit)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _blocked(client_id: str, cached: bool) -> RequestError:
        e = RequestError(403, "blocked", f"client {client_id!r} is blocked: its queries were too similar to its own "
                         "recent queries (similarity filter). Ask the operator to review.")
        e.outcome = "blocked_cached" if cached else "blocked"
        return e

    async def predict(self, request: Request) -> tuple:
        client_id = identify(request.headers, self.api_keys)
        if self.shards is not None:
            self.shards.start()
            if self.shards.is_blocked(client_id):
                # blocked for good (until an operator unblocks it): no parsing, no model, no
                # check; the query is added to its count at the next flush
                self.shards.refuse(client_id)
                raise self._blocked(client_id, cached=True)
        body = await self._body(request)
        image, opts = parse_predict(request.headers.get("content-type"), body, self.spec, request.query_params)
        if self.shards is None:
            return 200, prediction(await self.infer(image), opts["top_k"], opts["labels_only"])
        # The filter's check leaves at once and runs while the model's batch forms and
        # runs; the answer is released only after the filter has counted the query and
        # found the client safe.
        t0 = time.perf_counter()
        if self.embeds:             # the feature rule: the check needs the forward pass's embedding
            probs, emb = await self.infer(image)
            verdict = await self._timed_check(client_id, image, time.perf_counter(), emb)
        else:
            verdict_task = asyncio.ensure_future(self._timed_check(client_id, image, t0))
            try:
                probs = await self.infer(image)
            finally:
                verdict = await verdict_task
        if "error" in verdict:
            raise RequestError(422, "bad_image", verdict["error"])
        if not verdict["safe"]:
            raise self._blocked(client_id, cached=False)
        if self.cross is not None and not await self.cross.check(client_id, image):
            e = RequestError(403, "similar_to_other_clients", "this query is too similar to recent queries of other "
                             "clients (cross-client filter); this client is not blocked")
            e.outcome = "refused_cross"
            raise e
        return 200, prediction(probs, opts["top_k"], opts["labels_only"])

    async def _timed_check(self, client_id: str, image, t0: float, feature=None) -> dict:
        try:
            return await self.shards.check(client_id, image, uuid.uuid4().hex, feature)
        finally:
            self.metrics.check.observe(time.perf_counter() - t0)

    async def healthz(self) -> tuple:
        body = {"status": "ok", "input": {"channels": self.spec.channels, "height": self.spec.height,
                                          "width": self.spec.width, "range": [0.0, 1.0]},
                "classes": self.spec.n_classes, "top_k": self.spec.max_top_k, "labels_only": self.spec.labels_only,
                "filter": self.shards is not None}
        if self.shards is not None:
            h = await self.shards.cached_health()
            body["checked_s_ago"] = round(max(0.0, time.time() - h["at"]), 3)
            if not h["ok"]:
                return 503, {**body, "status": "degraded", "message": h["message"] or "a filter shard does not answer"}
        return 200, body

    async def info(self) -> dict:
        health = await self.shards.cached_health() if self.shards else None
        return {"plan": {**self.plan.to_dict(), "state_path": redact(self.plan.state_path)}, "filter_params": self.filter_params,
                "shards": self.shards.names if self.shards else [], "input": list(self.spec.shape),
                "classes": self.spec.n_classes, "top_k": self.spec.max_top_k, "labels_only": self.spec.labels_only,
                "batch_size": self.cfg.serve.batch_size, "batch_wait_ms": self.cfg.serve.batch_wait_ms,
                "api_keys": self.api_keys is not None,
                "replica": {"forwarded": self.forwarded, "outcomes": dict(self.metrics.counts),
                            "blocked_cached_ids": len(self.shards.blocked_ids) if self.shards else 0,
                            "cold_at_start": self.cold},
                "health": health}

    def _need_filter(self):
        if self.shards is None:
            raise RequestError(404, "no_filter", "this app runs without the similarity filter (serve.use_filter=false)")
        return self.shards

    async def admin_client(self, request: Request, client_id: str) -> tuple:
        check_admin(request.headers, self.admin_digest, self.cfg.serve.admin_token_env)
        client_id = check_client_id(client_id)
        shards = self._need_filter()
        await self._flush_quietly(shard_of(client_id, shards.n))
        st = await shards.call(client_id, "inspect")
        if st is None:
            raise RequestError(404, "unknown_client", f"client {client_id!r} has no stored state")
        return 200, st

    async def admin_action(self, request: Request, client_id: str, action: str) -> tuple:
        check_admin(request.headers, self.admin_digest, self.cfg.serve.admin_token_env)
        client_id = check_client_id(client_id)
        shards = self._need_filter()
        if action == "why":
            return 200, await shards.call_shard(shard_of(client_id, shards.n), "why", client_id)
        await self._flush_quietly(shard_of(client_id, shards.n))
        if action == "unblock":
            shards.forget(client_id)
            return 200, {**await shards.call(client_id, "unblock"), "unblocked": True}
        if action == "purge":
            shards.forget(client_id)
            return 200, await shards.call(client_id, "purge")
        reason = request.query_params.get("reason", "")[:500]
        out = await shards.call(client_id, "block", reason)
        shards.note_verdict(client_id, {"safe": False, "blocked": True, "mark": 1 << 62})
        return 200, out


def _int(v: Optional[str], default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if not v.strip().isdigit() or not lo <= int(v) <= hi:
        raise RequestError(422, "bad_parameter", f"expected an integer in {lo}..{hi}, got {v[:40]!r}")
    return int(v)


def _flag(v: Optional[str]) -> bool:
    if v is not None and v.lower() in ("1", "true", "yes", "0", "false", "no"):
        return v.lower() in ("1", "true", "yes")
    raise RequestError(422, "bad_parameter", f"expected true or false, got {str(v)[:40]!r}")
