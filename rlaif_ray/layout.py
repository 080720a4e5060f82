"""Where each role's actors go, and the pre-flight check that the layout fits the cluster.

Pure functions of the config and of the cluster's resources (as `ray.cluster_resources()`
and `ray.nodes()` report them), so an impossible layout is refused, with its numbers,
before any actor starts, and the check is testable without a cluster.
"""
from __future__ import annotations

import math

from .config import Config, ConfigError, RoleResources

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
    if cfg.reward.source == "rm" and (cfg.eval.win_rate or cfg.eval.signal_posts):
        out.append(("judge", p.labelers.model_copy(update={"num_actors": 1, "placement": "NONE"})))
    return out


def thread_warnings(cfg: Config, machine: int | None = None, cluster: bool | None = None) -> list[str]:
    """The preflight's warnings (not errors: a run that oversubscribes is slower, not wrong)
    when the pools' torch threads that compute at once exceed the cores (rlaif_ray/threads.py
    gives the rule): on a local Ray the peak over the stages against ray.num_cpus (at most
    `machine`'s cores, this machine's when None); on a cluster (`cluster`, default: from
    ray.address / RAY_ADDRESS), each actor's threads against its own CPUs, as Ray places
    actors by their num_cpus."""
    from .threads import POOLS, least_threads, local_cores, on_cluster, peak_threads

    roles = {k: getattr(cfg.pipeline, k) for k in POOLS}
    if cluster if cluster is not None else on_cluster(cfg.ray.address):
        return [f"pipeline.{k}: {r.torch_threads} torch threads per actor on {r.num_cpus:g} CPUs: Ray may place other "
                f"actors on the cores those threads compute on; set torch_threads <= num_cpus (or auto)"
                for k, r in roles.items() if r.torch_threads > max(1, math.ceil(r.num_cpus - 1e-9))]
    pools = {k: (r.num_actors, r.num_cpus, r.torch_threads) for k, r in roles.items()}
    overlapped = cfg.rl.max_staleness > 0
    cores = local_cores(cfg.ray.num_cpus, machine)
    peak, stage = peak_threads(pools, overlapped)
    if peak <= cores:
        return []
    n = cfg.ray.num_cpus
    given = ("ray.num_cpus" if n and n <= cores else "this machine's; ray.num_cpus unset" if not n
             else f"this machine's; ray.num_cpus={n} counts more than it has")
    mode = (f"overlapped (rl.max_staleness={cfg.rl.max_staleness}): {' + '.join(stage)} compute at once"
            if overlapped else f"synchronous (rl.max_staleness=0): {' + '.join(stage)} compute at once")
    asks = " + ".join(f"{k} {pools[k][0]} x {pools[k][2]}" for k in stage)
    least = least_threads(pools, overlapped)
    fixes = ["torch_threads: auto on the pools (the most threads that fit)" if least <= cores else
             f"one thread per actor still asks {least} here" + ("; rl.max_staleness=0 lets the stages take turns "
                                                               "(each may then use all the cores)" if overlapped else ""),
             "fewer threads or actors", "more cores"]
    return [f"the pipeline's torch threads oversubscribe the cores: {peak} threads compute at once on {cores} cores "
            f"({given}); {mode}: {asks} (actors x threads); the stages slow each other down. "
            f"Options: {'; '.join(fixes)}"]


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
