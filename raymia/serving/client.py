"""A stdlib-only HTTP client (``urllib``) for the live Serve app's API, and request bodies
for trying it by hand."""
from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ConfigError


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


def write_samples(bundle, out: Path, count: int, say) -> int:
    """Held-out faces of R_T's identities as request bodies: PNG bytes and JSON nested lists."""
    out.mkdir(parents=True, exist_ok=True)
    x, y = bundle.private_test.x.numpy(), bundle.private_test.y.numpy()
    first = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)]      # one face per class
    for i, k in enumerate(first[:count]):
        (out / f"face-{i}.png").write_bytes(encode_png(x[k]))
        (out / f"face-{i}.json").write_text(json.dumps({"image": x[k].tolist()}))
        say(f"{out / f'face-{i}.png'} and .json: a held-out face of class {int(y[k])}")
    return 0


def add_client_args(p) -> None:
    """``jobs/serve_client.py``'s own arguments (besides ``--preset``/``--set``)."""
    p.add_argument("mode", choices=["attack", "regular", "sample"])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's address")
    p.add_argument("--client-id", default=None, help="X-Client-Id to send (default: mallory / alice)")
    p.add_argument("--api-key", default=None, help="X-API-Key to send (when the app maps API keys to clients)")
    p.add_argument("--target", type=int, default=0, help="attack: R_T class to reconstruct")
    p.add_argument("--noise", type=float, default=None, help="attack: noise std per query (default filter_sim.noise_std)")
    p.add_argument("--iters", type=int, default=None, help="attack: most queries (default filter_sim.max_iters)")
    p.add_argument("--label", type=int, default=None, help="regular: send images of this label only (default: all)")
    p.add_argument("--max-images", type=int, default=0, help="regular: send at most this many images (0 = all)")
    p.add_argument("--save", default=None, help="attack: write the reconstruction as a PNG here")
    p.add_argument("--out", default="runs/serve_samples", help="sample: folder for face-<i>.png and face-<i>.json")
    p.add_argument("--count", type=int, default=3, help="sample: how many held-out faces to write")


@contextlib.contextmanager
def app_errors():
    """Turn an unreachable app or an unexpected answer into one-line user errors
    (:class:`~raymia.config.ConfigError`)."""
    try:
        yield
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ConfigError(f"cannot reach the app ({getattr(e, 'reason', e)}); start it with `serve run serve.app` "
                          "and pass its address with --url") from None
    except ClientError as e:
        raise ConfigError(f"unexpected answer from the app: {e}") from None
