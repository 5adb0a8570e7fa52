"""The similarity filter (Raha et al., Algorithm 2): SSIM against skimage, the simple
hash, the per-client state step by step, persistence, input validation, and the
cross-client index."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from raymia.defenses.filter import (PAPER_TABLE1, ClientFilterState, FilterInputError, FilterParams,
                                    GlobalIndex, SSIMStack, downsample, mean_hash, ssim_batch)


@pytest.fixture(scope="module")
def mnist():
    from raymia.data import load_mnist5k
    x, y = load_mnist5k()
    return x.astype(np.float64) / 255.0, y


@pytest.fixture(scope="module")
def orl():
    from raymia.data import load_orl
    x, y, _ = load_orl()
    return x.astype(np.float64) / 255.0, y


def _sk(q, b, dr=1.0):
    return np.array([structural_similarity(q, bi, data_range=dr) for bi in b])


# ----------------------------------------------------------------------------- SSIM

@pytest.mark.parametrize("shape", [(7, 7), (28, 28), (32, 32), (64, 64), (45, 30)])
def test_ssim_matches_skimage_random(shape):
    rng = np.random.default_rng(sum(shape))
    q = rng.random(shape)
    far = rng.random((6,) + shape)
    near = np.clip(q + rng.normal(0, 1e-3, (6,) + shape), 0, 1)      # the filter's regime
    for b in (far, near):
        ref = _sk(q, b)
        assert np.abs(ssim_batch(q, b, data_range=1.0) - ref).max() < 1e-4
        stack = SSIMStack.from_images(b, data_range=1.0)
        assert np.abs(ssim_batch(q, stack, data_range=1.0) - ref).max() < 1e-4
    # another data range (uint8-like values)
    q8, b8 = q * 255, far * 255
    assert np.abs(ssim_batch(q8, b8, data_range=255.0) - _sk(q8, b8, 255.0)).max() < 1e-4


def test_ssim_matches_skimage_real(mnist, orl):
    import torch
    import torch.nn.functional as F
    x, y = mnist
    q, b = x[0], x[1:40]                                      # 28x28 digits
    assert np.abs(ssim_batch(q, b, data_range=1.0) - _sk(q, b)).max() < 1e-4
    o, _ = orl
    assert np.abs(ssim_batch(o[0], o[1:20], data_range=1.0) - _sk(o[0], o[1:20])).max() < 1e-4  # 112x92
    o64 = F.interpolate(torch.from_numpy(o[:20])[:, None], size=(64, 64), mode="area")[:, 0].double().numpy()
    assert np.abs(ssim_batch(o64[0], o64[1:], data_range=1.0) - _sk(o64[0], o64[1:])).max() < 1e-4
    # a face against itself + tiny noise: values near 1 are still exact
    rng = np.random.default_rng(1)
    nb = np.clip(o64[3] + rng.normal(0, 2e-4, (5, 64, 64)), 0, 1)
    got = ssim_batch(o64[3], nb, data_range=1.0)
    assert np.abs(got - _sk(o64[3], nb)).max() < 1e-6 and (got > 0.999).all()


def test_gaussian11_ssim_matches_skimage_gaussian_and_drives_the_filter(mnist, orl):
    """``ssim_window="gaussian11"`` = skimage's Gaussian SSIM (sigma 1.5, population
    covariance; tf.image.ssim's) within 1e-6 on real digits and faces, through a filter
    state too; the default filter and its serialisation are unchanged."""
    def sk_g(q, b, dr=1.0):
        return np.array([structural_similarity(q, bi, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, data_range=dr) for bi in b])
    x, _ = mnist
    o, _ = orl
    for q, b, dr in ((x[0], x[1:30], 1.0), (o[0], o[1:12], 1.0), (x[5] * 255, x[6:20] * 255, 255.0),
                     (x[7], np.clip(x[7] + np.random.default_rng(0).normal(0, 1e-3, (4, 28, 28)), 0, 1), 1.0)):
        ref = sk_g(q, b, dr)
        assert np.abs(ssim_batch(q, b, data_range=dr, window="gaussian11") - ref).max() < 1e-6
        st = SSIMStack.from_images(b, data_range=dr, window="gaussian11")
        assert np.abs(ssim_batch(q, st, data_range=dr) - ref).max() < 1e-6
        assert np.abs(ssim_batch(q, b, data_range=dr) - sk_g(q, b, dr)).max() > 1e-6    # a different SSIM
    # the filter with the Gaussian window counts the matches that SSIM gives
    p = FilterParams(n_b=10, t_ssim=0.5, t_hash=1.0, l_sp=100, ssim_window="gaussian11")
    imgs = x[:8].astype(np.float32)
    st = ClientFilterState(p)
    for i, im in enumerate(imgs):
        r = st.check(im)
        if i:
            assert r.matches == int((sk_g(im.astype(np.float64), imgs[:i].astype(np.float64)) > 0.5).sum())
    back = ClientFilterState.from_bytes(st.to_bytes())
    assert back.params.ssim_window == "gaussian11" and back.count == st.count
    assert "ssim_window" not in FilterParams().to_dict()          # default: the state's bytes as before
    with pytest.raises(ValueError, match="ssim_window"):
        FilterParams(ssim_window="box")


def test_same_label_pair_statistic(mnist):
    """bench/ssim_pairs.py's statistic: every same-label pair once, each SSIM variant as skimage."""
    from raymia.filter_sim.pairs import pair_stats, pairs_table, same_label_ssim
    x, y = mnist
    pools = {0: x[y == 0][:6], 1: x[y == 1][:4]}
    ref = [structural_similarity(p[i], p[j], data_range=1.0) for _, p in sorted(pools.items())
           for i in range(len(p)) for j in range(i + 1, len(p))]
    got = same_label_ssim(pools, 1.0, "uniform7")
    assert len(got) == 15 + 6 and np.abs(got - ref).max() < 1e-6
    g = same_label_ssim(pools, 1.0, "gaussian11")
    assert np.abs(g[:15] - [structural_similarity(pools[0][i], pools[0][j], gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=1.0)
                            for i in range(6) for j in range(i + 1, 6)]).max() < 1e-6
    st = pair_stats(got)
    assert st["pairs"] == 21 and st["max"] == pytest.approx(max(ref)) and st["above_0.999"] == 0.0
    assert "| 21 |" in pairs_table([{"setting": "s", "pool": "p", "variant": "v", **st}])


