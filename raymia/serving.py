"""Serving without Ray: what the Ray Serve app (``serve/``) and its clients need, in plain
Python/numpy/PIL so that it is unit-testable on its own.

* :func:`resolve_plan` finds the artifacts to serve (R_T, R_dmy of one variant) and the
  alpha (explicit ``serve.alpha`` or the alpha sweep's ``recommendation.json``), and fails
  with one message naming the command that creates what is missing.
* :func:`load_serving_model` builds the released model (the combined model R', or R_T
  alone for benchmarks) from a plan.
* Request parsing: :func:`identify` (client id header or API key), :func:`parse_predict`
  (PNG/JPEG bytes, or JSON with a nested list or base64 PNG/JPEG), every refusal a
  :class:`RequestError` with an HTTP status and a JSON body.
* :class:`FilterStateStore`: every client's similarity-filter state in one SQLite file
  (WAL): a snapshot plus an append-only query log per client, written in one transaction
  per batch of checks before the verdicts are returned; any number of processes can hold
  the store and the file stays the single source of truth; request ids make a retried
  check count once.
* :class:`ServeClient`, :func:`attack_endpoint`, :func:`regular_user`: HTTP clients
  (stdlib only) for the live endpoint: Fredrikson's attack with noise before every
  query, and a regular user sending distinct images.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import math
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .config import Config, ConfigError, config_from_dict, load_config

# ----------------------------------------------------------------------------- plan

RECOMMENDATION = "recommendation.json"


class ServeSetupError(ConfigError):
    """Something the served config points at does not exist yet (artifacts, alpha
    recommendation); the message names the command that creates it."""


@dataclass
class ServingPlan:
    """What one app serves; everything resolved to absolute paths."""
    target_dir: str
    dummy_dir: Optional[str]           # None when serve.model == "target"
    variant: Optional[str]
    alpha: Optional[float]
    alpha_source: str                  # "serve.alpha" | path of recommendation.json | "none"
    state_path: str                    # SQLite file of the filter states
    model: str                         # combined | target
    combine: Optional[dict] = None     # the config's combine section (rule, gate_tau, gate_temp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def creation_command(preset: str = "orl") -> str:
    """The command that trains the artifacts of a preset and writes its recommendation."""
    return "make demo" if preset == "orl" else f"make demo ARGS='--preset {preset}'"


def recommendation_path(cfg: Config) -> Path:
    s = cfg.serve.recommendation
    return Path(s) if s else Path(cfg.run.out_root) / cfg.run.name / "alpha_sweep" / RECOMMENDATION


def state_path(cfg: Config) -> Path:
    s = cfg.serve.state_path
    return Path(s) if s else Path(cfg.run.out_root) / cfg.run.name / "serve" / "filter_state.sqlite"


def _missing(cfg: Config, what: list[str], where: Path, preset: str) -> ServeSetupError:
    serve_cmd = "make serve" if preset == "orl" else f"make serve ARGS='--preset {preset}' SERVE_ARGS='preset={preset}'"
    return ServeSetupError(
        f"nothing to serve yet: no {', '.join(what)} for run '{cfg.run.name}' under {where}. "
        f"Create them with `{creation_command(preset)}` (trains the models and runs the alpha sweep), "
        f"or run `{serve_cmd}` to train and serve in one command")


def _pick_variant(rec: dict, path: Path) -> tuple[str, float]:
    """``auto``: the variant whose recommended alpha has the lowest MIA success."""
    cands = [(r.get("mia_success_top5", math.inf), v, r["alpha"])
             for v, r in (rec.get("variants") or {}).items() if isinstance(r, dict) and r.get("alpha") is not None]
    if not cands:
        raise ServeSetupError(f"{path} recommends no alpha for any variant; set serve.variant and serve.alpha")
    _, v, a = min(cands, key=lambda c: (c[0], c[1]))
    return v, float(a)


def _check_rec_matches(cfg: Config, rec_path: Path, variant: str, preset: str) -> None:
    """Refuse a recommendation that the alpha sweep computed for other models."""
    from .defenses.dummy import dummy_artifact_dir
    from .training import artifact_dir
    sweep_cfg_path = rec_path.parent / "config.yaml"
    if not sweep_cfg_path.exists():
        return
    import yaml
    try:
        sweep_cfg = config_from_dict(yaml.safe_load(sweep_cfg_path.read_text()))
    except (ConfigError, yaml.YAMLError):
        return   # an older or hand-edited config: nothing to compare with
    ours = (artifact_dir(cfg, "target").name, dummy_artifact_dir(cfg, variant).name)
    theirs = (artifact_dir(sweep_cfg, "target").name, dummy_artifact_dir(sweep_cfg, variant).name)
    if ours != theirs:
        raise ServeSetupError(
            f"{rec_path} was computed for other models ({theirs[0]}, {theirs[1]}) than the ones this config "
            f"serves ({ours[0]}, {ours[1]}); rerun the alpha sweep with this config (`{creation_command(preset)}`) "
            "or set serve.alpha explicitly")
    if sweep_cfg.combine != cfg.combine:
        raise ServeSetupError(
            f"{rec_path} was computed for the combination rule {dataclasses.asdict(sweep_cfg.combine)}, this config "
            f"serves {dataclasses.asdict(cfg.combine)}; rerun the alpha sweep with this config "
            f"(`{creation_command(preset)}`) or set serve.alpha explicitly")


def resolve_plan(cfg: Config, preset: str = "orl") -> ServingPlan:
    """Locate the models and alpha for ``cfg`` (``run.out_root`` must be absolute, see
    :func:`raymia.distributed.resolve_out_root`); raise :class:`ServeSetupError` naming
    the command that creates whatever is missing."""
    from .artifacts import artifact_exists
    from .defenses.dummy import dummy_artifact_dir
    from .training import artifact_dir
    s = cfg.serve
    root = Path(cfg.run.out_root) / cfg.run.name / "artifacts"
    target = artifact_dir(cfg, "target")
    sp = str(state_path(cfg).resolve())
    if s.model == "target":
        if not artifact_exists(target):
            raise _missing(cfg, ["target model R_T"], root, preset)
        return ServingPlan(str(target.resolve()), None, None, None, "none", sp, "target")
    variant, alpha, source = s.variant, s.alpha, "serve.alpha"
    rec_path = recommendation_path(cfg)
    if alpha is None or variant == "auto":
        if not rec_path.exists():
            if s.recommendation:
                raise ServeSetupError(f"serve.recommendation: {rec_path} does not exist")
            missing = [] if artifact_exists(target) else ["target model R_T"]
            raise _missing(cfg, missing + [f"alpha recommendation ({rec_path})"], root.parent, preset)
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ServeSetupError(f"{rec_path} is not a readable recommendation ({e}); "
                                  f"rerun `{creation_command(preset)}`") from None
        if variant == "auto":
            variant, rec_alpha = _pick_variant(rec, rec_path)
        else:
            r = (rec.get("variants") or {}).get(variant)
            if not isinstance(r, dict) or r.get("alpha") is None:
                raise ServeSetupError(f"{rec_path} has no recommended alpha for variant '{variant}'"
                                      + (f" ({r['reason']})" if isinstance(r, dict) and r.get("reason") else "")
                                      + "; set serve.alpha or another serve.variant")
            rec_alpha = float(r["alpha"])
        if alpha is None:
            alpha, source = rec_alpha, str(rec_path.resolve())
            _check_rec_matches(cfg, rec_path, variant, preset)
    dummy = dummy_artifact_dir(cfg, variant)
    missing = [n for n, d in (("target model R_T", target), (f"dummy model R_dmy ({variant})", dummy))
               if not artifact_exists(d)]
    if missing:
        raise _missing(cfg, missing, root, preset)
    return ServingPlan(str(target.resolve()), str(dummy.resolve()), variant, float(alpha), source, sp, "combined",
                       dataclasses.asdict(cfg.combine))


def load_serving_model(plan: ServingPlan, device="cpu", fold_bn: bool = False):
    """The released model of ``plan``: :class:`~raymia.defenses.dummy.CombinedModel`
    (R_T and R_dmy at the plan's alpha) or R_T alone as softmax, frozen; with ``fold_bn``
    its BatchNorms are folded into the preceding layers (inference only).  Returns
    (model, n_classes, image_shape)."""
    from .defenses.dummy import CombinedModel, load_dummy
    from .models import ProbModel, fold_batchnorm, freeze
    from .training import load_classifier
    rt, man = load_classifier(plan.target_dir, device)
    if plan.model == "target":
        model = ProbModel(rt)
    else:
        dm, _, _ = load_dummy(plan.dummy_dir, device)
        model = CombinedModel(rt, dm, plan.alpha, **(plan.combine or {}))
    model = freeze(model.to(device))
    return (fold_batchnorm(model) if fold_bn else model), int(man["n_classes"]), tuple(man["image_shape"])


def filter_params(cfg: Config):
    """The similarity filter's parameters from the config's ``filter`` section (fields of
    :class:`~raymia.defenses.filter.FilterParams` taken by name)."""
    from .defenses.filter import FilterParams
    sec = getattr(cfg, "filter", None)
    names = [f.name for f in dataclasses.fields(FilterParams)]
    kw = {n: getattr(sec, n) for n in names if sec is not None and hasattr(sec, n)}
    try:
        return FilterParams(**kw)
    except ValueError as e:
        raise ConfigError(f"filter: {e}") from None


def config_from_serve_args(args: Mapping[str, Any]) -> Config:
    """``serve run serve.app [preset=NAME|PATH.yaml] [section.key=value ...]``."""
    args = dict(args or {})
    preset = str(args.pop("preset", "orl"))
    return load_config(preset, [f"{k}={v}" for k, v in args.items()])


# ----------------------------------------------------------------------------- requests

class RequestError(Exception):
    """A refused request: HTTP ``status`` and a JSON body ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": self.code, "message": self.message}


@dataclass(frozen=True)
class InputSpec:
    channels: int
    height: int
    width: int
    n_classes: int
    max_top_k: int
    labels_only: bool = False

    @property
    def shape(self) -> tuple:
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        kind = "grayscale" if self.channels == 1 else "RGB"
        return f"{self.width}x{self.height} {kind} (array shape {list(self.shape)}, values in [0, 1])"


CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:@+\-]{1,128}$")
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
JSON_KEYS = ("image", "top_k", "labels_only")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(given: Optional[str], digest: Optional[str]) -> bool:
    return bool(given) and digest is not None and hmac.compare_digest(hash_secret(given), digest)


