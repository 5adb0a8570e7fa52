"""The filter-state store as an operator runs it (no Ray): bounded memory with many client
ids, blocks kept through eviction, TTL and purge, durable (fsync'd) blocks, file modes,
quarantine of a corrupt snapshot, the evidence of a block kept after unblock, the audit
trail, and the shard-call deadline (503, fail closed).  Every store test runs against both
backends (``store_at``: a SQLite file, a schema of the suite's PostgreSQL server), and so do
the tests of concurrent holders and of a holder killed mid-write."""
import asyncio
import json
import logging
import os
import stat
import time

import numpy as np
import pytest

from raymia.defenses.filter import FilterParams
from raymia.serving.store import FilterStateStore, state_nbytes

SHAPE = (1, 32, 32)


def img(rng):
    return rng.random(SHAPE).astype(np.float32)


def u8(rng):
    return (rng.integers(0, 256, SHAPE).astype(np.float32) / 255.0).astype(np.float32)


def block(store, cid, face):
    """Send the same face until the filter blocks ``cid`` (L_sp = 4: the 4th query)."""
    out = [store.check(cid, face)["safe"] for _ in range(4)]
    assert out == [True, True, True, False]


def test_many_clients_memory_stays_under_the_bound_and_blocks_survive_eviction(store_at):
    p = FilterParams()
    rng = np.random.default_rng(0)
    one = state_nbytes(_one_state(p))
    bound_entries, bound_bytes = 300, 200 * one          # the byte bound is the tighter one
    store = FilterStateStore(store_at, p, cache_clients=bound_entries, cache_bytes=bound_bytes)
    faces = [img(rng) for _ in range(10)]
    for k in range(10):
        block(store, f"bad-{k}", faces[k])
    n, t0, peak = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < 4.0 or n < 2000:    # as many distinct ids as fit in ~4 s
        batch = [(f"user-{n + j}", u8(rng), None) for j in range(50)]
        assert all(v["safe"] for v in store.check_many(batch))
        n += 50
        peak = max(peak, store.cache_used)
        assert len(store.cache) <= bound_entries and store.cache_used <= bound_bytes
    info = store.cache_info()
    assert info["evicted"] >= n - 200 and peak <= bound_bytes
    for k in range(10):                                   # evicted long ago, still blocked from the file
        assert f"bad-{k}" not in store.cache
        v = store.check(f"bad-{k}", img(rng))
        assert not v["safe"] and v["blocked"]
    fp = store.footprint(checkpoint=True)
    per_client = fp["bytes"] / fp["clients"]
    print(f"\n{store.db.kind}: {n} clients through the store in {time.perf_counter() - t0:.1f} s; cache peak {peak / 2**20:.1f} MiB "
          f"<= bound {bound_bytes / 2**20:.1f} MiB ({one / 1024:.0f} KiB per cached state); "
          f"disk {fp['bytes'] / 2**20:.1f} MiB = {per_client / 1024:.2f} KiB per client after one 8-bit query")
    assert per_client < 4 * 1024                          # one 8-bit 32x32 image + the row, not a full snapshot
    store.close()


def _one_state(p):
    from raymia.defenses.filter import ClientFilterState
    st = ClientFilterState(p)
    st.check(np.full(SHAPE, 0.5, np.float32))
    return st


def test_ttl_purges_inactive_unblocked_clients_only_and_purge_keeps_evidence(store_at, caplog):
    p = FilterParams()
    rng = np.random.default_rng(1)
    store = FilterStateStore(store_at, p, client_ttl_s=3600)
    face = img(rng)
    block(store, "mallory", face)
    store.check("alice", img(rng))
    store.check("bob", img(rng))
    store.db.execute("UPDATE clients SET updated = updated - 7200")     # both inactive for two hours
    store.check("carol", img(rng))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raymia.audit"):
        assert store.purge_inactive() == 2                                # alice, bob; never mallory
        assert store.get("alice") is None and store.get("carol") is not None
        assert store.get("mallory")["blocked"]
        assert store.purge("mallory")["purged"] and store.get("mallory") is None
    kinds = [json.loads(r.getMessage())["audit"] for r in caplog.records]
    assert kinds == ["purge_inactive", "purge"]
    why = store.why("mallory")                                            # the evidence outlives the purge
    assert [e["kind"] for e in why["events"]] == ["block", "purge"] and len(why["evidence"]) == 3
    store.close()