def test_ssim_rejects_bad_arrays():
    with pytest.raises(ValueError):
        ssim_batch(np.zeros((5, 5)), np.zeros((2, 5, 5)), data_range=1.0)        # smaller than the window
    with pytest.raises(ValueError):
        ssim_batch(np.zeros((8, 8)), np.zeros((2, 9, 9)), data_range=1.0)        # shape mismatch
    with pytest.raises(ValueError):
        ssim_batch(np.full((8, 8), np.nan), np.zeros((2, 8, 8)), data_range=1.0)
    with pytest.raises(ValueError):
        ssim_batch(np.zeros((8, 8)), np.zeros((2, 8, 8)), data_range=0)


def test_mean_hash_is_mean_of_downsampled():
    rng = np.random.default_rng(0)
    img = rng.random((28, 28))
    d = downsample(img, 7)
    assert d.shape == (7, 7)
    assert np.allclose(d, img.reshape(7, 4, 7, 4).mean(axis=(1, 3)))      # block means when size divides
    assert mean_hash(img, 7) == pytest.approx(img.mean(), abs=1e-12)
    assert mean_hash(img, 8) == pytest.approx(downsample(img, 8).mean(), abs=1e-12)   # uneven bins
    assert mean_hash(img, 8) != pytest.approx(img.mean(), abs=1e-9)


# ----------------------------------------------------------------------------- Algorithm 2

def test_paper_configs():
    assert [r["config"] for r in PAPER_TABLE1] == [1, 2, 3]
    p = FilterParams.paper(2)
    assert (p.n_b, p.t_ssim, p.t_hash, p.l_sp) == (10, 0.99999, 0.00001, 4)
    assert FilterParams.paper(3, "celeba").l_sp == 8 and FilterParams.paper(1, "faces").l_sp == 8
    for bad in (0, 4, "1"):
        with pytest.raises(ValueError):
            FilterParams.paper(bad)
    for kw in ({"n_b": 0}, {"l_sp": 0}, {"t_ssim": 1.5}, {"t_hash": -1e-3}, {"data_range": 0.0},
               {"n_b": 2.5}, {"t_ssim": float("nan")}, {"l_sp": True}):
        with pytest.raises(ValueError):
            FilterParams(**kw)


def test_params_from_config_section():
    """The config's ``filter`` section is exactly the filter's parameters; Table 1 lives in raymia.paper."""
    from raymia import paper
    from raymia.config import ConfigError, FilterCfg
    assert PAPER_TABLE1 is paper.PAPER_TABLE1
    assert FilterParams.from_config(FilterCfg()) == FilterParams()
    assert FilterParams.from_config(FilterCfg(n_b=3, l_sp=8), data_range=255.0) == FilterParams(n_b=3, l_sp=8,
                                                                                             data_range=255.0)
    with pytest.raises(ConfigError, match="filter: invalid filter parameters: n_b"):
        FilterParams.from_config(FilterCfg(n_b=0))


def _images(n, shape=(16, 16), seed=0):
    return list(np.random.default_rng(seed).random((n,) + shape))


