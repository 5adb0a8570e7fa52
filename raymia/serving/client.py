"""A stdlib-only HTTP client (``urllib``) for the live Serve app's API."""
from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

import numpy as np


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

