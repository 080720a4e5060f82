"""Cluster files: every YAML in clusters/ passes Ray's own cluster-config schema (what
`ray up` checks), and the KubeRay RayJob has the structure the operator needs."""
import copy
from pathlib import Path

import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_UP = sorted(p.name for p in CLUSTERS.glob("*.yaml") if p.name != "kuberay-rayjob.yaml")


@pytest.mark.parametrize("name", RAY_UP)
def test_cluster_yaml_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema error
    assert raw["head_start_ray_commands"] and any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    # a typo is caught by the same check
    bad = copy.deepcopy(raw)
    bad["idle_timeout_minutez"] = 5
    with pytest.raises(Exception, match="idle_timeout_minutez"):
        validate_config(prepare_config(bad))


def test_gpu_cluster_worker_types_declare_the_role_resources():
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        types = yaml.safe_load((CLUSTERS / name).read_text())["available_node_types"]
        assert types["gpu_rollout"]["resources"]["rollout"] == 1 and types["gpu_rollout"]["resources"]["GPU"] == 1
        assert types["gpu_learner"]["resources"]["learner"] == types["gpu_learner"]["resources"]["GPU"] == 8
        assert types["head"]["max_workers"] == 0 and "GPU" not in types["head"]["resources"]


def test_kuberay_rayjob_structure():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("rlaif-ray train configs/") and spec["shutdownAfterJobFinishes"] is True
    assert (CLUSTERS.parent / spec["entrypoint"].split()[2]).is_file()  # the config it runs exists
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"gpu-rollout", "gpu-learner"}
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # ray start --resources takes JSON