def test_algorithm2_step_by_step():
    """Count, limit, FIFO and the permanent block, with exact repeats (SSIM = 1, hash
    diff 0) among distinct random images (SSIM ~ 0)."""
    p = FilterParams(n_b=3, t_ssim=0.99, t_hash=0.01, l_sp=3)
    a, b, c, d, e = _images(5)
    st = ClientFilterState(p)
    seq = [  # query, expected (safe, matches, count), buffer after (oldest first)
        (a, (True, 0, 0), [a]),
        (b, (True, 0, 0), [a, b]),
        (a, (True, 1, 1), [a, b, a]),          # one buffered a
    ]
    for q, want, buf in seq:
        r = st.check(q)
        assert (r.safe, r.matches, r.count) == want and r.blocked is False
        assert np.array_equal(st.buffer_images()[:, 0], np.stack(buf).astype(np.float32))
    # FIFO: a full buffer drops its oldest entry
    st2 = ClientFilterState(p)
    for q in (a, b, c, d):
        assert st2.check(q).matches == 0
    assert len(st2) == 3
    assert np.array_equal(st2.buffer_images()[:, 0], np.stack([b, c, d]).astype(np.float32))
    assert st2.check(a).matches == 0          # a was evicted
    assert st2.check(d).matches == 1 and st2.count == 1
    # limit: count reaches L_sp -> UNSAFE, the query is not enqueued
    before = st.buffer_images()
    r = st.check(a)                           # two buffered a's: count 1 -> 3 = L_sp
    assert (r.safe, r.matches, r.count, r.blocked) == (False, 2, 3, True)
    assert st.blocked and np.array_equal(st.buffer_images(), before)
    # permanent: anything afterwards is refused and changes nothing but the query count
    for q in (e, b, c):
        r = st.check(q)
        assert (r.safe, r.matches, r.count, r.blocked) == (False, 0, 3, True)
    assert np.array_equal(st.buffer_images(), before) and st.n_queries == 7


def test_thresholds_are_strict_and_both_needed():
    rng = np.random.default_rng(3)
    a = rng.random((16, 16)) * 0.5 + 0.25
    brighter = a + 0.05                       # same structure, hash differs by 0.05
    # SSIM high but hash too far -> no match; with a looser T_hash -> match
    for t_hash, want in ((0.01, 0), (0.1, 1)):
        st = ClientFilterState(FilterParams(n_b=2, t_ssim=0.9, t_hash=t_hash, l_sp=5))
        st.check(a)
        assert st.check(brighter).matches == want
    # same hash, different structure -> no match
    perm = a.reshape(-1)[rng.permutation(a.size)].reshape(a.shape)
    st = ClientFilterState(FilterParams(n_b=2, t_ssim=0.9, t_hash=1e-6, l_sp=5))
    st.check(a)
    assert abs(mean_hash(perm, 8) - mean_hash(a, 8)) < 0.02
    assert st.check(perm).matches == 0
    # SSIM exactly 1 is not > T_ssim = 1
    st = ClientFilterState(FilterParams(n_b=2, t_ssim=1.0, t_hash=1.0, l_sp=1))
    st.check(a)
    assert st.check(a).safe


@pytest.mark.parametrize("n_b,l_sp", [(10, 4), (10, 8), (1, 3), (3, 1)])
def test_identical_query_attacker_blocked_after_exactly_l_sp_matches(n_b, l_sp):
    img = _images(1, (28, 28), seed=7)[0]
    st = ClientFilterState(FilterParams(n_b=n_b, t_ssim=0.999, t_hash=0.001, l_sp=l_sp))
    total = 0
    for k in range(1, 100):
        r = st.check(img)
        expect = min(k - 1, n_b)              # every buffered copy matches
        assert r.matches == expect
        total += r.matches
        if not r.safe:
            break
        assert r.count == total < l_sp
    assert r.blocked and r.count == l_sp and total >= l_sp and total - r.matches < l_sp
    assert k == next(j for j in range(1, 100) if sum(min(i - 1, n_b) for i in range(1, j + 1)) >= l_sp)


def test_distinct_real_test_images_pass_at_defaults(mnist, orl):
    """Regular users: distinct real digits of one label, and all ten photos of one ORL
    person, never match at the default parameters nor at the paper's configs."""
    from raymia.data import to_tensor
    x, y = mnist
    o, oy = orl
    orl32 = to_tensor((o * 255).astype(np.uint8), 32, 255.0)[:, 0].numpy()
    sessions = [x[y == lab][:60] for lab in (1, 8)] + [orl32[oy == i] for i in range(4)]
    params = [FilterParams()] + [FilterParams.paper(k, s) for k in (1, 2, 3) for s in ("mnist", "celeba")]
    for p in params:
        for imgs in sessions:
            st = ClientFilterState(p)
            for im in imgs:
                r = st.check(np.ascontiguousarray(im))
                assert r.safe and r.matches == 0, (p, r)


