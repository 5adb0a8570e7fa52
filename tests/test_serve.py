"""The Ray Serve app over real HTTP on 127.0.0.1 (smoke-preset models), and the Ray-free
serving pieces: filter-state store, plan resolution, fail-fast without artifacts."""
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from raymia.config import ConfigError, config_from_dict, save_config
from raymia.defenses.filter import FilterInputError, FilterParams
from raymia.attacks.endpoint import attack_endpoint, regular_user
from raymia.serving import FilterStateStore, ServeClient, ServeSetupError, encode_png, resolve_plan, shard_of

ROOT = Path(__file__).resolve().parents[1]


def library_model(cfg):
    """R' = 0.5 R_T + 0.5 R_dmy straight from the library (not through raymia.serving)."""
    from raymia.defenses.dummy import CombinedModel, dummy_artifact_dir, load_dummy
    from raymia.kinds import artifact_dir
    from raymia.training import load_classifier
    rt, _ = load_classifier(artifact_dir(cfg, "target"))
    dm, _, _ = load_dummy(dummy_artifact_dir(cfg, "calibrated"))
    return CombinedModel(rt, dm, 0.5).eval()


def faces(bundle):
    """Distinct real faces of the smoke bundle (test then train), (N, 1, 32, 32) float32."""
    x = torch.cat([bundle.private_test.x, bundle.private_train.x]).numpy()
    y = torch.cat([bundle.private_test.y, bundle.private_train.y]).numpy()
    return x, y


def state(live, cid):
    r = live.admin("GET", f"/admin/clients/{cid}")
    return r.body if r.status == 200 else None


def settled(live, cid, n_queries, timeout_s=15.0):
    """The client's state once its stored query count reached ``n_queries`` (or the last
    one seen after ``timeout_s``): replicas add locally refused queries at their next flush."""
    import time
    deadline = time.time() + timeout_s
    while True:
        st = state(live, cid)
        if (st is not None and st["n_queries"] >= n_queries) or time.time() > deadline:
            return st
        time.sleep(0.2)


# ----------------------------------------------------------------------------- HTTP, live app

def test_prediction_matches_library_combined_model(serve_app, serve_artifacts):
    cfg, bundle = serve_artifacts
    model = library_model(cfg)
    x, _ = faces(bundle)
    c = serve_app.client("matcher")       # one client per format: the same face thrice would be blocked
    c_png, c_b64 = serve_app.client("matcher-png"), serve_app.client("matcher-b64")
    for i, img in enumerate(x[:4]):
        with torch.no_grad():
            want = model(torch.from_numpy(img[None]))[0].numpy()
        r = c.predict(img, top_k=5)            # JSON nested list: exact float32 pixels
        assert r.status == 200, r.body
        got = np.zeros(5)
        for t in r.body["top_k"]:
            got[t["label"]] = t["confidence"]
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert r.body["label"] == int(want.argmax())
        q = np.round(img * 255).astype(np.uint8).astype(np.float32) / 255.0   # what a PNG carries
        with torch.no_grad():
            want_q = model(torch.from_numpy(q[None]))[0].numpy()
        png = encode_png(img)
        for reply in (c_png.request("POST", "/predict?top_k=5", png, {"Content-Type": "image/png"}),
                      c_b64.request("POST", "/predict", json.dumps({"image": base64.b64encode(png).decode(), "top_k": 5})
                                .encode(), {"Content-Type": "application/json"})):
            assert reply.status == 200, reply.body
            conf = {t["label"]: t["confidence"] for t in reply.body["top_k"]}
            np.testing.assert_allclose([conf[k] for k in range(5)], want_q, atol=1e-5)
    r = c.predict(x[10], top_k=2, labels_only=True)
    assert r.status == 200 and set(r.body) == {"label"}
    h = serve_app.client().healthz()
    assert h.status == 200 and h.body["input"] == {"channels": 1, "height": 32, "width": 32, "range": [0.0, 1.0]}


def test_attacker_is_blocked_and_stays_blocked_regular_user_is_not(serve_app, serve_artifacts):
    cfg, bundle = serve_artifacts
    mallory = serve_app.client("mallory")
    res = attack_endpoint(mallory, library_model(cfg), target=1, shape=(1, 32, 32), iters=200,
                          lr=cfg.attack.fredrikson_lr, noise_std=cfg.filter_sim.noise_std, seed=0)
    assert res["blocked_at"] is not None and res["served"] == res["blocked_at"] - 1
    assert res["served"] >= cfg.filter.l_sp - 1         # Algorithm 2 needs L_sp matches first
    assert res["blocked_reply"]["error"] == "blocked"
    x, y = faces(bundle)
    for img in x[:3]:                                   # even distinct real faces are refused now
        assert mallory.predict(img).status == 403
    st = state(serve_app, "mallory")
    assert st["blocked"] and st["count"] == cfg.filter.l_sp
    alice = serve_app.client("alice")
    out = regular_user(alice, x[:30], y[:30])
    assert out["blocked_at"] is None and out["served"] == 30
    st = state(serve_app, "alice")
    assert not st["blocked"] and st["n_queries"] == 30 and st["count"] == 0


