"""Where each role's actors go, and the pre-flight check that the layout fits the cluster.

Pure functions of the config and of the cluster's resources (as `ray.cluster_resources()`
and `ray.nodes()` report them), so an impossible layout is refused, with its numbers,
before any actor starts, and the check is testable without a cluster.
"""
from __future__ import annotations

from rlaif_ray.config import Config, ConfigError, RoleResources, judge_sources

DEFAULT_PLACEMENT = {"generators": "SPREAD", "labelers": "SPREAD", "learner": "PACK"}


def bundle(role: RoleResources) -> dict[str, float]:
    """One actor's resources in Ray's names (zeros left out: Ray refuses empty amounts)."""
    out = {"CPU": role.num_cpus, "GPU": role.num_gpus, **role.resources}
    return {k: float(v) for k, v in out.items() if v > 0}


def placement(name: str, role: RoleResources) -> str:
    return role.placement or DEFAULT_PLACEMENT[name]


def roles(cfg: Config) -> list[tuple[str, RoleResources]]:
    """The actor pools of a `train` run: (config name, resources). A reward-model run that
    evaluates gets a separate judge, a labeler with the labelers' resources."""
    p = cfg.pipeline
    out = [("generators", p.generators), ("labelers", p.labelers), ("learner", p.learner)]
    if not judge_sources(cfg.reward) and (cfg.eval.win_rate or cfg.eval.signal_posts):
        out.append(("judge", p.labelers.model_copy(update={"num_actors": 1, "placement": "NONE"})))
    return out


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def check_layout(cfg: Config, total: dict[str, float], nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse a layout the cluster cannot hold. `total`: the cluster's resources (or
    pipeline.cluster_resources, an autoscaling cluster's full-scale totals); `nodes`: each
    live node's resources (per-node checks are skipped when None)."""
    errors, need, parts = [], {}, {}
    for name, role in roles(cfg):
        one, n = bundle(role), role.num_actors
        for k, v in one.items():
            need[k] = need.get(k, 0.0) + v * n
            parts.setdefault(k, []).append(f"{name} {n} x {v:g}")
        if not nodes:
            continue
        if not any(_fits(one, node) for node in nodes):
            errors.append(f"pipeline.{name}: one actor needs {_fmt(one)}, more than any node has "
                          f"(largest node: {_fmt(max(nodes, key=lambda r: r.get('GPU', 0) + r.get('CPU', 0)))})")
        strategy = placement(name, role)
        if strategy == "STRICT_PACK" and not any(_fits({k: v * n for k, v in one.items()}, node) for node in nodes):
            errors.append(f"pipeline.{name}: STRICT_PACK puts all {n} actors ({_fmt({k: v * n for k, v in one.items()})}) "
                          "on one node, and no node has that much")
        if strategy == "STRICT_SPREAD" and n > sum(_fits(one, node) for node in nodes):
            errors.append(f"pipeline.{name}: STRICT_SPREAD needs {n} nodes that each fit {_fmt(one)}; "
                          f"the cluster has {sum(_fits(one, node) for node in nodes)}")
    for k, v in sorted(need.items()):
        have = total.get(k, 0.0)
        if v > have + 1e-9:
            errors.append(f"{k}: the layout needs {v:g} ({' + '.join(parts[k])}) but the cluster declares {have:g}")
    if errors:
        raise ConfigError("the pipeline layout does not fit the cluster (nothing was started):\n  "
                          + "\n  ".join(errors))