# ----------------------------------------------------------------------------- persistence

def test_bytes_round_trip():
    p = FilterParams(n_b=4, t_ssim=0.99, t_hash=0.01, l_sp=6)
    imgs = _images(7, (3, 12, 10), seed=2)
    st = ClientFilterState(p)
    assert ClientFilterState.from_bytes(st.to_bytes()).to_bytes() == st.to_bytes()   # empty
    for i, im in enumerate(imgs):                                       # wraps the ring
        st.check(im)
        if i in (1, 6):
            st.check(imgs[0])
    b = st.to_bytes()
    st2 = ClientFilterState.from_bytes(bytearray(b))
    assert st2.to_bytes() == b
    assert (st2.count, st2.n_queries, st2.blocked, st2.shape, st2.params) == \
        (st.count, st.n_queries, st.blocked, st.shape, st.params)
    assert np.array_equal(st2.buffer_images(), st.buffer_images())
    # both continue identically, up to and past the block
    for q in [imgs[5], imgs[6], imgs[6], imgs[6], imgs[1]]:
        assert st.check(q) == st2.check(q)
    assert st.blocked and st.to_bytes() == st2.to_bytes()


@pytest.mark.parametrize("mangle", [
    lambda b: b"",
    lambda b: b"hello world" * 10,
    lambda b: b[:-1],
    lambda b: b[:40],
    lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:],
    lambda b: b + b"\x00",
    lambda b: np.random.default_rng(0).bytes(len(b)),
    lambda b: "not bytes",
    lambda b: None,
])
def test_from_bytes_refuses_garbage(mangle):
    st = ClientFilterState(FilterParams())
    st.check(_images(1, (8, 8))[0])
    with pytest.raises(FilterInputError):
        ClientFilterState.from_bytes(mangle(st.to_bytes()))


@pytest.mark.parametrize("bad", [
    [[0.5] * 8] * 8,                                  # not an array
    np.zeros((8, 8), np.uint8),                       # integer dtype
    np.zeros((8, 8), bool),
    np.zeros(64),                                     # 1-D
    np.zeros((1, 1, 8, 8)),                           # 4-D
    np.zeros((5, 5)),                                 # smaller than the SSIM window
    np.zeros((6, 8, 8)),                              # too many channels
    np.zeros((2000, 8)),                              # larger than max_side
    np.full((8, 8), np.nan),
    np.where(np.eye(8) > 0, np.inf, 0.5),
    np.full((8, 8), -0.01),
    np.full((8, 8), 1.01),
    np.zeros((8, 9)),                                 # differs from the client's earlier queries
    np.zeros((2, 8, 8)),
])
def test_bad_inputs_rejected_state_unchanged(bad):
    st = ClientFilterState(FilterParams(n_b=3, l_sp=2))
    for im in _images(2, (8, 8), seed=5):
        st.check(im)
    before = st.to_bytes()
    with pytest.raises(FilterInputError):
        st.check(bad)
    assert st.to_bytes() == before
    assert st.check(np.zeros((1, 8, 8), np.float32)).safe       # (1, H, W) == (H, W)


# ----------------------------------------------------------------------------- cross-client

def test_global_index_links_sybil_ids_and_spares_distinct_clients():
    p = FilterParams(n_b=10, t_ssim=0.999, t_hash=0.001, l_sp=4)
    img = _images(1, (16, 16), seed=9)[0]
    # a Sybil attacker sends the same image round robin from 5 ids: per client each id
    # sees it at most twice (1 match), the global index links the ids and blocks them
    per = {k: ClientFilterState(p) for k in range(5)}
    g = GlobalIndex(p, size=50)
    res = []
    for i in range(10):
        k = i % 5
        assert per[k].check(img).safe
        res.append(g.check(k, img))
    first = next(i for i, r in enumerate(res) if not r.safe)
    assert res[first].count == 4 and res[first].group >= 2
    assert all(not r.safe for r in res[first:]) and g.blocked(0)
    assert all(not per[k].blocked for k in per)
    # distinct images from many clients: no links, nothing blocked
    g2 = GlobalIndex(p, size=50)
    for i, im in enumerate(_images(120, (16, 16), seed=10)):
        r = g2.check(i % 7, im)
        assert r.safe and r.matches == 0 and r.group == 1
    # the ring keeps only the last `size` queries
    g3 = GlobalIndex(p, size=3, l_sp=1)
    g3.check("a", img)
    for im in _images(3, (16, 16), seed=11):
        g3.check("b", im)
    assert g3.check("c", img).safe                    # "a"'s query was evicted
    with pytest.raises(FilterInputError):
        g3.check("c", np.zeros((9, 9)))
