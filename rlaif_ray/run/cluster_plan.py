"""`rlaif-ray check CONFIG [--cluster FILE]`: validate a config without starting anything and,
given a cluster file, whether its pools fit the cluster's node types at full scale, with the
placement plan. Reads Ray cluster-launcher YAMLs (`available_node_types`) and KubeRay
manifests (RayJob / RayCluster: `workerGroupSpecs`). Pure: no Ray, no models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlaif_ray.config import Config, ConfigError
from rlaif_ray.run.layout import _fits, _fmt, bundle, check_layout, placement, roles


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]  # what Ray may schedule on one node of this type
    min_workers: int
    max_workers: int
    head: bool = False


def _k8s_quantity(x) -> float:
    s = str(x)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _node_from_ray_start(params: dict, container: dict | None) -> dict[str, float]:
    """KubeRay: rayStartParams (num-cpus, num-gpus, resources as a JSON string) override the
    container's limits (cpu, nvidia.com/gpu)."""
    import json

    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    res = {"CPU": _k8s_quantity(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": _k8s_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    custom = params.get("resources")
    if custom:
        res.update({k: float(v) for k, v in json.loads(str(custom).strip("'\"").replace("\\\"", "\"")).items()})
    return {k: v for k, v in res.items() if v > 0}


def read_cluster(path: str | Path) -> list[NodeType]:
    """Node types of a cluster-launcher YAML or a KubeRay RayJob/RayCluster manifest."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--cluster {path}: no such file")
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            head = doc.get("head_node_type")
            return [NodeType(name, {k: float(v) for k, v in (t.get("resources") or {}).items()},
                             int(t.get("min_workers", 0)), int(t.get("max_workers", 0)), head=name == head)
                    for name, t in doc["available_node_types"].items()]
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec") or (spec if doc.get("kind") == "RayCluster" else None)
        if cluster:
            head = cluster["headGroupSpec"]
            out = [NodeType("head", _node_from_ray_start(head.get("rayStartParams") or {},
                                                          head["template"]["spec"]["containers"][0]), 0, 0, head=True)]
            for g in cluster.get("workerGroupSpecs") or []:
                n = int(g.get("replicas", 0))
                out.append(NodeType(g["groupName"], _node_from_ray_start(g.get("rayStartParams") or {},
                                                                         g["template"]["spec"]["containers"][0]),
                                    int(g.get("minReplicas", n)), int(g.get("maxReplicas", n))))
            return out
    raise ConfigError(f"--cluster {path}: neither a Ray cluster-launcher YAML (available_node_types) "
                      "nor a KubeRay RayJob/RayCluster manifest")


def plan(cfg: Config, nodes: list[NodeType]) -> list[str]:
    """Check the layout against the cluster at full scale (every worker type at max_workers;
    the head counts only what it declares, and should declare no CPUs) and return the plan:
    per pool, its bundles, strategy and the node type(s) that can hold them."""
    workers = [n for n in nodes if not n.head]
    total: dict[str, float] = {}
    live: list[dict[str, float]] = []
    for n in nodes:
        count = 1 if n.head else n.max_workers
        for k, v in n.resources.items():
            total[k] = total.get(k, 0.0) + v * count
        live += [n.resources] * min(count, 64)  # enough copies for the per-node checks
    check_layout(cfg, total, live)
    lines = []
    for name, role in roles(cfg):
        one = bundle(role)
        hosts = [n for n in nodes if _fits(one, n.resources)]
        if any(n.head for n in hosts) and one.get("CPU", 0) > 0:
            raise ConfigError(f"pipeline.{name}: its actors ({_fmt(one)}) fit the head node, which must schedule no "
                              "RL actors: give the head `CPU: 0` in the cluster file or the role a custom resource")
        per_node = {n.name: min(math.floor(n.resources.get(k, 0) / v + 1e-9) for k, v in one.items())
                    for n in hosts if not n.head}
        where = ", ".join(f"{t} (up to {c} per node, {math.ceil(role.num_actors / c)} node(s))"
                          for t, c in per_node.items() if c > 0)
        lines.append(f"{name}: {role.num_actors} x {_fmt(one)} {placement(name, role)} -> {where}")
    lines.append("cluster at full scale: " + _fmt(total) + "; worker types: "
                 + ", ".join(f"{n.name} {n.min_workers}-{n.max_workers} x {_fmt(n.resources)}" for n in workers))
    return lines
