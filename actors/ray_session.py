"""The Ray session and the options every actor starts with: one place for `ray.init`,
placement groups, resources, the thread environment and the restart policy, so that
every command's actors are started the same way."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from rlaif_ray.config import Config, ConfigError, RayConfig, RoleResources
from rlaif_ray.run.layout import bundle, check_layout, placement


def start_ray(ray_cfg: RayConfig) -> bool:
    """Start (or join) Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        # a cluster: ray.address, or the one a `ray job submit` job runs in (RAY_ADDRESS is set);
        # the job's own runtime env (working dir) is kept, ours only adds variables
        ray.init(address=ray_cfg.address or "auto", runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
                 dashboard_host=ray_cfg.dashboard_host, runtime_env={"env_vars": env})
    return True


@contextmanager
def ray_session(cfg: Config, check_fit: bool = False):
    """`with ray_session(cfg):` -- Ray for the block; shut down after it only if this block
    started it (a caller's or a job's Ray is left running). `check_fit`: refuse a layout
    the cluster cannot hold before any actor starts."""
    started = start_ray(cfg.ray)
    try:
        if check_fit:
            check_cluster_fits(cfg)
        yield
    finally:
        if started:
            ray.shutdown()


def check_cluster_fits(cfg: Config) -> None:
    """The pipeline's layout against what Ray reports (layout.check_layout)."""
    if not cfg.pipeline.check_resources:
        return
    if cfg.pipeline.cluster_resources:  # an autoscaling cluster's full-scale totals
        return check_layout(cfg, cfg.pipeline.cluster_resources)
    check_layout(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])


def thread_env(role: RoleResources) -> dict[str, str]:
    """OpenMP threads = the role's torch threads (Ray sets OMP_NUM_THREADS=num_cpus, 1 when
    fractional; see BENCHMARKS.md "Settings chosen by measurement")."""
    return {"OMP_NUM_THREADS": str(role.torch_threads)}


def place(name: str, role: RoleResources, tag: str, timeout: float) -> list[dict]:
    """Per-actor scheduling options of a role: bundle i of a placement group named ROLE@TAG
    (learner PACK, generators and labelers SPREAD unless the config says otherwise)."""
    strategy, one = placement(name, role), bundle(role)
    if strategy == "NONE" or not one:
        return [{}] * role.num_actors
    pg = ray.util.placement_group([one] * role.num_actors, strategy=strategy, name=f"{name}@{tag}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ConfigError(f"pipeline.{name}: placement group of {role.num_actors} x {one} ({strategy}) not placed "
                          f"within {timeout:.0f}s: the cluster lacks the resources (see `ray status`)")
    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)} for i in range(role.num_actors)]


def release(tag: str, names=("generators", "labelers", "learner")) -> None:
    """Remove a run's placement groups (they outlive killed actors until the driver exits)."""
    for name in names:
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(f"{name}@{tag}"))
        except ValueError:  # none by that name
            pass


def actor_options(role: RoleResources, name: str, restarts: bool = True, env: dict | None = None,
                  where: dict | None = None) -> dict:
    """`.options(...)` of one actor of a role: its name, CPUs/GPUs/custom resources, thread
    environment and restart policy (a learner rank is never restarted alone: `restarts=False`)."""
    return dict(name=name, num_cpus=role.num_cpus, num_gpus=role.num_gpus, resources=role.resources,
                max_restarts=role.max_restarts if restarts else 0,
                runtime_env={"env_vars": {**(env or {}), **thread_env(role)}}, **(where or {}))


def gather(refs: list, desc: str, enabled: bool = True, unit: str = "call", timeout: float | None = None) -> list:
    """ray.get(refs) in order, with a progress bar (stderr) that moves as each completes. A
    failed call raises as ray.get would; `timeout` bounds the whole wait."""
    deadline = None if timeout is None else time.time() + timeout
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True) as bar:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.time())
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                raise TimeoutError(f"{desc}: {len(pending)} of {len(refs)} calls unfinished after {timeout:.0f}s")
            ray.get(done)  # surface a failure at once, not after the rest
            bar.update(len(done))
    return ray.get(refs)


def actor_died(err: Exception) -> bool:
    """A dead or restarting actor (directly, or as the failed input of a chained task)."""
    dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    return isinstance(err, dead) or isinstance(getattr(err, "cause", None), dead)