def test_block_is_durable_audited_and_its_evidence_outlives_unblock(store_at, caplog):
    p = FilterParams()
    rng = np.random.default_rng(2)
    store = FilterStateStore(store_at, p)
    if store.db.kind == "sqlite":
        path = store_at
        for f in (path, f"{path}-wal", f"{path}-shm"):                   # owner-only, whatever the umask
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    face = img(rng)
    with caplog.at_level(logging.INFO, logger="raymia.audit"):
        for _ in range(3):
            store.check("eve", face)
        assert store.stats["fsyncs"] == 0                  # ordinary commits: not flushed
        assert not store.check("eve", face)["safe"]
        assert store.stats["fsyncs"] == 1                  # the blocking commit: fsync'd (SQLite) / WAL-flushed (PG)
        store.check("eve", face)                                         # already blocked: no new fsync
        assert store.stats["fsyncs"] == 1
        store.reset("eve")
        store.block("frank", reason="abuse report #12")
        assert store.stats["fsyncs"] == 2
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(ln["audit"], ln["client_id"]) for ln in lines] == [("block", "eve"), ("unblock", "eve"),
                                                                 ("manual_block", "frank")]
    assert lines[2]["reason"] == "abuse report #12"
    why = store.why("eve")
    assert [e["kind"] for e in why["events"]] == ["block", "unblock"]
    ev = why["evidence"]                       # queries 2, 3, 4 raised the counter by 1, 2, 3 matches
    assert [e["query"] for e in ev] == [2, 3, 4] and [e["matches"] for e in ev] == [1, 2, 3]
    last = ev[-1]
    assert last["blocked"] and [c["query"] for c in last["compared"]] == [1, 2, 3]
    assert all(c["matched"] and c["ssim"] > p.t_ssim and c["hash_diff"] < p.t_hash for c in last["compared"])
    assert store.get("frank")["blocked"] and not store.check("frank", img(rng))["safe"]
    # the cost of the durable write: fsync of the WAL after a blocking commit
    t = []
    for k in range(20):
        t0 = time.perf_counter()
        store.block(f"sybil-{k}")
        t.append(time.perf_counter() - t0)
    n0 = store.stats["fsyncs"]
    t_plain = []
    for k in range(20):
        t0 = time.perf_counter()
        store.check(f"plain-{k}", img(rng))
        t_plain.append(time.perf_counter() - t0)
    assert store.stats["fsyncs"] == n0
    print(f"\n{store.db.kind}: manual block (durable commit) median {np.median(t) * 1e3:.2f} ms, fsync alone "
          f"{store.stats['fsync_s'] / store.stats['fsyncs'] * 1e3:.2f} ms on average (the commit with its flush); "
          f"an ordinary first check {np.median(t_plain) * 1e3:.2f} ms")
    store.close()


