import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole suite (never joins a running cluster)."""
    import ray
    tmp = tmp_path_factory.mktemp("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             log_to_driver=False, _temp_dir=str(tmp))
    yield ray
    ray.shutdown()