def check_client_id(cid: Optional[str], what: str = "client id") -> str:
    if cid is None or not cid.strip():
        raise RequestError(400, "missing_client_id",
                           f"missing {what}: send your client id in the X-Client-Id header")
    if not CLIENT_ID_RE.match(cid):
        raise RequestError(400, "bad_client_id",
                           f"invalid {what}: use 1-128 characters from letters, digits and . _ : @ + -")
    return cid


def load_api_keys(path: str) -> dict[str, str]:
    """Read ``{api_key: client_id}`` (YAML or JSON) and return ``{sha256(key): client_id}``
    (replicas only ever see the hashes)."""
    import yaml
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"serve.api_keys_file: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"serve.api_keys_file: {p} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"serve.api_keys_file: {p} must map API keys to client ids")
    out = {}
    for k, v in data.items():
        if not isinstance(k, str) or len(k) < 8:
            raise ConfigError(f"serve.api_keys_file: API keys must be strings of >= 8 characters ({p})")
        if not isinstance(v, str) or not CLIENT_ID_RE.match(v):
            raise ConfigError(f"serve.api_keys_file: client id {v!r} is invalid "
                              "(1-128 letters, digits and . _ : @ + -)")
        out[hash_secret(k)] = v
    return out


def _bearer(headers: Mapping[str, str]) -> Optional[str]:
    auth = headers.get("authorization") or ""
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def identify(headers: Mapping[str, str], api_keys: Optional[Mapping[str, str]]) -> str:
    """The client id of a request: from its API key when keys are configured (``X-API-Key``
    or ``Authorization: Bearer``), else the ``X-Client-Id`` header.  ``headers`` keys
    are lower-case (as Starlette's are)."""
    if api_keys is not None:
        key = headers.get("x-api-key") or _bearer(headers)
        if not key:
            raise RequestError(401, "missing_api_key", "missing API key: send it in the X-API-Key header",
                               {"WWW-Authenticate": "Bearer"})
        cid = api_keys.get(hash_secret(key))
        if cid is None:
            raise RequestError(401, "unknown_api_key", "unknown API key", {"WWW-Authenticate": "Bearer"})
        return cid
    return check_client_id(headers.get("x-client-id"))


