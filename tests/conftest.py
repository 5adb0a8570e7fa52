import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def orl_smoke():
    """The smoke preset's ORL bundle (5 private identities, 10 for the evaluator)."""
    from raymia.config import load_config
    from raymia.data import load_bundle
    cfg = load_config("smoke")
    return cfg, load_bundle(cfg.data)


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """One results root for the job tests, so the smoke base models are trained once."""
    return tmp_path_factory.mktemp("smoke_runs")


@pytest.fixture(scope="session")
def smoke_attack_models(orl_smoke, smoke_runs):
    """A loader of the smoke preset's attack models, trained once under ``smoke_runs``: each
    call returns a fresh {"cfg", "bundle", "rt" (R_T's classifier), "F" (the attacker's
    generator)}, so a module can freeze or wrap them without touching another's."""
    from raymia.config import load_config
    from raymia.kinds import artifact_dir
    from raymia.progress import quiet
    from raymia.training import load_classifier, load_generator, train_artifact
    _, bundle = orl_smoke
    cfg = load_config("smoke", [f"run.out_root={smoke_runs}"])
    for kind in ("target", "evaluator", "attacker_gan"):
        train_artifact(cfg, kind, bundle, quiet)

    def load() -> dict:
        return {"cfg": cfg, "bundle": bundle, "rt": load_classifier(artifact_dir(cfg, "target"), "cpu")[0],
                "F": load_generator(artifact_dir(cfg, "attacker_gan"), "cpu")[0]}
    return load


# Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under
# the 107-byte AF_UNIX limit whatever the checkout's path: the session's Ray temp dir is a
# short one under RAY_TMPDIR when that is short enough, else under /tmp.
_RAY_TEMP_MAX = 44


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole suite (never joins a running cluster)."""
    import shutil
    import tempfile

    import ray
    parent = os.environ.get("RAY_TMPDIR")
    if not parent or len(parent) > _RAY_TEMP_MAX - 12:
        parent = "/tmp"
    tmp = tempfile.mkdtemp(prefix="rmia", dir=parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- Serve app

SERVE_APP = "raymia"


@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, orl_smoke):
    """What the Serve app needs, trained on the smoke preset into a temporary out_root
    (R_T, the defender's generator G, R_dmy calibrated; ~15 s); returns (cfg, bundle) with
    serve.variant=calibrated and serve.alpha=0.5 (no alpha sweep needed)."""
    from raymia.config import load_config
    from raymia.defenses.dummy import train_dummy_artifact
    from raymia.training import train_artifact
    _, bundle = orl_smoke
    root = tmp_path_factory.mktemp("serve_runs")
    cfg = load_config("smoke", [f"run.out_root={root}", "serve.variant=calibrated", "serve.alpha=0.5"])

    from raymia.progress import quiet
    train_artifact(cfg, "target", bundle, quiet)
    train_artifact(cfg, "gan", bundle, quiet)
    train_dummy_artifact(cfg, "calibrated", bundle, quiet)
    return cfg, bundle


class LiveServe:
    """The Serve app running on 127.0.0.1:<free port> (``url``) with admin token
    ``admin_token``; ``deploy(cfg)`` (re)deploys it in place, ``client(id)`` talks to it."""

    def __init__(self, cfg, port: int, admin_token: str):
        self.cfg, self.port, self.admin_token = cfg, port, admin_token
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, cfg=None):
        from ray import serve as rserve
        import serve as raymia_serve
        self.cfg = cfg or self.cfg
        rserve.run(raymia_serve.build_app(self.cfg, "smoke", admin_token=self.admin_token), name=SERVE_APP,
                   route_prefix="/")
        return self

    def client(self, client_id=None, api_key=None):
        from raymia.serving.client import ServeClient
        return ServeClient(self.url, client_id, api_key)

    def admin(self, method: str, path: str):
        return self.client().request(method, path, headers={"Authorization": f"Bearer {self.admin_token}"})

    def replica_actors(self):
        """(name, handle) of every live replica of the app."""
        import ray
        out = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith(f"SERVE_REPLICA::{SERVE_APP}#"):
                try:
                    out.append((a["name"], ray.get_actor(a["name"], namespace=a["namespace"])))
                except ValueError:
                    pass
        return out

    def wait_healthy(self, timeout_s: float = 60.0):
        import time
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if self.client().healthz().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("the app did not come back")

    def shard_actors(self):
        """(name, handle) of every filter shard actor of the current state file."""

        import ray
        from raymia.serving.plan import filter_params, state_locator
        from serve.state import NAMESPACE, shard_names
        out = []
        params = filter_params(self.cfg).to_dict()
        for n in shard_names(state_locator(self.cfg), params, self.cfg.serve.shards):
            try:
                out.append((n, ray.get_actor(n, namespace=NAMESPACE)))
            except ValueError:      # not created (yet), or killed for good
                pass
        return out


@pytest.fixture(scope="module")
def serve_app(ray_session, serve_artifacts, tmp_path_factory):
    """The Serve app over the smoke artifacts on 127.0.0.1 and a free port, with this
    module's own filter-state file; Serve and the shard actors are shut down afterwards."""
    import socket

    from ray import serve as rserve
    from raymia.config import config_from_dict
    cfg = config_from_dict(serve_artifacts[0].to_dict())
    cfg.serve.state_path = str(tmp_path_factory.mktemp("serve_state") / "filter_state.sqlite")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rserve.start(http_options={"host": "127.0.0.1", "port": port})
    live = LiveServe(cfg, port, admin_token="test-admin-token-" + "x" * 24).deploy()   # >= 32 characters
    yield live
    rserve.shutdown()
    for _, h in live.shard_actors():
        ray_session.kill(h)


# ----------------------------------------------------------------------------- markers
# `pytest -m unit`: no Ray, no HTTP (seconds to a minute per module); `pytest -m integration`:
# tests that start Ray (Tune trials, actors, the Serve app over HTTP) or run a job end to end.
INTEGRATION_FIXTURES = {"ray_session", "serve_app", "smoke_sweep", "smoke_search"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        slow_job = "subprocess" in item.nodeid or "bad_input_is_one_clear_line" in item.nodeid
        if uses & INTEGRATION_FIXTURES or slow_job:
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


# ----------------------------------------------------------------------------- PostgreSQL
# The filter-state store's second backend is tested against a real PostgreSQL server that
# the suite starts itself (initdb + pg_ctl into a temporary directory, trust auth on
# 127.0.0.1 and a free port; as the `postgres` user when run as root, since initdb refuses
# root).  RAYMIA_TEST_PG_URL points the tests at a running server instead.  Without a
# PostgreSQL installation the PostgreSQL cases are skipped, unless RAYMIA_REQUIRE_PG=1
# (.ci/run sets it, after installing PostgreSQL where it is missing): then they fail.

def _pg_bin(name: str):
    import glob
    import shutil
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server():
    """URL of the suite's PostgreSQL server (``postgresql://postgres@127.0.0.1:<port>/postgres``)."""
    import shutil
    import subprocess
    import tempfile
    if os.environ.get("RAYMIA_TEST_PG_URL"):
        yield os.environ["RAYMIA_TEST_PG_URL"]
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        msg = "PostgreSQL is not installed (no initdb/pg_ctl; apt install postgresql)"
        if os.environ.get("RAYMIA_REQUIRE_PG") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    root = tempfile.mkdtemp(prefix="rmpg", dir="/tmp")          # short: the socket path limit
    data, port = os.path.join(root, "data"), _free_port()
    as_user = []
    if os.geteuid() == 0:                                       # initdb refuses root
        import pwd
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(as_user + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                              "--no-instructions"], **run)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=on -c max_connections=60"
    subprocess.run(as_user + [pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "-t", "60",
                              "start"], **run)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_pg_schemas = iter(range(1, 1 << 30))


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty schema of the suite's server, as a URL whose search_path selects it."""
    import psycopg
    name = f"t{os.getpid()}_{next(_pg_schemas)}"
    with psycopg.connect(pg_server, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in pg_server else "?"
    return f"{pg_server}{sep}options=-csearch_path%3D{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request, tmp_path):
    """Where a filter-state store lives: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        return tmp_path / "state.sqlite"
    return request.getfixturevalue("pg_url")
