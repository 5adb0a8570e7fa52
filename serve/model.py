"""The ingress deployment: HTTP parsing and validation, the per-client similarity filter
(shard actors) and the released model with ``@serve.batch`` inference.

Routes (JSON answers; every refusal is ``{"error": code, "message": text}``):
  POST /predict                       image -> label and top-k confidences (403 once blocked)
  GET  /healthz                       liveness, the input the model takes
  GET  /admin/info                    model, alpha, filter parameters         (admin token)
  GET  /admin/clients                 blocked client ids                      (admin token)
  GET  /admin/clients/{id}            one client's filter state               (admin token)
  POST /admin/clients/{id}/unblock    reset one client's filter state         (admin token)
"""
from __future__ import annotations

import asyncio
import logging
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
from raymia.serving.plan import ServingPlan, load_serving_model

from .state import ShardRouter, ShardUnavailable

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
ROUTES = {"/predict": ("POST",), "/healthz": ("GET",), "/admin/info": ("GET",), "/admin/clients": ("GET",)}


@rserve.deployment(name="RaymiaModel")
class RaymiaModel:
    """One replica: the released model plus handles to the filter's shard actors."""

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
        self.shards = ShardRouter(self.plan.state_path, filter_params, s.shards, s.batch_size) if filter_params else None
        self.infer.set_max_batch_size(s.batch_size)
        self.infer.set_batch_wait_timeout_s(s.batch_wait_ms / 1000.0)
        # torch runs on its own thread: the event loop stays free for HTTP and filter calls
        self.torch_pool = ThreadPoolExecutor(1, thread_name_prefix="raymia-infer")

    # ------------------------------------------------------------------ model
    def forward(self, images: list) -> list:
        import torch
        x = torch.from_numpy(np.stack(images)).to(self.device)
        with torch.inference_mode():
            return list(self.model(x).float().cpu().numpy())

    @rserve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def infer(self, images: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self.torch_pool, self.forward, images)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> JSONResponse:
        try:
            status, body = await self.route(request)
            return JSONResponse(body, status_code=status)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except ShardUnavailable as e:
            return JSONResponse({"error": "filter_unavailable", "message": f"{e}; retry shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
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
            if len(parts) == 4 and parts[3] == "unblock":
                self._method(method, ("POST",))
                return await self.admin_unblock(request, parts[2])
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
            return 200, self.info()
        return 200, {"blocked": await self.shards.blocked(1000) if self.shards else []}

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

    async def predict(self, request: Request) -> tuple:
        client_id = identify(request.headers, self.api_keys)
        body = await self._body(request)
        image, opts = parse_predict(request.headers.get("content-type"), body, self.spec, request.query_params)
        if self.shards is None:
            return 200, prediction(await self.infer(image), opts["top_k"], opts["labels_only"])
        # The filter's check leaves at once and runs while the model's batch forms and
        # runs; the answer is released only after the filter has counted the query and
        # found the client safe.
        verdict_task = asyncio.ensure_future(self.shards.check(client_id, image, uuid.uuid4().hex))
        try:
            probs = await self.infer(image)
        finally:
            verdict = await verdict_task
        if "error" in verdict:
            raise RequestError(422, "bad_image", verdict["error"])
        if not verdict["safe"]:
            raise RequestError(403, "blocked",
                               f"client {client_id!r} is blocked: its queries were too similar to its own recent "
                               "queries (similarity filter). Ask the operator to review.")
        return 200, prediction(probs, opts["top_k"], opts["labels_only"])

    async def healthz(self) -> tuple:
        body = {"status": "ok", "input": {"channels": self.spec.channels, "height": self.spec.height,
                                          "width": self.spec.width, "range": [0.0, 1.0]},
                "classes": self.spec.n_classes, "top_k": self.spec.max_top_k, "labels_only": self.spec.labels_only,
                "filter": self.shards is not None}
        if self.shards is not None:
            try:
                await asyncio.wait_for(self.shards.ping_all(), timeout=5.0)
            except (ShardUnavailable, asyncio.TimeoutError):
                return 503, {**body, "status": "degraded", "message": "a filter shard does not answer"}
        return 200, body

    def info(self) -> dict:
        return {"plan": self.plan.to_dict(), "filter_params": self.filter_params,
                "shards": self.shards.names if self.shards else [], "input": list(self.spec.shape),
                "classes": self.spec.n_classes, "top_k": self.spec.max_top_k, "labels_only": self.spec.labels_only,
                "batch_size": self.cfg.serve.batch_size, "batch_wait_ms": self.cfg.serve.batch_wait_ms,
                "api_keys": self.api_keys is not None}

    def _need_filter(self) -> ShardRouter:
        if self.shards is None:
            raise RequestError(404, "no_filter", "this app runs without the similarity filter (serve.use_filter=false)")
        return self.shards

    async def admin_client(self, request: Request, client_id: str) -> tuple:
        check_admin(request.headers, self.admin_digest, self.cfg.serve.admin_token_env)
        client_id = check_client_id(client_id)
        st = await self._need_filter().call(client_id, "inspect")
        if st is None:
            raise RequestError(404, "unknown_client", f"client {client_id!r} has sent no query yet")
        return 200, st

    async def admin_unblock(self, request: Request, client_id: str) -> tuple:
        check_admin(request.headers, self.admin_digest, self.cfg.serve.admin_token_env)
        client_id = check_client_id(client_id)
        return 200, {**await self._need_filter().call(client_id, "unblock"), "unblocked": True}
