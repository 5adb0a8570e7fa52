"""Building the app: config -> plan (artifacts, alpha) -> bound deployment.

``serve run serve.app`` calls :func:`app` with the ``key=value`` arguments given after
the import path; Python code (tests, benchmarks) calls :func:`build_app` with a Config."""
from __future__ import annotations

import os
import sys
from typing import Optional

from raymia.cli import USER_ERRORS
from raymia.config import Config, ConfigError
from raymia.runtime import resolve_out_root
from raymia.serving.backends import is_postgres
from raymia.serving.http import hash_secret, load_api_keys
from raymia.serving.plan import config_from_serve_args, filter_params, resolve_plan
from raymia.serving.store import FilterStateStore

from .model import RaymiaModel
from .state import HEAD_RESOURCE


def build_app(cfg: Config, preset: str = "orl", admin_token: Optional[str] = None):
    """The bound application for ``cfg``.  Raises :class:`raymia.serving.plan.ServeSetupError`
    (naming the command that creates them) when artifacts or the alpha are missing.
    ``admin_token`` defaults to the environment variable ``serve.admin_token_env``; the
    replicas only receive its sha256 (and the API keys' hashes)."""
    resolve_out_root(cfg)
    plan = resolve_plan(cfg, preset)
    s = cfg.serve
    params = None
    if s.use_filter:
        fp = filter_params(cfg)
        FilterStateStore(plan.state_path, fp).close()   # creates the file; refuses changed parameters now
        params = fp.to_dict()          # with "kind" for the robust detector
    token = admin_token if admin_token is not None else os.environ.get(s.admin_token_env)
    if token is not None and len(token) < s.min_admin_token_chars:
        raise ConfigError(
            f"the admin token ({'admin_token' if admin_token is not None else s.admin_token_env}) has {len(token)} "
            f"characters; use at least {s.min_admin_token_chars}, e.g. "
            "`export RAYMIA_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`, "
            "or unset it to turn the admin endpoints off")
    api_keys = load_api_keys(s.api_keys_file) if s.api_keys_file else None
    opts = {"num_cpus": s.replica_cpus, **({"num_gpus": s.replica_gpus} if s.replica_gpus else {})}
    if params is not None and s.state_in == "replica" and not is_postgres(plan.state_path):
        # the replicas hold the SQLite file themselves: it lives on the head node's local disk
        opts["resources"] = {HEAD_RESOURCE: 0.001}
    deployment = RaymiaModel.options(num_replicas=s.replicas, max_ongoing_requests=s.max_ongoing_requests,
                                     ray_actor_options=opts)
    return deployment.bind(cfg.to_dict(), plan.to_dict(), params, hash_secret(token) if token else None, api_keys)


def app(args: dict):
    """``serve run serve.app [preset=orl|PATH.yaml] [section.key=value ...]``: the app for a
    preset (default ``orl``, the README's main command).  A user error prints one line
    (``error: ...``) and exits with status 2."""
    try:
        args = dict(args or {})
        preset = str(args.get("preset", "orl"))
        return build_app(config_from_serve_args(args), preset)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
