"""Query-based attacks through an oracle: the black-box NES attack and the label-only
boundary-repulsion attack (raymia/attacks/blackbox.py, label_only.py, oracle.py) on the
smoke models -- success against the undefended model, exact query accounting and budgets,
batched rows = separate runs, and an HTTP oracle that stops on a 403."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from raymia.attacks.blackbox import blackbox_mia
from raymia.attacks.label_only import label_only_mia
from raymia.attacks.oracle import CountingOracle, HTTPOracle, InProcessOracle, target_scores


@pytest.fixture(scope="module")
def qmodels(smoke_attack_models):
    """R_T, R_E (with the judges) and the attacker's F of the smoke preset, trained under the
    suite's shared smoke results root (reused by the job tests), and a released model
    R' = α R_T + (1 - α) R_dmy with α per row, where R_dmy is an untrained network of R_T's
    architecture (the counting and batching tests need a two-branch model, not a trained dummy)."""
    from raymia.defenses.dummy import combined_model
    from raymia.evaluation import make_scorer
    from raymia.models import ProbModel, build_classifier, freeze
    m = smoke_attack_models()
    cfg, bundle, rt, F = m["cfg"], m["bundle"], freeze(m["rt"]), freeze(m["F"])
    torch.manual_seed(0)
    dm = freeze(build_classifier(cfg.target, 1, cfg.data.image_size, bundle.n_private))
    scorer = make_scorer(cfg, bundle, "cpu")
    return {"cfg": cfg, "bundle": bundle, "rt": ProbModel(rt).eval(), "F": F,
            "combined": combined_model(cfg, rt, dm), "scorer": scorer}


def _rows(n_private, restarts):
    targets = [t for r in range(restarts) for t in range(n_private)]
    seeds = [7000 + 31 * r + t for r in range(restarts) for t in range(n_private)]
    return targets, seeds


def _success(scorer, images, targets):
    s = scorer.score(images, targets)
    return {k: float(np.mean(v)) for k, v in s.items() if k.endswith("top5")}


def test_blackbox_beats_chance_on_undefended_model(qmodels):
    """NES (query_attack defaults: 10 antithetic pairs, σ 0.1, Adam 0.05, 2000 queries per
    row) against R_T alone, 5 targets x 2 restarts: R_E top-5 above chance (5/20 = 25%);
    measured 50% here (60% on other seeds, docs/attacks.md).  The external (dlib) judge is
    printed, not asserted: it measured 0% here, 20% on other seeds, vs 30-40% for random F
    samples -- no better than chance."""
    from raymia.config import Config
    qa = Config().query_attack
    m = qmodels
    targets, seeds = _rows(m["bundle"].n_private, 2)
    oracle = InProcessOracle(m["rt"], len(targets), m["bundle"].n_private)
    res = blackbox_mia(oracle, m["F"], targets, seeds, budget=qa.budget, pairs=qa.nes_pairs, sigma=qa.nes_sigma,
                       lr=qa.nes_lr, bound=m["cfg"].attack.latent_bound)
    assert (res.queries <= qa.budget).all() and (res.queries == oracle.answered).all()
    s = _success(m["scorer"], res.images, targets)
    print("black-box", s, "queries", res.queries.mean())
    assert s["success_top5"] >= 0.35, s      # >= 4 of 10 rows (measured: 5 of 10; chance 2.5)


def test_label_only_beats_chance_on_undefended_model(qmodels):
    """Boundary repulsion from a start labelled the target (labels only) at its default
    budget (3000 queries per row) against R_T alone, 5 targets x 2 restarts: R_E top-5 above
    chance (25%); measured 40% here (50% over 20 rows on other seeds).  The external judge is
    printed, not asserted: 20% here, 25% on other seeds -- chance level."""
    from raymia.config import Config
    qa = Config().query_attack
    m = qmodels
    targets, seeds = _rows(m["bundle"].n_private, 2)
    oracle = InProcessOracle(m["rt"], len(targets), m["bundle"].n_private, labels_only=True)
    res = label_only_mia(oracle, m["F"], targets, seeds, **label_kwargs(qa), bound=m["cfg"].attack.latent_bound)
    assert (res.queries <= qa.label_budget).all()
    s = _success(m["scorer"], res.images, targets)
    print("label-only", s, "queries", res.queries.mean(), "found", res.extra["found"].mean())
    assert s["success_top5"] >= 0.35, s      # >= 4 of 10 rows (measured: 4 of 10; chance 2.5)
    # the start of each found row: labelled the target, found at query init_queries
    found = res.extra["found"]
    assert found.any()
    from raymia.attacks.blackbox import render
    with torch.no_grad():
        lab = m["rt"](render(m["F"], res.extra["start_latent"], "cpu")).argmax(1).numpy()
    assert (lab[found] == np.asarray(targets)[found]).all()
    iq = np.asarray(res.extra["init_queries"])
    assert ((iq >= 1) & (iq <= res.queries))[found].all()


def label_kwargs(qa):
    return {"budget": qa.label_budget, "points": qa.label_points, "r0": qa.label_r0, "growth": qa.label_growth,
            "r_max": qa.label_r_max, "step": qa.label_step, "init_batch": qa.label_init_batch,
            "init_budget": qa.label_init_budget}


def test_query_counts_are_exact_and_budgets_hold(qmodels):
    m = qmodels
    n = m["bundle"].n_private
    budgets = [37, 100, 2, 1, 250]
    targets, seeds = list(range(n)), [11, 12, 13, 14, 15]
    alphas = [1.0, 0.5, 0.7, 0.25, 0.0]
    for labels_only in (False, True):
        inner = InProcessOracle(m["combined"], n, n, alphas=alphas, labels_only=labels_only, top_k=3)
        counter = CountingOracle(inner)
        if labels_only:
            res = label_only_mia(counter, m["F"], targets, seeds, budget=budgets, points=8, init_batch=8,
                                 init_budget=40)
        else:
            res = blackbox_mia(counter, m["F"], targets, seeds, budget=budgets, pairs=6, sigma=0.1)
        for got in (res.queries, res.sent, inner.answered, counter.answered, counter.sent):
            assert got.tolist() == res.queries.tolist()
        assert (res.queries <= np.asarray(budgets)).all()
        assert counter.images_seen == res.queries.sum()
        assert res.oracle_calls == counter.calls
        assert not res.blocked.any()
        if not labels_only:   # a row runs until fewer than 2 queries are left
            assert (np.asarray(budgets) - res.queries < 2).all()
            assert res.queries.tolist() == [36, 100, 2, 0, 250]


def test_blackbox_batched_rows_equal_separate_runs(qmodels):
    m = qmodels
    targets, seeds, alphas = [0, 3, 1, 4], [101, 102, 103, 104], [1.0, 0.5, 0.7, 0.25]
    kw = dict(budget=[400, 240, 400, 320], pairs=8, sigma=0.1, lr=0.05)
    o = InProcessOracle(m["combined"], 4, m["bundle"].n_private, alphas=alphas)
    batched = blackbox_mia(o, m["F"], targets, seeds, **kw)
    assert o.calls == 25                   # one oracle call (one forward) per iteration for all rows
    for r in range(4):
        o1 = InProcessOracle(m["combined"], 1, m["bundle"].n_private, alphas=[alphas[r]])
        one = blackbox_mia(o1, m["F"], [targets[r]], [seeds[r]], **{**kw, "budget": kw["budget"][r]})
        assert one.queries[0] == batched.queries[r]
        torch.testing.assert_close(one.latents[0], batched.latents[r], atol=2e-3, rtol=0)
    # one query per forward (the benchmark's baseline) follows the same trajectory too
    o = InProcessOracle(m["combined"], 4, m["bundle"].n_private, alphas=alphas)
    serial = blackbox_mia(o, m["F"], targets, seeds, **{**kw, "budget": [48, 48, 48, 48]}, chunk=1)
    o = InProcessOracle(m["combined"], 4, m["bundle"].n_private, alphas=alphas)
    batched = blackbox_mia(o, m["F"], targets, seeds, **{**kw, "budget": [48, 48, 48, 48]})
    torch.testing.assert_close(serial.latents, batched.latents, atol=2e-3, rtol=0)
    # ... and in pieces that split rows across oracle calls (query_attack.forward_batch)
    o = InProcessOracle(m["combined"], 4, m["bundle"].n_private, alphas=alphas)
    pieces = blackbox_mia(o, m["F"], targets, seeds, **{**kw, "budget": [48, 48, 48, 48]}, chunk=5)
    assert pieces.queries.tolist() == batched.queries.tolist() and o.calls == 3 * 13   # 3 iterations of 64 queries
    torch.testing.assert_close(pieces.latents, batched.latents, atol=2e-3, rtol=0)


def test_target_scores_reads_top_k_answers():
    p = torch.tensor([[0.6, 0.3, float("nan"), float("nan"), float("nan")]])
    assert target_scores(p, torch.tensor([1])).item() == pytest.approx(0.3)
    assert target_scores(p, torch.tensor([3])).item() == pytest.approx(0.1 / 3)


# ----------------------------------------------------------------------------- HTTP

class _FilterApp(BaseHTTPRequestHandler):
    """``POST /predict`` as the Serve app answers it (its request parser and reply format,
    Algorithm 2 per X-Client-Id with the config's filter, 403 once blocked), over real HTTP."""
    model = spec = params = None
    states: dict = {}
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        from raymia.defenses.filter import ClientFilterState
        from raymia.serving.http import RequestError, parse_predict, prediction
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            img, opts = parse_predict(self.headers.get("Content-Type"), body, self.spec)
            cid = self.headers.get("X-Client-Id")
            with self.lock:
                st = self.states.setdefault(cid, ClientFilterState(self.params))
                if not st.check(img).safe:
                    raise RequestError(403, "blocked", "client blocked")
            with torch.no_grad():
                p = self.model(torch.from_numpy(img)[None])[0].numpy()
            status, doc = 200, prediction(p, opts["top_k"], opts["labels_only"])
        except RequestError as e:
            status, doc = e.status, e.body()
        raw = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(scope="module")
def filter_http(qmodels):
    from raymia.defenses.filter import FilterParams
    from raymia.serving.http import InputSpec
    m = qmodels
    n = m["bundle"].n_private
    handler = type("App", (_FilterApp,), {"model": m["rt"], "spec": InputSpec(1, 32, 32, n, n),
                                          "params": FilterParams.from_config(m["cfg"].filter), "states": {}})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def test_http_oracle_stops_on_403_and_records_it(qmodels, filter_http):
    """Row 0 perturbs its latent by σ = 1e-4 (near-identical antithetic queries: the filter,
    Table 1 config 3, blocks it at its L_sp-th match); row 1 by σ = 0.5 is never blocked
    within its budget.  The block is recorded with the number of the refused query, the
    answered queries stop there and the row keeps its latent of that moment."""
    m = qmodels
    url, app = filter_http
    n = m["bundle"].n_private
    tiny = HTTPOracle(n, url=url, client_ids=["q-tiny"], top_k=n)
    res = blackbox_mia(tiny, m["F"], [2], [5], budget=200, pairs=4, sigma=1e-4)
    assert res.blocked[0] and tiny.blocked_at[0] == res.blocked_at[0] == res.queries[0] + 1 == res.sent[0]
    assert res.queries[0] < 200 and tiny.answered[0] == res.queries[0]
    assert tiny.replies_403[0]["error"] == "blocked"
    assert app.states["q-tiny"].blocked and app.states["q-tiny"].n_queries == res.sent[0]
    before = res.latents[0].clone()
    again = tiny.query(res.images, torch.tensor([0]))             # a blocked row sends nothing more
    assert not again.answered.any() and tiny.sent[0] == res.sent[0]
    torch.testing.assert_close(res.latents[0], before)

    wide = HTTPOracle(n, url=url, client_ids=["q-wide-a", "q-wide-b"], threads=2)
    counter = CountingOracle(wide)
    res = blackbox_mia(counter, m["F"], [0, 1], [6, 7], budget=[64, 40], pairs=4, sigma=0.5)
    assert not res.blocked.any() and res.queries.tolist() == [64, 40] == counter.answered.tolist()
    # HTTP answers equal the in-process model's (JSON carries exact float32 values)
    local = InProcessOracle(m["rt"], 2, n)
    x = res.images
    a, b = wide.query(x, [0, 1]), local.query(x, [0, 1])
    torch.testing.assert_close(a.probs, b.probs, atol=1e-6, rtol=0)

    lab = HTTPOracle(n, url=url, client_ids=["q-labels"], labels_only=True)
    r = label_only_mia(lab, m["F"], [1], [8], budget=60, points=8, init_batch=8, init_budget=24)
    assert r.queries[0] + int(r.blocked[0]) == lab.sent[0] and r.queries[0] <= 60
