"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and checks, no
cloud access) and says what raymia needs: a CPU head, autoscaled GPU workers of the g5
and p4d/p5 families, raymia installed with a CUDA torch and this Ray version, the
repository mounted where setup installs it, and results on a mount every node shares."""
import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validated(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(cfg))     # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)                         # Ray's JSON schema + its cross-field checks
    return prepared


def test_cluster_yaml_passes_rays_validator(cluster):
    prepared = _validated(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu.p5.48xlarge"].__setitem__("min_workers", "zero"),
    lambda c: c.__setitem__("idle_timeout", 5),                       # misspelt key
    lambda c: c.__setitem__("head_node_type", "head.gpu"),            # not a declared node type
])
def test_validator_rejects_broken_variants(cluster, mutate):
    bad = copy.deepcopy(cluster)
    mutate(bad)
    with pytest.raises(Exception):
        _validated(bad)


def test_node_types_head_cpu_workers_gpu_autoscaled(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["node_config"]["InstanceType"]
    assert head.split(".")[0][0] not in "gp"                           # no GPU family on the head
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    families = {v["node_config"]["InstanceType"].split(".")[0] for v in workers.values()}
    assert "g5" in families and families & {"p4d", "p5"}
    for v in workers.values():
        assert v["min_workers"] == 0 and v["max_workers"] >= 1       # scale from zero on demand
    assert sum(v["max_workers"] for v in workers.values()) >= 8      # >= 64 GPUs reachable with p5
    assert max(v["max_workers"] * 8 for k, v in workers.items() if "p5" in k) >= 64
    assert 0 < cluster["idle_timeout_minutes"] <= 30


def test_setup_installs_raymia_with_cuda_torch_and_this_ray(cluster):
    import ray
    setup = " ".join(cluster["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup
    assert f"ray[default,tune,serve]=={ray.__version__}" in setup    # nodes must run the laptop's Ray
    mount = [remote for remote, local in cluster["file_mounts"].items() if local == "."]
    assert mount and f"-e ~/{Path(mount[0]).name}" in setup          # the mounted repo is what gets installed
    assert "RAYMIA_OUT_ROOT=/shared/" in setup and "/shared" in setup.split("mount -t nfs4")[1]


def test_gpu_requests_follow_resources_use_gpu(ray_session):
    """Tune trials ask for GPU shares when GPUs are used; `always` asks before an
    autoscaling cluster has any GPU (that request is what starts the GPU nodes)."""
    from raymia.config import load_config
    from raymia.distributed.runtime import cluster_gpus, trial_resources
    cfg = load_config("orl")
    assert ("gpu" in trial_resources(cfg)) == (cluster_gpus() > 0)           # auto
    cfg.resources.use_gpu = "always"
    assert trial_resources(cfg) == {"cpu": cfg.resources.cpus_per_trial, "gpu": cfg.resources.gpus_per_trial}
    assert trial_resources(cfg, 1.0)["gpu"] == 1.0                           # attack workers: a whole GPU
    cfg.resources.use_gpu = "never"
    assert "gpu" not in trial_resources(cfg, 1.0)