def test_corrupt_snapshot_is_quarantined_and_the_client_starts_clean(store_at, caplog):
    p = FilterParams()
    rng = np.random.default_rng(3)
    store = FilterStateStore(store_at, p, snapshot_every=2)
    for _ in range(5):
        store.check("ok-user", img(rng))
    block(store, "bad-guy", img(rng))
    for cid in ("ok-user", "bad-guy"):                    # damage the stored bytes behind the store's back
        blob = bytearray(store.db.execute("SELECT snapshot FROM clients WHERE client_id=?", (cid,)).fetchone()[0])
        blob[len(blob) // 2] ^= 0xFF                      # one flipped byte: checksum mismatch
        store.db.execute("UPDATE clients SET snapshot=? WHERE client_id=?", (bytes(blob), cid))
    store.close()
    store = FilterStateStore(store_at, p)
    with caplog.at_level(logging.INFO, logger="raymia.audit"):
        v = store.check("ok-user", img(rng))             # not a 422: a clean state, the query counted
        assert v["safe"] and v["n_queries"] == 6 and v["count"] == 0
        assert store.get("ok-user")["quarantined"] == 1 and store.get("ok-user")["buffered"] == 1
        st = store.get("bad-guy")                       # corruption never undoes a block
        assert st["blocked"] and st["quarantined"] == 1
        assert not store.check("bad-guy", img(rng))["safe"]
        assert store.reset("bad-guy")["blocked"] is False  # unblock works on it
    q = store.quarantined()
    assert {e["client_id"] for e in q} == {"ok-user", "bad-guy"} and all("checksum" in e["error"] for e in q)
    assert all(e["snapshot_bytes"] > 0 for e in q)      # the corrupt bytes are kept aside
    kinds = [json.loads(r.getMessage())["audit"] for r in caplog.records]
    assert kinds.count("quarantine") == 2
    store.close()


def test_list_clients_pages_and_add_queries_counts_refused_ones(store_at):
    p = FilterParams()
    rng = np.random.default_rng(4)
    store = FilterStateStore(store_at, p)
    for k in range(25):
        store.check(f"c{k:02d}", img(rng))
    block(store, "c99", img(rng))
    seen, after = [], ""
    while True:
        page = store.list_clients(after, 10)
        seen += [c["client_id"] for c in page["clients"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(seen) and len(seen) == 26
    assert [c["client_id"] for c in store.list_clients("", 100, blocked=True)["clients"]] == ["c99"]
    assert store.add_queries({"c99": 5, "c00": 3}) == 1  # only blocked clients take refused queries
    assert store.get("c99")["n_queries"] == 9 and store.get("c00")["n_queries"] == 1
    store.close()


def test_shard_call_deadline_fails_closed_with_503():
    from serve.state import ShardRouter, ShardUnavailable

    class Slow:
        def __getattr__(self, name):
            class M:
                @staticmethod
                async def remote(*a):
                    await asyncio.sleep(30)
            return M

    r = ShardRouter("/nonexistent", {}, 2, timeout_s=0.2, resolve=False)
    r.handles = [Slow(), Slow()]

    async def go():
        t0 = time.perf_counter()
        with pytest.raises(ShardUnavailable, match=r"did not answer within 0.2 s"):
            await r.check("c", np.zeros(SHAPE, np.float32), "req")
        return time.perf_counter() - t0
    assert asyncio.run(go()) < 2.0


def test_replica_held_store_two_replicas_count_concurrent_checks_exactly(store_at):
    """``serve.state_in: replica``: two routers (two replicas' worth) hold one store and
    check 32 concurrent identical queries of one client between them: exactly three are
    answered (Algorithm 2, L_sp = 4), every query is counted once, both routers learn of
    the block; a store call past the deadline fails closed."""
    from serve.state import LocalRouter, ShardUnavailable
    p = FilterParams()
    FilterStateStore(store_at, p).close()
    face = img(np.random.default_rng(3))

    async def go():
        a, b = (LocalRouter(str(store_at), p.to_dict(), 8, timeout_s=10) for _ in range(2))
        vs = await asyncio.gather(*[(a if i % 2 else b).check("burst", face, f"q{i}") for i in range(32)])
        st = await a.call("burst", "inspect")
        refused = [v for v in vs if not v["safe"]]
        # a store call slower than the deadline: ShardUnavailable (the app answers 503)
        a.timeout_s = 0.2
        a.service.check_many = lambda items: time.sleep(2) or []
        t0 = time.perf_counter()
        with pytest.raises(ShardUnavailable, match=r"did not answer within 0.2 s"):
            await a.check("late", face, "late-1")
        return vs, st, refused, time.perf_counter() - t0, a.is_blocked("burst"), b.is_blocked("burst")
    vs, st, refused, took, a_knows, b_knows = asyncio.run(go())
    assert sum(v["safe"] for v in vs) == 3 and len(refused) == 29
    assert st["n_queries"] == 32 and st["blocked"] and st["count"] == p.l_sp
    assert a_knows and b_knows and took < 1.5


# ----------------------------------------------------------------------------- concurrent holders, a kill

def _worker(locator, name, batches, order, seed):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("store_worker.py")
    return subprocess.Popen([sys.executable, str(script), str(locator), name, str(batches), order, str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_replicas_on_one_store_never_lose_an_update(store_at):
    """Two processes hammer the same six clients at once (locks taken in opposite orders):
    every query is counted once, each verdict saw its own query number, and the attacker
    is blocked exactly once, at its 4th query overall, whoever sent it."""
    FilterStateStore(store_at, FilterParams()).close()          # schema first (as the app builder does)
    n = 60
    procs = [_worker(store_at, "a", n, "asc", 1), _worker(store_at, "b", n, "desc", 2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    rows = [json.loads(line) for out, _ in outs for line in out.splitlines()]
    assert len(rows) == 2 * n * 6
    store = FilterStateStore(store_at, FilterParams())
    for c in [f"shared-{k}" for k in range(5)] + ["attacker"]:
        seen = sorted(r["n"] for r in rows if r["client"] == c)
        assert seen == list(range(1, 2 * n + 1)), c              # no lost update, no double count
        assert store.get(c)["n_queries"] == 2 * n
    att = sorted((r for r in rows if r["client"] == "attacker"), key=lambda r: r["n"])
    assert [r["safe"] for r in att[:4]] == [True, True, True, False] and not any(r["safe"] for r in att[4:])
    assert [e["kind"] for e in store.why("attacker")["events"]] == ["block"]
    assert not any(store.get(f"shared-{k}")["blocked"] for k in range(5))
    store.close()


def test_a_holder_killed_mid_write_loses_nothing_it_answered(store_at):
    """SIGKILL a process in the middle of its writes: every verdict it had returned is in
    the store (counts and the block), nothing is counted twice, and the next holder works
    at once (no stale lock, SQLite's WAL recovered / PostgreSQL's transaction rolled back)."""
    import signal
    FilterStateStore(store_at, FilterParams()).close()
    p = _worker(store_at, "k", 0, "asc", 3)
    rows = []
    while len(rows) < 6 * 25:                                  # 25 answered batches, then kill it mid-stream
        line = p.stdout.readline()
        assert line, p.stderr.read()[-2000:]
        rows.append(json.loads(line))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    for line in p.stdout.read().splitlines():                  # what it printed before it died
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    t0 = time.perf_counter()
    store = FilterStateStore(store_at, FilterParams())
    for c in [f"shared-{k}" for k in range(5)] + ["attacker"]:
        told = max(r["n"] for r in rows if r["client"] == c)
        stored = store.get(c)["n_queries"]
        assert told <= stored <= told + 1, (c, told, stored)   # answered ones kept; + a committed, unprinted batch
    assert store.get("attacker")["blocked"]
    v = store.check("shared-0", np.zeros(SHAPE, np.float32))
    assert v["n_queries"] == store.get("shared-0")["n_queries"]
    assert time.perf_counter() - t0 < 10.0
    store.close()


def test_sqlite_state_on_a_network_file_system_is_refused(tmp_path):
    from raymia.config import ConfigError
    from raymia.serving.backends import SqliteBackend, mount_fstype
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nfs-1.efs.aws:/ {tmp_path}/shared nfs4 rw 0 0\n")
    (tmp_path / "shared").mkdir()
    assert mount_fstype(tmp_path / "shared" / "runs", str(mounts)) == "nfs4"
    assert mount_fstype(tmp_path / "sharedother", str(mounts)) == "ext4"     # a prefix of the name is not a mount
    with pytest.raises(ConfigError, match=r"network file system \(nfs4\).*serve.state_url"):
        SqliteBackend(tmp_path / "shared" / "runs" / "s.sqlite", str(mounts))
    SqliteBackend(tmp_path / "local.sqlite", str(mounts)).close()


def test_store_keeps_the_robust_detector_exactly(store_at):
    """``filter.kind: robust`` in the store: snapshot + replayed log give the state a
    never-stopped detector has, bit for bit, and its block survives a reopen."""
    from raymia.defenses.filter.robust import RobustClientState, RobustParams
    p = RobustParams(memory=16)
    rng = np.random.default_rng(9)
    face = u8(rng)
    queries = [u8(rng) if i % 3 else np.clip(face + (i % 5) / 255.0, 0, 1).astype(np.float32) for i in range(90)]
    ref = RobustClientState(p)
    store = FilterStateStore(store_at, p)
    for i, q in enumerate(queries):
        want = ref.check(q)
        got = store.check("r", q, f"q{i}")
        assert (got["safe"], got["count"]) == (want.safe, want.count)
        if i % 29 == 0 or want.blocked:
            other = FilterStateStore(store_at, p)
            assert other._load("r").state.to_bytes() == ref.to_bytes()
            other.close()
        if want.blocked:
            break
    assert ref.blocked and store.why("r")["thresholds"]["t_bits"] == p.t_bits
    store.close()
    again = FilterStateStore(store_at, p)
    assert again.get("r")["blocked"] and not again.check("r", u8(rng))["safe"]
    again.close()
    with pytest.raises(Exception, match="other filter parameters"):
        FilterStateStore(store_at, FilterParams())
