"""HTTP request handling without a web framework: client identity (client id header or
API key), the admin token, body size limits, and ``POST /predict`` parsing (PNG/JPEG
bytes, or JSON with a nested list or base64 PNG/JPEG) and its reply; every refusal is a
:class:`RequestError` with an HTTP status and a JSON body."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..config import ConfigError


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


MAX_INT_DIGITS = 30     # a pixel, top_k or flag never needs more; longer integer literals are refused


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(422, "bad_number", f"integer literal of {len(text)} characters in the JSON body; "
                           f"numbers must have at most {MAX_INT_DIGITS} digits")
    return int(text)


def load_json(body: bytes) -> Any:
    """A request body as JSON; every failure is a 4xx :class:`RequestError` (invalid
    UTF-8 or JSON, nesting too deep, an integer literal too long for Python's int-string
    limit, which ``json`` raises as a plain ValueError, not a JSONDecodeError).  NaN and
    Infinity parse as floats and are refused later with the image's values."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "bad_encoding", "JSON body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise RequestError(400, "bad_json", "JSON body is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, "bad_json", f"body is not valid JSON: {e}") from None
    except ValueError as e:       # e.g. int-string conversion limits, lone surrogates
        raise RequestError(400, "bad_json", f"body is not valid JSON: {str(e)[:200]}") from None


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
    doc = load_json(body)
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
