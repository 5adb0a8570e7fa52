"""The robust detector (raymia/defenses/filter/robust.py) and the red-team tools
(raymia/filter_sim/redteam.py) on real ORL faces: fingerprint invariances, blocking the
near-duplicate strategies that walk around Algorithm 2, benign photos passing, exact
persistence, the cross-client window, and an attack oracle behind a gate."""
import numpy as np
import pytest
import torch

from raymia.defenses.filter import FilterInputError, FilterParams
from raymia.defenses.filter.robust import (CrossClientWindow, Fingerprinter, RobustClientState, RobustParams,
                                           hamming_min, params_from_dict)
from raymia.filter_sim import redteam as R


@pytest.fixture(scope="module")
def faces(orl_smoke):
    _, b = orl_smoke
    x = torch.cat([b.private_test.x, b.eval_test.x]).numpy()
    y = np.concatenate([b.private_test.y.numpy(), 100 + b.eval_test.y.numpy()])
    return x, y, b.aux.x.numpy()


def dist(p, a, b):
    f = Fingerprinter(p)
    return int(hamming_min(f.variants(b), f.one(a)[None])[0])


def test_fingerprint_ignores_dither_gain_small_shifts_and_separates_people(faces):
    x, y, _ = faces
    p = RobustParams()
    rng = np.random.default_rng(0)
    for face in x[:20]:
        assert dist(p, face, np.clip(face + 7 / 255, 0, 1)) == 0                 # one grey-level dither
        assert dist(p, face, R.photometric(face, 1.15, -0.05)) == 0             # gain and bias
        assert dist(p, face, R.shift(face, 2, -1)) == 0                          # inside the shift search
        assert dist(p, face, R.jpeg(face, 60)) <= p.t_bits
    noisy = [dist(p, f, np.clip(f + rng.normal(0, 0.03, f.shape), 0, 1).astype(np.float32)) for f in x[:40]]
    assert np.mean(np.array(noisy) <= p.t_bits) >= 0.9
    n = len(x)
    other = [dist(p, x[i], x[j]) for i in range(0, n // 2, 2) for j in range(n // 2, n, 5) if y[i] != y[j]]
    assert len(other) > 100
    assert np.mean(np.array(other) <= p.t_bits) < 0.02, np.mean(other)      # different people: rarely near


def test_near_duplicates_that_walk_around_algorithm2_are_blocked(faces):
    x, _, aux = faces
    face = x[0]
    raha, robust = FilterParams(), RobustParams()
    for name in ("dither", "photometric", "noise_0.03", "mixed"):
        make = R.NEAR_DUPLICATES[name][1]
        for params, limit in ((raha, None), (robust, robust.l_sp + 4)):
            g = R.Gate(params)
            res = R.run_stream(g, R.strategy_queries(face, aux, make, 40, 0, False, np.random.default_rng(1)))
            if params is raha and name in ("dither", "photometric", "noise_0.03"):
                assert res.answered_attack == 40, (name, res)      # Algorithm 2 never matches them
            if limit is not None:
                assert 0 < res.first_refused <= limit, (name, res)
    # a decoy after every attack query does not reset anything: still blocked after L strikes
    g = R.Gate(robust)
    res = R.run_stream(g, R.strategy_queries(face, aux, R.NEAR_DUPLICATES["dither"][1], 40, 1, False,
                                             np.random.default_rng(2)))
    assert res.first_refused == robust.l_sp + 1 and res.total_queries_at_block == 2 * robust.l_sp + 1


def test_cluster_rule_blocks_slow_and_decoyed_streams_that_the_strike_window_forgets(faces):
    """A dither sent once every 21 queries (20 distinct decoys between): with the strike
    window alone (30 queries) the strikes expire and the client is never blocked; with
    ``l_near`` the (l_near + 1)-th copy finds l_near near-duplicates in the long memory."""
    x, _, aux = faces
    make = R.NEAR_DUPLICATES["dither"][1]
    stream = R.strategy_queries(x[0], aux, make, 12, 20, False, np.random.default_rng(4))
    windowed = RobustParams(t_bits=12, l_sp=6, window=30)
    assert R.run_stream(R.Gate(windowed), stream).answered_attack == 12
    clustered = RobustParams(t_bits=12, l_sp=6, window=30, l_near=4)
    res = R.run_stream(R.Gate(clustered), stream)
    assert res.first_refused == 5 and res.answered_attack == 4
    st = RobustClientState(clustered)                            # the rule survives a snapshot
    for q in (x[1], x[2], x[1]):
        st.check(q)
    back = RobustClientState.from_bytes(st.to_bytes())
    assert back.params.l_near == 4 and back.to_bytes() == st.to_bytes()
    with pytest.raises(ValueError, match="l_near"):
        RobustParams(l_near=-1)


def test_distinct_people_and_a_few_resends_pass(faces):
    x, y, _ = faces
    st = RobustClientState(RobustParams())
    firsts = [x[np.flatnonzero(y == c)[0]] for c in np.unique(y)]
    assert all(st.check(f).safe for f in firsts)                 # 40 people, one photo each
    assert st.count <= 1
    st2 = RobustClientState(RobustParams())
    for _ in range(3):                                           # the same photo sent three times
        assert st2.check(firsts[0]).safe
    assert st2.count == 2 and not st2.blocked


def test_state_round_trip_is_exact_and_garbage_is_refused(faces):
    x, _, _ = faces
    p = RobustParams(memory=8)
    st = RobustClientState(p)
    for i in range(11):                                          # wraps the memory ring
        st.check(x[i % 4])
    b = st.to_bytes()
    back = RobustClientState.from_bytes(b)
    assert back.to_bytes() == b and back.count == st.count and back.n_queries == 11
    assert np.array_equal(back.memory(), st.memory())
    assert back.check(x[2]).safe == st.check(x[2]).safe
    bad = bytearray(b)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(FilterInputError, match="checksum"):
        RobustClientState.from_bytes(bytes(bad))
    before = st.to_bytes()
    for q in (np.full((1, 32, 32), np.nan, np.float32), np.zeros((1, 16, 16), np.float32), "x"):
        with pytest.raises(FilterInputError):
            st.check(q)
    assert st.to_bytes() == before
    assert params_from_dict(p.to_dict()) == p and params_from_dict(FilterParams().to_dict()) == FilterParams()
    with pytest.raises(ValueError, match="dct"):
        RobustParams(dct=1)


def test_cross_client_window_stops_fresh_ids_but_not_copies_of_one_file(faces):
    x, _, aux = faces
    p = RobustParams()
    g = R.Gate(p, CrossClientWindow(p, size=512, k=4))
    res = R.run_stream(g, R.strategy_queries(x[0], aux, R.NEAR_DUPLICATES["noise_0.03"][1], 40, 0, True,
                                             np.random.default_rng(3)))
    assert res.answered_attack <= 8, res                         # k others, then refused
    assert not any(g.blocked(f"attacker-{i}") for i in range(40))   # refused, nobody blocked
    g2 = R.Gate(p, CrossClientWindow(p, size=512, k=4))
    popular = R.to_u8(x[5])
    assert all(g2.ask(f"fan-{i}", popular) for i in range(30))  # one popular file, thirty users


def test_gated_oracle_ends_a_row_at_the_first_refusal(faces):
    from raymia.attacks.oracle import InProcessOracle
    x, _, _ = faces

    class Const(torch.nn.Module):
        def forward(self, t):
            return torch.full((t.shape[0], 3), 1 / 3)
    inner = InProcessOracle(Const(), 2, 3)
    p = RobustParams()
    o = R.GatedOracle(inner, R.Gate(p), ["a", "b"])
    same = torch.from_numpy(np.stack([x[0]] * 10))
    distinct = torch.from_numpy(np.stack([x[i * 3] for i in range(10)]))
    rep = o.query(torch.cat([same, distinct]), [0] * 10 + [1] * 10)
    ok = rep.answered.numpy()
    assert ok[:p.l_sp].all() and not ok[p.l_sp:10].any()       # the (L+1)-th copy is the L-th strike
    assert o.blocked_at[0] == p.l_sp + 1 and o.answered[0] == p.l_sp and o.sent[0] == p.l_sp + 1
    assert ok[10:].all() and o.answered[1] == 10 and not o.blocked[1]
    assert (inner.answered == o.answered).all()


def test_evasive_oracle_disguises_queries_past_the_robust_detector(faces):
    """The adaptive attacker in front of a gated oracle: the same face asked 12 times is
    blocked at once through the plain gate, but the evasive attacker's disguised copies
    (each farther than t_bits from all it sent before) get more answers, at a cost in
    fidelity it records (SSIM of what it sent to what it meant); counters mirror the gate's."""
    from raymia.attacks.oracle import InProcessOracle

    class Const(torch.nn.Module):
        def forward(self, t):
            return torch.full((t.shape[0], 3), 1 / 3)
    x, _, _ = faces
    p = RobustParams(t_bits=12, l_sp=6, window=30, l_near=4)
    same = torch.from_numpy(np.stack([x[0]] * 12))
    plain = R.GatedOracle(InProcessOracle(Const(), 1, 3), R.Gate(p), ["a"])
    plain.query(same, [0] * 12)
    ev = R.EvasiveOracle(R.GatedOracle(InProcessOracle(Const(), 1, 3), R.Gate(p), ["a"]), p, seed=0)
    rep = ev.query(same, [0] * 12)
    assert plain.answered[0] == 4 and ev.answered[0] > plain.answered[0]
    assert int(rep.answered.sum()) == ev.answered[0] == ev.inner.answered[0]
    assert ev.sent[0] == ev.inner.sent[0] and ev.blocked_at[0] == ev.inner.blocked_at[0]
    assert len(ev.ssim[0]) == ev.sent[0] and 0 < np.mean(ev.ssim[0]) < 0.99


def test_red_team_pipeline_on_smoke(smoke_runs, tmp_path):
    """The red-team job end to end on the smoke preset (small grids, two attack rows): the
    calibration is chosen on one half and reported on the other, the robust detector stops
    the dither that Algorithm 2 lets through, and the query attacks run behind each gate with
    exact accounting."""
    import pandas as pd

    from raymia.config import load_config
    from raymia.pipelines import red_team
    cfg = load_config("smoke", [f"run.out_root={smoke_runs}", "red_team.benign_sessions=80", "red_team.attack_queries=12",
                                "red_team.faces=2", "red_team.t_bits_grid=[12,20]", "red_team.l_sp_grid=[6]",
                                "red_team.window_grid=[0,30]", "red_team.attack_rows=2", "red_team.attack_budget=120",
                                "red_team.adaptive_candidates=4", "red_team.feat_sim_grid=[0.95,0.995]",
                                "red_team.feat_k_grid=[12,24]"])
    from raymia.data import load_bundle
    from raymia.progress import quiet
    from raymia.training import train_artifact
    bundle = load_bundle(cfg.data)
    for kind in red_team.ATTACK_KINDS:            # in this process (cached under smoke_runs): the job starts no Ray
        train_artifact(cfg, kind, bundle, quiet)
    out = red_team.run(cfg, str(tmp_path / "rt"))
    for f in ("calibration.csv", "benign_fpr.csv", "strategies.csv", "adaptive.csv", "attacks.csv", "red_team.md",
              "robust_filter.json", "config.yaml", "run.json"):
        assert (out / f).exists(), f
    cal = pd.read_csv(out / "calibration.csv")
    first = cal[cal.stage == 1]
    assert len(first) == 4 and set(first.t_bits) == {12, 20} and (first.l_near == 0).all()
    second = cal[cal.stage == 2]                 # the cluster rule on the first stage's pick
    assert len(second) == 5 and second[["t_bits", "l_sp", "window"]].drop_duplicates().shape[0] == 1
    assert (second.fpr_blocked.diff().dropna() <= 0).all()       # a larger l_near never blocks more
    third = cal[cal.stage == 3]                  # the feature rule on top of the second stage's pick
    assert len(third) == 4 and third[["t_bits", "l_sp", "window", "l_near"]].drop_duplicates().shape[0] == 1
    for _, g in third.groupby("feat_sim"):       # more neighbours needed never blocks more
        assert (g.sort_values("feat_k").fpr_blocked.diff().dropna() <= 0).all()
    fpr = pd.read_csv(out / "benign_fpr.csv")
    assert list(fpr["filter"]) == ["raha", "robust", "robust+cross", red_team.FEATURE] and (fpr.sessions == 80).all()
    assert (fpr.fpr_blocked_lo <= fpr.fpr_blocked).all() and (fpr.fpr_blocked <= fpr.fpr_blocked_hi).all()
    st = pd.read_csv(out / "strategies.csv")
    plain = st[(st.strategy == "dither") & (st["stream"] == "plain")].set_index(["filter", "face"]).answered
    assert (plain["raha"] == 12).all() and (plain["robust"] <= 6).all()
    att = pd.read_csv(out / "attacks.csv")
    start = att[att.attack == "label-only: its start point"]
    att = att[att.attack != "label-only: its start point"]
    assert set(att["filter"]) == {"none", "raha", "robust", "robust+cross", red_team.FEATURE, red_team.EVASIVE,
                                  red_team.EVASIVE_FEATURE} and len(att) == 2 * 7 * 2
    evasive = att["filter"].isin([red_team.EVASIVE, red_team.EVASIVE_FEATURE])
    assert att[evasive].disguise_ssim.between(0, 1).all() and att[~evasive].disguise_ssim.isna().all()
    # the disguises that walk past the fingerprint keep R_T's view of the face: the feature
    # rule blocks every evasive row, earlier than the fingerprint alone lets it run
    ev = att[att["filter"] == red_team.EVASIVE].set_index(["attack", "row"])
    evf = att[att["filter"] == red_team.EVASIVE_FEATURE].set_index(["attack", "row"])
    assert (evf.blocked_at > 0).all() and (evf.answered < ev.answered).all()
    # the label-only start point: one row per attack row, only behind no filter, and it cost
    # queries no later than the attack's own (it is where the attack began)
    assert len(start) == 2 and set(start["filter"]) == {"none"}
    lo = att[(att.attack == "label-only") & (att["filter"] == "none")].set_index("row").answered
    assert (start.set_index("row").answered <= lo).all()
    assert (att.answered <= 120).all()
    free = att[att["filter"] == "none"]
    assert (free.blocked_at == 0).all()
    assert "success_top5" in att.columns


def coarse_embed(x):
    """A stand-in for R_T's embedding in these tests: the standardised 4 x 4 block means of
    the grey image (unit length), a view that small disguises barely move."""
    x = np.asarray(x, np.float64).mean(1)
    n, h, w = x.shape
    e = x.reshape(n, 4, h // 4, 4, w // 4).mean((2, 4)).reshape(n, -1)
    e = (e - e.mean(1, keepdims=True)) / (e.std(1, keepdims=True) + 1e-6)
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def test_feature_rule_blocks_at_feat_k_neighbours_needs_an_embedding_and_persists(faces):
    """Only the feature rule can block here (strikes never reach l_sp): noisy copies of one
    face are blocked at query feat_k + 1, photos of different people pass; a query without
    an embedding, or with one of another dimension, is refused and leaves the state as it
    was; the embeddings survive to_bytes/from_bytes and the restored state decides alike."""
    x, y, _ = faces
    p = RobustParams(t_bits=0, l_sp=1000, feat_k=3, feat_sim=0.95, feat_memory=16)
    rng = np.random.default_rng(1)
    copies = [np.clip(x[0] + rng.normal(0, 0.02, x[0].shape), 0, 1).astype(np.float32) for _ in range(8)]
    st = RobustClientState(p)
    verdicts = [st.check(q, feature=coarse_embed(q[None])[0]).safe for q in copies]
    assert verdicts == [True] * 3 + [False] * 5 and st.blocked
    people = [x[np.flatnonzero(y == c)[0]] for c in np.unique(y)[:12]]
    st = RobustClientState(p)
    assert all(st.check(q, feature=coarse_embed(q[None])[0]).safe for q in people)
    before = st.to_bytes()
    with pytest.raises(FilterInputError, match="embedding"):
        st.check(people[0])
    with pytest.raises(FilterInputError, match="embedding"):
        st.check(people[0], feature=np.ones(5))
    with pytest.raises(FilterInputError, match="embedding"):
        st.check(people[0], feature=np.full(16, np.nan))
    assert st.to_bytes() == before
    back = RobustClientState.from_bytes(before)
    assert np.array_equal(back.features(), st.features()) and back.features().shape == (12, 16)
    for q in copies:
        f = coarse_embed(q[None])[0]
        assert back.check(q, feature=f) == st.check(q, feature=f)
    raw = bytearray(before)
    raw[-3] ^= 0xFF                       # a flipped byte in the stored embeddings
    with pytest.raises(FilterInputError):
        RobustClientState.from_bytes(bytes(raw))
    with pytest.raises(ValueError, match="feat_sim"):
        RobustParams(feat_k=2, feat_sim=1.5)
    with pytest.raises(ValueError, match="embed"):
        R.Gate(p)


def test_feature_rule_blocks_the_evasive_attacker_the_fingerprint_misses(faces):
    """The adaptive attacker disguises each of 30 asks of one face past the fingerprint
    (it knows it); behind the fingerprint alone it gets all of them answered, behind the
    same detector with the feature rule it is blocked within feat_k + 4 queries, because
    its disguises must keep the face the model sees."""
    from raymia.attacks.oracle import InProcessOracle

    class Const(torch.nn.Module):
        def forward(self, t):
            return torch.full((t.shape[0], 3), 1 / 3)
    x, _, _ = faces
    p = RobustParams(t_bits=12, l_sp=6, window=30, l_near=4)
    pf = RobustParams(t_bits=12, l_sp=6, window=30, l_near=4, feat_k=4, feat_sim=0.8)
    same = torch.from_numpy(np.stack([x[0]] * 30))
    answered = {}
    for name, params in (("fingerprint", p), ("feature", pf)):
        gate = R.Gate(params, embed=coarse_embed)
        ev = R.EvasiveOracle(R.GatedOracle(InProcessOracle(Const(), 1, 3), gate, ["a"]), p, seed=0)
        ev.query(same, [0] * 30)
        answered[name] = int(ev.answered[0])
    assert answered["fingerprint"] == 30 and pf.feat_k <= answered["feature"] <= pf.feat_k + 4, answered