def check_admin(headers: Mapping[str, str], digest: Optional[str], env_name: str) -> None:
    if digest is None:
        raise RequestError(403, "admin_disabled",
                           f"admin endpoints are disabled: set the environment variable {env_name} to a token "
                           "before starting the app")
    given = headers.get("x-admin-token") or _bearer(headers)
    if not given:
        raise RequestError(401, "missing_admin_token",
                           "missing admin token: send it as 'Authorization: Bearer <token>' or X-Admin-Token",
                           {"WWW-Authenticate": "Bearer"})
    if not secret_matches(given, digest):
        raise RequestError(401, "bad_admin_token", "wrong admin token", {"WWW-Authenticate": "Bearer"})


def check_content_length(headers: Mapping[str, str], limit: int) -> None:
    cl = headers.get("content-length")
    if cl is None:
        return
    if not cl.strip().isdigit():
        raise RequestError(400, "bad_content_length", f"Content-Length {cl!r} is not a number")
    if int(cl) > limit:
        raise too_large(int(cl), limit)


def too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, "payload_too_large", f"request body of {size} bytes exceeds the limit of {limit} bytes")


def check_array(a: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Validate an image array and return it as float32 (C, H, W)."""
    if a.dtype.kind not in "iuf":
        raise RequestError(422, "bad_values", "image values must be numbers (no strings, booleans or nulls)")
    given = list(a.shape)
    if a.ndim == 2 and spec.channels == 1:
        a = a[None]
    if tuple(a.shape) != spec.shape:
        raise RequestError(422, "bad_shape", f"image has shape {given}; this model takes {spec.describe()}"
                           + (f" (or [{spec.height}, {spec.width}])" if spec.channels == 1 else ""))
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise RequestError(422, "not_finite", "image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise RequestError(422, "out_of_range", f"pixel values must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}")
    return np.ascontiguousarray(a, dtype=np.float32)


def array_from_nested(obj: Any, spec: InputSpec) -> np.ndarray:
    if not isinstance(obj, list):
        raise RequestError(422, "bad_image", "'image' must be a nested list of numbers or a base64 PNG/JPEG string")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a = np.array(obj)
    except (ValueError, TypeError, OverflowError, Warning):
        raise RequestError(422, "bad_shape", f"'image' is not a rectangular array of numbers; "
                           f"this model takes {spec.describe()}") from None
    if a.dtype == object:
        raise RequestError(422, "bad_values", "'image' must be a rectangular array of finite numbers")
    if a.dtype.kind == "b":
        raise RequestError(422, "bad_values", "image values must be numbers (no strings, booleans or nulls)")
    return check_array(a, spec)


def decode_image_bytes(data: bytes, spec: InputSpec) -> np.ndarray:
    """PNG or JPEG bytes -> float32 (C, H, W) in [0, 1]; size and mode are checked from
    the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise RequestError(400, "empty_body", "empty request body: send a PNG/JPEG image or JSON")
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise RequestError(415, "unsupported_image", "image bytes are neither PNG nor JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if (h, w) != (spec.height, spec.width):
                raise RequestError(422, "bad_size", f"image is {w}x{h}; this model takes {spec.describe()}")
            want = "L" if spec.channels == 1 else "RGB"
            if im.mode != want:
                raise RequestError(422, "bad_channels", f"image mode is {im.mode}; this model takes "
                                   f"{'8-bit grayscale (L)' if spec.channels == 1 else '8-bit RGB'} images")
            im.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(422, "bad_size", f"image dimensions are far too large; this model takes "
                           f"{spec.describe()}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise RequestError(400, "bad_image", f"could not decode the image ({type(e).__name__}: {e})") from None
    a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 3:
        a = a.transpose(2, 0, 1)
    return check_array(a, spec)


def _parse_top_k(v: Any, spec: InputSpec) -> int:
    if isinstance(v, str):
        v = v.strip()
        if not re.fullmatch(r"\d{1,6}", v):
            raise RequestError(422, "bad_top_k", f"top_k must be an integer in 1..{spec.max_top_k}, got {v!r}")
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= spec.max_top_k:
        raise RequestError(422, "bad_top_k", f"top_k must be an integer in 1..{spec.max_top_k}, got {v!r}")
    return v


def _parse_flag(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
        return v.lower() in ("1", "true", "yes")
    raise RequestError(422, f"bad_{name}", f"{name} must be true or false, got {v!r}")


def parse_predict(content_type: Optional[str], body: bytes, spec: InputSpec,
                  query: Optional[Mapping[str, str]] = None) -> tuple[np.ndarray, dict]:
    """Parse a ``POST /predict`` body -> (image float32 (C, H, W), {"top_k", "labels_only"}).

    Bodies: ``image/png`` or ``image/jpeg`` bytes (also ``application/octet-stream``);
    ``application/json`` ``{"image": nested list | base64 PNG/JPEG, "top_k": k,
    "labels_only": bool}``.  Options may also come as query parameters."""
    opts = {"top_k": spec.max_top_k, "labels_only": spec.labels_only}
    for k, v in (query or {}).items():
        if k == "top_k":
            opts["top_k"] = _parse_top_k(v, spec)
        elif k == "labels_only":
            opts["labels_only"] = _parse_flag(v, "labels_only") or spec.labels_only
        else:
            raise RequestError(422, "unknown_parameter", f"unknown query parameter {k!r}; valid: top_k, labels_only")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("", "application/octet-stream"):
        head = body.lstrip()[:1]
        ctype = "application/json" if head in (b"{", b"[") else ("image/*" if body else "")
    if not body:
        raise RequestError(400, "empty_body", "empty request body: send a PNG/JPEG image or JSON")
    if ctype in ("image/png", "image/jpeg", "image/jpg", "image/*"):
        return decode_image_bytes(body, spec), opts
    if ctype != "application/json":
        raise RequestError(415, "unsupported_media_type",
                           f"Content-Type {content_type!r} is not supported; send image/png, image/jpeg or "
                           "application/json")
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "bad_encoding", "JSON body is not valid UTF-8") from None
    except RecursionError:
        raise RequestError(400, "bad_json", "JSON body is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, "bad_json", f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "bad_json", "JSON body must be an object like {\"image\": [[...]]}")
    unknown = sorted(set(doc) - set(JSON_KEYS))
    if unknown:
        raise RequestError(422, "unknown_field", f"unknown field(s) {unknown}; valid: {', '.join(JSON_KEYS)}")
    if "image" not in doc:
        raise RequestError(422, "missing_image", "JSON body has no 'image' field")
    if "top_k" in doc:
        opts["top_k"] = _parse_top_k(doc["top_k"], spec)
    if "labels_only" in doc:
        opts["labels_only"] = _parse_flag(doc["labels_only"], "labels_only") or spec.labels_only
    img = doc["image"]
    if isinstance(img, str):
        try:
            raw = base64.b64decode(img, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_base64", "'image' string is not valid base64") from None
        return decode_image_bytes(raw, spec), opts
    return array_from_nested(img, spec), opts


def prediction(probs: np.ndarray, top_k: int, labels_only: bool) -> dict:
    """The response body for one confidence vector."""
    label = int(np.argmax(probs))
    if labels_only:
        return {"label": label}
    k = min(top_k, probs.shape[0])
    idx = np.argsort(-probs, kind="stable")[:k]
    return {"label": label, "top_k": [{"label": int(i), "confidence": float(probs[i])} for i in idx]}


def shard_of(client_id: str, n_shards: int) -> int:
    """Stable shard of a client id (crc32, the same in every process)."""
    return zlib.crc32(client_id.encode("utf-8")) % n_shards


# ----------------------------------------------------------------------------- filter state

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
        from .defenses.filter import ClientFilterState, FilterInputError
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


# ----------------------------------------------------------------------------- HTTP clients

def encode_png(img) -> bytes:
    """(C, H, W) or (H, W) float in [0, 1] -> 8-bit PNG bytes."""
    from PIL import Image
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return _png(Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)))


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Reply:
    status: int
    body: dict
    seconds: float


class ServeClient:
    """A minimal client for the app's HTTP API (stdlib ``urllib``)."""

    def __init__(self, url: str, client_id: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 30.0):
        self.url, self.client_id, self.api_key, self.timeout = url.rstrip("/"), client_id, api_key, timeout

    def _headers(self, extra: Optional[dict] = None) -> dict:
        h = {}
        if self.client_id is not None:
            h["X-Client-Id"] = self.client_id
        if self.api_key is not None:
            h["X-API-Key"] = self.api_key
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[dict] = None) -> Reply:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=self._headers(headers))
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            doc = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = {"raw": raw[:200].decode("utf-8", "replace")}
        return Reply(status, doc if isinstance(doc, dict) else {"value": doc}, time.perf_counter() - t0)

    def predict(self, img, as_png: bool = False, **opts) -> Reply:
        """Send one image: JSON nested list (exact floats; default) or PNG bytes (8-bit)."""
        if as_png:
            q = "&".join(f"{k}={str(v).lower()}" for k, v in opts.items())
            return self.request("POST", "/predict" + (f"?{q}" if q else ""), encode_png(img),
                                {"Content-Type": "image/png"})
        doc = {"image": np.asarray(img, dtype=np.float32).tolist(), **opts}
        return self.request("POST", "/predict", json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def healthz(self) -> Reply:
        return self.request("GET", "/healthz")


class ClientError(RuntimeError):
    """The endpoint answered something other than a prediction or a block."""


def attack_endpoint(client: ServeClient, model, target: int, shape: tuple, iters: int, lr: float,
                    noise_std: float, seed: int = 0, log: Optional[Callable[[str], None]] = None) -> dict:
    """Fredrikson's attack against the live endpoint.

    The gradient comes from ``model``, a local white-box copy of the served model (the
    threat model of Fredrikson's white-box attack and of the filter paper, whose attacker
    optimises on confidences it gets back); every query the attack makes -- the current
    image plus fresh noise -- is sent to the endpoint first, and the attack stops at the
    first 403.  Returns what happened."""
    from .attacks.fredrikson import fredrikson_attack
    replies: list[Reply] = []

    def gate(q) -> bool:
        r = client.predict(q.numpy())
        replies.append(r)
        if r.status == 403:
            return False
        if r.status != 200:
            raise ClientError(f"query {len(replies)}: HTTP {r.status} {r.body}")
        if log and (len(replies) <= 3 or len(replies) % 25 == 0):
            conf = next((t["confidence"] for t in r.body.get("top_k", []) if t["label"] == target), None)
            log(f"query {len(replies)}: served, label {r.body.get('label')}, server confidence in target "
                f"{'n/a' if conf is None else f'{conf:.3f}'}")
        return True

    res = fredrikson_attack(model, target, shape, iters=iters, lr=lr, noise_std=noise_std, seed=seed, gate=gate)
    return {"target": target, "queries_sent": len(replies), "served": res.queries, "blocked_at": res.blocked_at,
            "blocked_reply": replies[-1].body if res.blocked_at else None, "final_local_conf": res.target_conf,
            "image": res.image, "median_latency_ms": 1000 * float(np.median([r.seconds for r in replies]))
            if replies else float("nan")}


def regular_user(client: ServeClient, images: Sequence, labels: Optional[Sequence[int]] = None,
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Send distinct images without noise, one request each (the paper's regular user);
    stop at the first 403."""
    served, correct, blocked_at = 0, 0, None
    for i, img in enumerate(images, 1):
        r = client.predict(np.asarray(img))
        if r.status == 403:
            blocked_at = i
            if log:
                log(f"image {i}: BLOCKED ({r.body.get('message')})")
            break
        if r.status != 200:
            raise ClientError(f"image {i}: HTTP {r.status} {r.body}")
        served += 1
        if labels is not None:
            correct += int(r.body["label"] == int(labels[i - 1]))
    return {"sent": served + (blocked_at is not None), "served": served, "blocked_at": blocked_at,
            "accuracy": correct / served if labels is not None and served else None}