def _png_bytes(arr, fmt="PNG"):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def bad_requests(limit: int):
    """(name, client id, method, path, headers, body, expected status) — 30 kinds."""
    ok = np.full((32, 32), 0.5).tolist()
    J = {"Content-Type": "application/json"}
    P = {"Content-Type": "image/png"}
    js = lambda d: json.dumps(d).encode()
    gray = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    png_ok = _png_bytes(gray)
    bomb = bytearray(_png_bytes(np.zeros((8, 8), np.uint8)))
    bomb[16:24] = (100000).to_bytes(4, "big") * 2     # IHDR claims 100000 x 100000 (valid CRC)
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    return [
        ("no client id", None, "POST", "/predict", J, js({"image": ok}), 400),
        ("empty client id", "", "POST", "/predict", J, js({"image": ok}), 400),
        ("bad client id characters", "a b/../c", "POST", "/predict", J, js({"image": ok}), 400),
        ("client id too long", "x" * 200, "POST", "/predict", J, js({"image": ok}), 400),
        ("empty body", "corpus", "POST", "/predict", J, b"", 400),
        ("invalid JSON", "corpus", "POST", "/predict", J, b'{"image": [[0.5, ', 400),
        ("JSON not UTF-8", "corpus", "POST", "/predict", J, b'{"image": "\xff\xfe"}', 400),
        ("JSON nested too deeply", "corpus", "POST", "/predict", J, b"[" * 100000 + b"]" * 100000, 400),
        ("JSON array body", "corpus", "POST", "/predict", J, js([ok]), 422),
        ("JSON without image", "corpus", "POST", "/predict", J, js({"top_k": 1}), 422),
        ("unknown JSON field", "corpus", "POST", "/predict", J, js({"image": ok, "alpha": 1.0}), 422),
        ("wrong size", "corpus", "POST", "/predict", J, js({"image": np.full((16, 16), 0.5).tolist()}), 422),
        ("wrong channels", "corpus", "POST", "/predict", J, js({"image": np.full((3, 32, 32), 0.5).tolist()}), 422),
        ("ragged list", "corpus", "POST", "/predict", J, js({"image": [[0.5] * 32] * 31 + [[0.5] * 5]}), 422),
        ("strings in image", "corpus", "POST", "/predict", J, js({"image": [["a"] * 32] * 32}), 422),
        ("booleans in image", "corpus", "POST", "/predict", J, js({"image": [[True] * 32] * 32}), 422),
        ("nulls in image", "corpus", "POST", "/predict", J, js({"image": [[None] * 32] * 32}), 422),
        ("NaN pixel", "corpus-fresh", "POST", "/predict", J, js({"image": ok}).replace(b"0.5", b"NaN", 1), 422),
        ("infinite pixel", "corpus", "POST", "/predict", J, js({"image": ok}).replace(b"0.5", b"1e999", 1), 422),
        ("pixel above 1", "corpus", "POST", "/predict", J, js({"image": [[2.0] * 32] * 32}), 422),
        ("negative pixel", "corpus", "POST", "/predict", J, js({"image": [[-0.1] * 32] * 32}), 422),
        ("invalid base64", "corpus", "POST", "/predict", J, js({"image": "not base64!!"}), 400),
        ("base64 of a non-image", "corpus", "POST", "/predict", J,
         js({"image": base64.b64encode(b"hello world").decode()}), 415),
        ("PNG of the wrong size", "corpus", "POST", "/predict", P, _png_bytes(np.zeros((64, 64), np.uint8)), 422),
        ("RGB PNG for a gray model", "corpus", "POST", "/predict", P, _png_bytes(np.zeros((32, 32, 3), np.uint8)), 422),
        ("16-bit PNG", "corpus", "POST", "/predict", P, _png_bytes(np.zeros((32, 32), np.uint16)), 422),
        ("JPEG of the wrong size", "corpus", "POST", "/predict", {"Content-Type": "image/jpeg"},
         _png_bytes(np.zeros((20, 20), np.uint8), fmt="JPEG"), 422),
        ("truncated PNG", "corpus", "POST", "/predict", P, png_ok[:60], 400),
        ("decompression-bomb header", "corpus", "POST", "/predict", P, bytes(bomb), 422),
        ("GIF sent as PNG", "corpus", "POST", "/predict", P, _png_bytes(gray, fmt="GIF"), 415),
        ("text/plain body", "corpus", "POST", "/predict", {"Content-Type": "text/plain"}, b"0.5 0.5", 415),
        ("payload over the limit", "corpus", "POST", "/predict", J, b" " * (limit + 1), 413),
        ("top_k zero", "corpus", "POST", "/predict?top_k=0", J, js({"image": ok}), 422),
        ("top_k not a number", "corpus", "POST", "/predict", J, js({"image": ok, "top_k": "five"}), 422),
        ("labels_only not a flag", "corpus", "POST", "/predict?labels_only=maybe", J, js({"image": ok}), 422),
        ("unknown query parameter", "corpus", "POST", "/predict?alpha=0", J, js({"image": ok}), 422),
        ("GET /predict", "corpus", "GET", "/predict", {}, None, 405),
        ("unknown route", "corpus", "POST", "/predictions", J, js({"image": ok}), 404),
        ("admin without token", "corpus", "GET", "/admin/clients/corpus", {}, None, 401),
        ("admin with a wrong token", "corpus", "POST", "/admin/clients/corpus/unblock",
         {"Authorization": "Bearer wrong"}, None, 401),
    ]


