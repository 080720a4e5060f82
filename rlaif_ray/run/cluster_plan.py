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
    """Node types of a cluster-launcher YAML or a KubeRay RayJob/RayCluster manifest. A file
    that is not UTF-8 YAML, or whose node types are wrongly shaped, is one ConfigError naming
    the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--cluster {path}: no such file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    except UnicodeDecodeError as e:
        raise ConfigError(f"--cluster {path}: not UTF-8 text (byte {e.start}); a cluster file is YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--cluster {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    for doc in docs:
        if "available_node_types" in doc:
            return _launcher_nodes(path, doc)
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        cluster = spec.get("rayClusterSpec") or (spec if doc.get("kind") == "RayCluster" else None)
        if cluster:
            return _kuberay_nodes(path, cluster)
    raise ConfigError(f"--cluster {path}: neither a Ray cluster-launcher YAML (available_node_types) "
                      "nor a KubeRay RayJob/RayCluster manifest")


def _shape_error(path: Path, field: str, e: Exception) -> ConfigError:
    what = f"missing {e}" if isinstance(e, KeyError) else str(e)
    return ConfigError(f"--cluster {path}: {field} is not shaped as Ray expects ({what})")


def _launcher_nodes(path: Path, doc: dict) -> list[NodeType]:
    types, head = doc["available_node_types"], doc.get("head_node_type")
    if not isinstance(types, dict) or not types:
        raise ConfigError(f"--cluster {path}: available_node_types must map node type names to their settings")
    out = []
    for name, t in types.items():
        try:
            out.append(NodeType(str(name), {str(k): float(v) for k, v in (t.get("resources") or {}).items()},
                                int(t.get("min_workers", 0)), int(t.get("max_workers", 0)), head=name == head))
        except (AttributeError, TypeError, ValueError) as e:
            raise _shape_error(path, f"available_node_types.{name}", e) from None
    return out


def _kuberay_nodes(path: Path, cluster) -> list[NodeType]:
    def container(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]

    try:
        head = cluster["headGroupSpec"]
        out = [NodeType("head", _node_from_ray_start(head.get("rayStartParams") or {}, container(head)), 0, 0,
                        head=True)]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise _shape_error(path, "headGroupSpec", e) from None
    for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
        try:
            n = int(g.get("replicas", 0))
            out.append(NodeType(str(g["groupName"]), _node_from_ray_start(g.get("rayStartParams") or {}, container(g)),
                                int(g.get("minReplicas", n)), int(g.get("maxReplicas", n))))
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise _shape_error(path, f"workerGroupSpecs[{i}]", e) from None
    return out


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
