"""`rlaif-ray check CONFIG [--cluster FILE]`: validate a config without starting anything and,
given a cluster file, whether its pools fit the cluster's node types at full scale, with the
placement plan. Reads Ray cluster-launcher YAMLs (`available_node_types`) and KubeRay
manifests (RayJob / RayCluster: `workerGroupSpecs`). Pure: no Ray, no models.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlaif_ray.config import Config, ConfigError
from rlaif_ray.remote_folder import is_uri
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


def _cluster_doc(path: str | Path) -> tuple[Path, dict, str]:
    """(path, the document, "launcher" or "kuberay") of a cluster file: the cluster-launcher
    YAML itself, or the KubeRay RayJob/RayCluster's rayClusterSpec. A file that is not UTF-8
    YAML or neither kind is one ConfigError naming it."""
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
            return path, doc, "launcher"
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        cluster = spec.get("rayClusterSpec") or (spec if doc.get("kind") == "RayCluster" else None)
        if cluster:
            return path, cluster, "kuberay"
    raise ConfigError(f"--cluster {path}: neither a Ray cluster-launcher YAML (available_node_types) "
                      "nor a KubeRay RayJob/RayCluster manifest")


def read_cluster(path: str | Path) -> list[NodeType]:
    """Node types of a cluster-launcher YAML or a KubeRay RayJob/RayCluster manifest. A file
    that is not UTF-8 YAML, or whose node types are wrongly shaped, is one ConfigError naming
    the file and the field."""
    path, doc, kind = _cluster_doc(path)
    return _launcher_nodes(path, doc) if kind == "launcher" else _kuberay_nodes(path, doc)


# a network file system mounted by a setup command: `mount -t nfs4 ... /shared`, gcsfuse, mount-s3
_MOUNT_RE = re.compile(r"\bmount\s+(?:-\S+\s+)*-t\s+(?:nfs\d?|efs|lustre|cifs|glusterfs|ceph|fuse\.\S+)\s.*?(/[\w./-]+)\s*(?:$|[;&|])"
                       r"|\b(?:gcsfuse|mount-s3|s3fs|blobfuse2?)\b.*?\s(/[\w./-]+)\s*(?:$|[;&|])")
_SHARED_VOLUMES = ("persistentVolumeClaim", "nfs", "csi", "cephfs", "glusterfs")


def shared_mounts(path: str | Path) -> list[str]:
    """The folders every node of the cluster file sees as one shared file system: for a
    launcher YAML, the targets of network mounts in its setup commands (run on every node);
    for KubeRay, the mountPaths of shared volumes (a PVC, NFS, CSI) that the head and every
    worker group mount. Anything else (a node's own disk, file_mounts, which are copies) is
    node-local."""
    path, doc, kind = _cluster_doc(path)
    if kind == "launcher":
        cmds = [c for key in ("initialization_commands", "setup_commands")
                for c in (doc.get(key) or []) if isinstance(c, str)]
        return sorted({(m.group(1) or m.group(2)).rstrip("/") for c in cmds for m in _MOUNT_RE.finditer(c)})

    def mounts(group) -> set[str]:
        try:
            spec = group["template"]["spec"]
            shared = {v["name"] for v in spec.get("volumes") or [] if any(k in v for k in _SHARED_VOLUMES)}
            return {m["mountPath"].rstrip("/") for m in spec["containers"][0].get("volumeMounts") or []
                    if m.get("name") in shared}
        except (AttributeError, IndexError, KeyError, TypeError):
            return set()

    groups = [doc.get("headGroupSpec") or {}, *(doc.get("workerGroupSpecs") or [])]
    return sorted(set.intersection(*(mounts(g) for g in groups)))


def storage_plan(cfg: Config, nodes: list[NodeType], mounts: list[str]) -> str:
    """Where the run's outputs go on this cluster, or a ConfigError when they would land on
    node-local disks of a multi-node layout: the driver runs on the head and the actors on
    workers, so the driver's records and learner rank 0's checkpoints would sit on different
    machines (and go with them)."""
    out = cfg.run.out_dir
    if is_uri(out):
        return f"outputs: {out} (shared storage every node reaches; credentials from each node's environment)"
    under = next((m for m in mounts if Path(out).is_absolute()
                  and (Path(out) == Path(m) or Path(m) in Path(out).parents)), None)
    if under:
        return f"outputs: {out} (on {under}, a shared file system every node mounts)"
    if not any(not n.head and n.max_workers > 0 for n in nodes):
        return f"outputs: {out} (one node: its own disk)"
    raise ConfigError(f"run.out_dir={out} is on each node's own disk, but this cluster runs the driver on the head "
                      "and the actors on worker nodes: the records and learner rank 0's checkpoints would land on "
                      "different machines and go with them. Set run.out_dir to s3://BUCKET/PATH (or gs://...) or to "
                      f"a folder under a shared mount (this cluster file mounts: {', '.join(mounts) or 'none'})")


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