def test_bad_requests_get_4xx_json_and_leave_state_unchanged(serve_app, serve_artifacts):
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    assert serve_app.client("corpus").predict(x[0]).status == 200
    before = state(serve_app, "corpus")
    corpus = bad_requests(serve_app.cfg.serve.max_body_bytes)
    assert len(corpus) >= 20
    seen = {}
    for name, cid, method, path, headers, body, want in corpus:
        r = ServeClient(serve_app.url, cid).request(method, path, body, headers)
        seen[name] = r.status
        assert 400 <= r.status < 500, (name, r.status, r.body)
        assert isinstance(r.body.get("error"), str) and r.body.get("message"), (name, r.body)
        assert r.status == want, (name, r.status, r.body)
    conn = http.client.HTTPConnection("127.0.0.1", serve_app.port, timeout=60)   # no Content-Length
    conn.request("POST", "/predict", body=iter([b" " * 65536] * 32), encode_chunked=True,
                 headers={"X-Client-Id": "corpus", "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"] == "payload_too_large"
    conn.close()
    assert state(serve_app, "corpus") == before           # same n_queries, counter, version, time
    assert state(serve_app, "corpus-fresh") is None        # a refused first query creates no state
    assert serve_app.client("corpus").predict(x[1]).status == 200


def test_32_concurrent_requests_of_one_client_count_exactly(serve_app, serve_artifacts):
    cfg, bundle = serve_artifacts
    rng = np.random.default_rng(1)
    distinct = [rng.random((1, 32, 32)).astype(np.float32) for _ in range(32)]
    same = faces(bundle)[0][5]
    with ThreadPoolExecutor(32) as pool:
        a = list(pool.map(lambda im: serve_app.client("burst-distinct").predict(im).status, distinct))
        b = list(pool.map(lambda im: serve_app.client("burst-same").predict(im).status, [same] * 32))
    assert a == [200] * 32
    st = state(serve_app, "burst-distinct")
    assert st["n_queries"] == 32 and st["count"] == 0 and st["version"] == 32
    # Identical queries: Algorithm 2 serves the first three (counter 0, 1, 3) and blocks
    # at the fourth (counter 6 -> capped at L_sp=4); lost updates would serve more.
    assert sorted(b) == [200] * 3 + [403] * 29
    st = state(serve_app, "burst-same")
    assert st["n_queries"] == 32 and st["count"] == cfg.filter.l_sp and st["blocked"]


def test_admin_endpoints_api_keys_and_labels_only(serve_app, serve_artifacts, tmp_path):
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    zed = serve_app.client("zed")
    assert [zed.predict(x[30]).status for _ in range(4)] == [200, 200, 200, 403]
    assert serve_app.client("yan").predict(x[31]).status == 200
    r = serve_app.admin("GET", "/admin/clients")
    assert r.status == 200 and "zed" in r.body["blocked"] and "yan" not in r.body["blocked"]
    assert serve_app.admin("GET", "/admin/clients/nobody").status == 404
    info = serve_app.admin("GET", "/admin/info")
    assert info.status == 200 and info.body["plan"]["alpha"] == 0.5 and info.body["plan"]["variant"] == "calibrated"
    keys = tmp_path / "keys.yaml"
    keys.write_text("key-of-alice-123: alice\nkey-of-bob-4567: bob\n")
    original = serve_app.cfg
    cfg = config_from_dict(original.to_dict())
    cfg.serve.api_keys_file, cfg.serve.labels_only = str(keys), True
    try:
        serve_app.deploy(cfg)
        r = serve_app.client(api_key="key-of-bob-4567").predict(x[3], top_k=3)
        assert r.status == 200 and set(r.body) == {"label"}     # labels-only mode wins over top_k
        assert state(serve_app, "bob")["n_queries"] == 1         # identity came from the key
        assert serve_app.client("bob").predict(x[3]).status == 401              # X-Client-Id is not enough
        assert serve_app.client(api_key="wrong-key-000").predict(x[3]).status == 401
        assert state(serve_app, "bob")["n_queries"] == 1
    finally:
        serve_app.deploy(original)


# ----------------------------------------------------------------------------- fail fast, plan

def test_serve_run_without_artifacts_fails_fast_with_one_message(tmp_path):
    serve_bin = Path(sys.executable).with_name("serve")
    p = subprocess.run([str(serve_bin), "run", "serve.app", "preset=smoke", f"run.out_root={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "make demo ARGS='--preset smoke'" in err[0] and "make serve" in err[0]


def test_alpha_and_variant_come_from_the_recommendation(serve_artifacts, tmp_path):
    base, _ = serve_artifacts
    rec = tmp_path / "alpha_sweep" / "recommendation.json"
    rec.parent.mkdir()
    cfg = config_from_dict(base.to_dict())
    cfg.serve.alpha, cfg.serve.variant, cfg.serve.recommendation = None, "auto", str(rec)
    with pytest.raises(ServeSetupError, match="does not exist"):
        resolve_plan(cfg, "smoke")
    rec.write_text(json.dumps({"variants": {
        "paper": {"alpha": 0.9, "mia_success_top5": 0.6, "accuracy": 1.0},
        "calibrated": {"alpha": 0.35, "mia_success_top5": 0.3, "accuracy": 1.0}}}))
    plan = resolve_plan(cfg, "smoke")
    assert (plan.variant, plan.alpha, plan.alpha_source) == ("calibrated", 0.35, str(rec.resolve()))
    cfg.serve.variant = "paper"                          # its R_dmy was never trained here
    with pytest.raises(ServeSetupError, match=r"dummy model R_dmy \(paper\).*make demo ARGS='--preset smoke'"):
        resolve_plan(cfg, "smoke")
    cfg.serve.variant = "calibrated"
    other = config_from_dict(base.to_dict())
    other.target.epochs += 1                             # the sweep ran on other models
    save_config(other, rec.parent / "config.yaml")
    with pytest.raises(ServeSetupError, match="computed for other models"):
        resolve_plan(cfg, "smoke")
    other = config_from_dict(base.to_dict())
    other.combine.rule = "gated"                        # same models, another combination rule
    save_config(other, rec.parent / "config.yaml")
    with pytest.raises(ServeSetupError, match="combination rule"):
        resolve_plan(cfg, "smoke")
    cfg.serve.alpha = 0.2                                # an explicit alpha needs no recommendation
    assert resolve_plan(cfg, "smoke").alpha == 0.2


# ----------------------------------------------------------------------------- filter-state store

def test_filter_state_store_persists_replays_and_stays_exact(store_at):
    p = FilterParams()
    path = store_at
    a, b = FilterStateStore(path, p), FilterStateStore(path, p)     # two holders of one file
    img = np.full((1, 32, 32), 0.25, np.float32)
    v1 = a.check("c", img, "req-1")
    assert v1["safe"] and not v1["replayed"] and v1["n_queries"] == 1
    assert a.check("c", img, "req-1") == {**v1, "replayed": True}   # a retried request counts once
    assert b.check("c", img, "req-2")["count"] == 1                  # b sees a's write
    assert a.check("c", img, "req-3")["count"] == 3                  # a notices b's write (stale cache)
    with pytest.raises(FilterInputError):
        a.check("c", np.full((1, 32, 32), np.nan, np.float32), "req-4")
    assert a.get("c")["n_queries"] == 3 and a.get("c")["version"] == 3
    assert not a.check("c", img, "req-5")["safe"]
    a.close()
    b.close()
    c = FilterStateStore(path, p)                                    # reopened: still blocked
    assert c.get("c")["blocked"] and not c.check("c", np.random.rand(1, 32, 32).astype(np.float32))["safe"]
    assert c.reset("c")["blocked"] is False and c.check("c", img)["safe"]
    c.close()
    with pytest.raises(ConfigError, match="other filter parameters"):
        FilterStateStore(path, FilterParams(l_sp=8))


def test_filter_state_store_snapshot_plus_log_restores_the_exact_state(store_at):
    """Reloading (snapshot + replayed query log) gives the state a never-stopped filter has."""
    from raymia.defenses.filter import ClientFilterState
    p = FilterParams(n_b=4, l_sp=50)
    rng = np.random.default_rng(3)
    base = rng.random((1, 16, 16)).astype(np.float32)
    queries = [np.clip(base + rng.normal(0, 1e-4 if i % 3 else 0.2, base.shape), 0, 1).astype(np.float32)
               for i in range(23)]
    for i in range(0, 23, 4):                            # some 8-bit images (logged as bytes)
        queries[i] = np.round(queries[i] * 255).astype(np.uint8).astype(np.float32) / 255.0
    ref = ClientFilterState(p)
    store = FilterStateStore(store_at, p, snapshot_every=5)
    for i, q in enumerate(queries):
        want = ref.check(q)
        got = store.check("k", q, f"r{i}")
        assert (got["safe"], got["count"], got["matches"]) == (want.safe, want.count, want.matches)
        other = FilterStateStore(store_at, p, snapshot_every=5)     # empty cache: reads the stored state
        assert other._load("k").state.to_bytes() == ref.to_bytes()   # buffer, counter, query count: bit for bit
        other.close()
    assert ref.count > 0 and not ref.blocked


def test_store_keeps_the_feature_rule_embeddings_through_snapshot_and_log(store_at):
    """The robust detector with its feature rule in the store: every query's embedding is
    logged beside its image, so a holder that reloads (snapshot + replayed log) has the
    state of a never-stopped detector, bit for bit, and blocks where it blocks; a query
    without an embedding is refused (state unchanged)."""
    from raymia.defenses.filter.robust import RobustClientState, RobustParams
    p = RobustParams(t_bits=0, l_sp=1000, feat_k=4, feat_sim=0.9, feat_memory=8)
    rng = np.random.default_rng(4)
    centre = rng.normal(size=24)
    queries = [(rng.random((1, 16, 16)).astype(np.float32),
                (centre if i % 2 else rng.normal(size=24)) + 0.1 * rng.normal(size=24)) for i in range(14)]
    ref = RobustClientState(p)
    store = FilterStateStore(store_at, p, snapshot_every=5)
    for i, (q, f) in enumerate(queries):
        want = ref.check(q, feature=f)
        got = store.check("k", q, f"r{i}", f)
        assert (got["safe"], got["count"], got["matches"]) == (want.safe, want.count, want.matches)
        other = FilterStateStore(store_at, p, snapshot_every=5)       # empty cache: reads the stored state
        assert other._load("k").state.to_bytes() == ref.to_bytes()
        other.close()
    assert ref.blocked and 0 < ref.features().shape[0] < len(queries)
    with pytest.raises(FilterInputError, match="embedding"):
        store.check("new", queries[0][0])
    assert store.get("new") is None
    store.close()


# ----------------------------------------------------------------------------- operator features, live

def test_json_garbage_over_http_never_answers_5xx(serve_app):
    from test_serve_fuzz import garbage_bodies
    bodies = garbage_bodies(150, seed=7)
    statuses = []
    c = ServeClient(serve_app.url, "fuzzer")
    for b in bodies:
        r = c.request("POST", "/predict", b, {"Content-Type": "application/json"})
        statuses.append(r.status)
        assert r.status < 500, (b[:80], r.status, r.body)
        if r.status >= 400:
            assert isinstance(r.body.get("error"), str), r.body
    assert sum(400 <= s < 500 for s in statuses) >= 140


def test_blocked_client_is_refused_before_the_model_and_healthz_is_cached(serve_app, serve_artifacts):
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    ivy = serve_app.client("ivy")
    assert [ivy.predict(x[40]).status for _ in range(4)] == [200, 200, 200, 403]
    before = serve_app.admin("GET", "/admin/info").body["replica"]
    assert [ivy.predict(img).status for img in x[41:46]] == [403] * 5
    after = serve_app.admin("GET", "/admin/info").body["replica"]
    assert after["forwarded"] == before["forwarded"]          # no model forward for a blocked client
    assert after["outcomes"]["blocked_cached"] - before["outcomes"].get("blocked_cached", 0) == 5
    assert state(serve_app, "ivy")["n_queries"] == 9          # the refused queries are still counted
    # /healthz answers from the store health refreshed in the background, not a ping per call
    def pings():
        return serve_app.admin("GET", "/admin/info").body["health"]["shards"][0]["pings"]
    p0 = pings()
    t0 = __import__("time").time()
    hs = [serve_app.client().healthz() for _ in range(40)]
    elapsed = __import__("time").time() - t0
    assert all(h.status == 200 and h.body["status"] == "ok" for h in hs)
    __import__("time").sleep(serve_app.cfg.serve.health_interval_s * 1.5)   # one more refresh
    p1 = pings()
    interval = serve_app.cfg.serve.health_interval_s
    assert 1 <= p1 - p0 <= elapsed / interval + 4, (p1 - p0, elapsed)   # far fewer than 40


def test_admin_why_list_block_purge_events_and_auth_failures(serve_app, serve_artifacts):
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    jon = serve_app.client("jon")
    assert [jon.predict(x[46]).status for _ in range(4)] == [200, 200, 200, 403]
    why = serve_app.admin("GET", "/admin/clients/jon/why").body
    assert [e["kind"] for e in why["events"]] == ["block"]
    last = why["evidence"][-1]
    assert last["blocked"] and [c["query"] for c in last["compared"]] == [1, 2, 3]
    assert all(c["matched"] and c["ssim"] > why["thresholds"]["t_ssim"] for c in last["compared"])
    assert serve_app.admin("POST", "/admin/clients/jon/unblock").status == 200
    assert jon.predict(x[47]).status == 200                     # the replica dropped it from its blocked set
    why2 = serve_app.admin("GET", "/admin/clients/jon/why").body
    assert why2["evidence"] == why["evidence"] and [e["kind"] for e in why2["events"]] == ["block", "unblock"]
    # manual block, with a reason; then purge
    kim = serve_app.client("kim")
    assert kim.predict(x[48]).status == 200
    r = serve_app.admin("POST", "/admin/clients/kim/block?reason=abuse%20report")
    assert r.status == 200 and r.body["blocked"] and r.body["changed"]
    assert kim.predict(x[49]).status == 403
    assert serve_app.admin("GET", "/admin/clients/kim/why").body["events"][-1]["reason"] == "abuse report"
    # paged list
    ids, after = [], ""
    while True:
        page = serve_app.admin("GET", f"/admin/clients?limit=3&after={after}").body
        ids += [c["client_id"] for c in page["clients"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert ids == sorted(ids) and {"jon", "kim"} <= set(ids)
    blocked = serve_app.admin("GET", "/admin/clients?blocked=true&limit=1000").body["clients"]
    assert "kim" in {c["client_id"] for c in blocked} and "jon" not in {c["client_id"] for c in blocked}
    r = serve_app.admin("POST", "/admin/clients/kim/purge")
    assert r.status == 200 and r.body["purged"] and r.body["was_blocked"]
    assert serve_app.admin("GET", "/admin/clients/kim").status == 404
    assert kim.predict(np.random.default_rng(5).random((1, 32, 32)).astype(np.float32)).status == 200                     # a purged client starts over
    r = serve_app.admin("POST", "/admin/purge")                  # TTL sweep (30 days: nobody)
    assert r.status == 200 and r.body["purged"] == 0
    kinds = [(e["kind"], e["client_id"]) for e in serve_app.admin("GET", "/admin/events?limit=10000").body["events"]]
    for want in [("block", "jon"), ("unblock", "jon"), ("manual_block", "kim"), ("purge", "kim")]:
        assert want in kinds
    assert serve_app.admin("GET", "/admin/quarantine").body == {"quarantined": []}
    for path in ("/admin/clients/jon/why", "/admin/events", "/admin/clients/jon/block"):
        method = "POST" if path.endswith("block") else "GET"
        assert ServeClient(serve_app.url).request(method, path, headers={"X-Admin-Token": "w" * 40}).status == 401
    outcomes = serve_app.admin("GET", "/admin/info").body["replica"]["outcomes"]
    assert outcomes["answered"] >= 3 and outcomes["blocked"] >= 1 and outcomes["blocked_cached"] >= 1


def test_short_admin_token_is_refused_at_start_up(serve_artifacts):
    import serve as raymia_serve
    with pytest.raises(ConfigError, match="at least 32"):
        raymia_serve.build_app(serve_artifacts[0], "smoke", admin_token="short-token")


@pytest.mark.parametrize("backend, state_in", [("postgresql", "replica"), ("sqlite", "actors")])
def test_two_replicas_count_concurrent_requests_and_blocks_survive_shard_and_app_kills(
        serve_app, serve_artifacts, ray_session, backend, state_in, request, tmp_path):
    """The app with two replicas, as a cluster runs it (the state in the replicas, on the
    suite's PostgreSQL server via ``serve.state_url``) and as one node can (the state in
    shard actors, on a SQLite file): 32 concurrent identical queries are served exactly three
    times, and the block survives the death of what holds the state (a replica; the shard
    actor, killed for good and crashed), the whole app's deletion (its shard actors go
    with it) and redeployment (read back from the store), and a kill -9 of every process of
    the app at once."""
    ray = ray_session
    from ray import serve as rserve
    from conftest import SERVE_APP
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    cfg = config_from_dict(serve_app.cfg.to_dict())
    if backend == "postgresql":
        store_at = cfg.serve.state_url = request.getfixturevalue("pg_url")
    else:
        store_at = cfg.serve.state_path = str(tmp_path / "state.sqlite")
    cfg.serve.replicas, cfg.serve.replica_cpus, cfg.serve.state_in = 2, 0.5, state_in
    old = serve_app.cfg
    serve_app.deploy(cfg)
    try:
        info = serve_app.admin("GET", "/admin/info").body
        assert info["plan"]["state_path"] == str(store_at)    # no password in it: nothing to redact
        with ThreadPoolExecutor(32) as pool:
            b = list(pool.map(lambda im: serve_app.client("burst-2r").predict(im).status, [x[12]] * 32))
        assert sorted(b) == [200] * 3 + [403] * 29
        # queries refused by a replica's cached block reach the store at its next flush
        st = settled(serve_app, "burst-2r", 32)
        assert st["n_queries"] == 32 and st["blocked"]
        if state_in == "actors":
            name = list(dict(serve_app.shard_actors()))[shard_of("burst-2r", cfg.serve.shards)]
            pid = ray.get(dict(serve_app.shard_actors())[name].ping.remote())["pid"]
            ray.kill(dict(serve_app.shard_actors())[name])   # for good: a replica re-creates it from the store
            assert serve_app.client("burst-2r").predict(x[13]).status == 403
            assert state(serve_app, "burst-2r")["blocked"]   # the re-created actor read the block back
            assert ray.get(dict(serve_app.shard_actors())[name].ping.remote())["pid"] != pid
            ray.kill(dict(serve_app.shard_actors())[name], no_restart=False)   # a crash: Ray restarts it
        else:
            assert serve_app.shard_actors() == []            # no actor hop: the replicas hold the store
            replicas = serve_app.replica_actors()
            assert len(replicas) == 2
            ray.kill(replicas[0][1])                         # kill -9 of a replica: Serve starts a new one
            serve_app.wait_healthy()
        assert serve_app.client("burst-2r").predict(x[14]).status == 403
        assert state(serve_app, "burst-2r")["blocked"]
        assert serve_app.client("other-2r").predict(x[16]).status == 200
        n = 34 if state_in == "actors" else 33
        assert settled(serve_app, "burst-2r", n)["n_queries"] == n   # flushed before the app goes
        rserve.delete(SERVE_APP)                             # the whole app, then a new one on the same store
        deadline = time.time() + 60
        while serve_app.shard_actors() and time.time() < deadline:
            time.sleep(0.5)
        assert serve_app.shard_actors() == []                # not detached: they went with the app
        serve_app.deploy(cfg)
        assert serve_app.client("burst-2r").predict(x[15]).status == 403
        st = state(serve_app, "burst-2r")
        assert st["blocked"] and st["n_queries"] == n + 1
        assert serve_app.client("other-2r").predict(x[17]).status == 200
        # kill -9 of the whole app: SIGKILL to every replica and shard actor at once (no
        # flush, no shutdown hook); Serve starts new replicas, which read the block back
        pids = [int(v) for v in subprocess.run(["pgrep", "-f", f"ServeReplica:{SERVE_APP}:"], capture_output=True,
                                               text=True).stdout.split()]
        pids += [ray.get(h.ping.remote())["pid"] for _, h in serve_app.shard_actors()]
        assert len(pids) == 2 + (cfg.serve.shards if state_in == "actors" else 0), pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        serve_app.wait_healthy(120)
        assert serve_app.client("burst-2r").predict(x[18]).status == 403
        assert state(serve_app, "burst-2r")["blocked"]
        assert serve_app.client("other-2r").predict(x[19]).status == 200
    finally:
        serve_app.deploy(old)


def test_robust_filter_in_key_mode_blocks_dither_and_nobody_can_block_another_client(serve_app, serve_artifacts,
                                                                                       tmp_path):
    """``filter.kind=robust`` with API keys (the production setting): the one-grey-level
    dither that Algorithm 2 never matches (shown first on the default raha app) is refused
    from the query that makes L strikes or has l_near near-duplicates before it; mallory naming
    alice in X-Client-Id changes nothing for alice (identity comes from the key); alice's
    distinct photos pass."""
    from raymia.serving.client import ServeClient
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    keys = tmp_path / "keys.yaml"
    keys.write_text("key-of-alice-123: alice\nkey-of-mallory-99: mallory\n")
    original = serve_app.cfg
    cfg = config_from_dict(original.to_dict())
    cfg.serve.api_keys_file, cfg.filter.kind = str(keys), "robust"
    cfg.serve.state_path = str(tmp_path / "robust_state.sqlite")
    L = cfg.robust_filter.l_sp
    ok = min(L, cfg.robust_filter.l_near or L)                    # every dither query is near all earlier ones
    face = np.round(x[15] * 255) / 255
    dither = [np.clip(face + (i % 11) / 255, 0, 1).astype(np.float32) for i in range(L + 6)]
    raha = serve_app.client("dither-under-raha")                   # the default app: Algorithm 2
    assert [raha.predict(q).status for q in dither] == [200] * (L + 6)   # never matches a 1-level shift
    try:
        serve_app.deploy(cfg)
        assert serve_app.admin("GET", "/admin/info").body["filter_params"]["kind"] == "robust"
        mallory = ServeClient(serve_app.url, "alice", "key-of-mallory-99")      # claims to be alice
        statuses = [mallory.predict(q).status for q in dither[:L + 3]]
        assert statuses == [200] * ok + [403] * (L + 3 - ok)
        assert state(serve_app, "mallory")["blocked"] and state(serve_app, "alice") is None
        alice = serve_app.client(api_key="key-of-alice-123")
        assert [alice.predict(img).status for img in x[0:30:3]] == [200] * 10
        assert not state(serve_app, "alice")["blocked"]
    finally:
        serve_app.deploy(original)


def test_cross_client_window_in_serve_refuses_fresh_ids_without_blocking_them(serve_app, serve_artifacts, tmp_path):
    """``robust_filter.cross_client`` with self-declared ids: noisy copies of one face, each
    under a fresh id, are answered until ``cross_k`` other ids sent near ones, then refused
    (403 similar_to_other_clients); none of those ids is blocked; one file sent by many ids
    (a popular image) is always answered."""
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    original = serve_app.cfg
    cfg = config_from_dict(original.to_dict())
    cfg.filter.kind, cfg.robust_filter.cross_client, cfg.robust_filter.cross_k = "robust", True, 3
    cfg.serve.state_path = str(tmp_path / "cross_state.sqlite")
    rng = np.random.default_rng(5)
    try:
        serve_app.deploy(cfg)
        out = []
        for i in range(10):
            noisy = np.clip(x[16] + rng.normal(0, 0.02, x[16].shape), 0, 1).astype(np.float32)
            out.append(serve_app.client(f"sybil-{i}").predict(noisy))
        assert [r.status for r in out] == [200] * 3 + [403] * 7
        assert all(r.body["error"] == "similar_to_other_clients" for r in out[3:])
        assert not any(state(serve_app, f"sybil-{i}")["blocked"] for i in range(10))
        popular = (np.round(x[17] * 255) / 255).astype(np.float32)
        assert [serve_app.client(f"fan-{i}").predict(popular).status for i in range(8)] == [200] * 8
    finally:
        serve_app.deploy(original)


def test_feature_rule_in_serve_blocks_the_evasive_attacker_the_fingerprint_lets_through(serve_app, serve_artifacts,
                                                                                          tmp_path):
    """``filter.kind=robust`` with the feature rule (``robust_filter.feat_k``): a stream of
    one face disguised past the fingerprint (the adaptive attacker, who knows it) gets every
    query answered by the fingerprint alone (library gate), and over HTTP the app refuses
    it from the query at which the library detector with R_T's embedding blocks, exactly."""
    from raymia.defenses.filter.robust import RobustParams
    from raymia.filter_sim import redteam as R
    from raymia.kinds import artifact_dir
    from raymia.models import victim_embedding
    from raymia.training import load_classifier
    _, bundle = serve_artifacts
    x, _ = faces(bundle)
    original = serve_app.cfg
    cfg = config_from_dict(original.to_dict())
    cfg.filter.kind, cfg.robust_filter.feat_k, cfg.robust_filter.feat_sim = "robust", 4, 0.9
    cfg.serve.state_path = str(tmp_path / "feature_state.sqlite")
    fingerprint = RobustParams.from_config(cfg.robust_filter, feat_k=0)
    queries, _, _ = R.adaptive_queries(x[18], fingerprint, 16, np.random.default_rng(2), candidates=8)
    rt = load_classifier(artifact_dir(cfg, "target"))[0].eval()
    embed = lambda a: victim_embedding(rt, torch.from_numpy(np.asarray(a, np.float32))).numpy()
    stream = [("a", q, True) for q in queries]
    assert R.run_stream(R.Gate(fingerprint), stream).answered_attack == 16
    k = R.run_stream(R.Gate(RobustParams.from_config(cfg.robust_filter), embed=embed), stream).answered_attack
    assert cfg.robust_filter.feat_k <= k < 16
    try:
        serve_app.deploy(cfg)
        assert serve_app.admin("GET", "/admin/info").body["filter_params"]["feat_k"] == 4
        c = serve_app.client("evasive")
        assert [c.predict(q).status for q in queries] == [200] * k + [403] * (16 - k)
        assert state(serve_app, "evasive")["blocked"]
        alice = serve_app.client("alice-photos")             # distinct photos of several people pass
        assert [alice.predict(img).status for img in x[0:30:3]] == [200] * 10
    finally:
        serve_app.deploy(original)
