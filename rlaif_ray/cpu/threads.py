"""Torch threads against cores: how many threads the RL pipeline's actors compute with at
once, the thread counts `torch_threads: auto` resolves to, and the cores a run has.

The rule (docs/config.md, `torch_threads`):

* A pool asks for num_actors x torch_threads threads (each actor sets torch's intra-op
  threads and OMP_NUM_THREADS to its pool's torch_threads).
* Overlapped (rl.max_staleness >= 1): the generators sample batch k+1 while the labelers
  score batch k and the learner trains, so all three pools compute at once and their
  threads add up.
* Synchronous (rl.max_staleness = 0): the stages take turns. An idle actor's OpenMP threads
  spin for well under a millisecond and then sleep, so only the stage that computes
  counts: the learner alone, then the rollout. In the rollout, a labeler scores one
  generator's shard while another generator still samples, so with several generators the
  generators and labelers add up; with one generator its single shard is sampled, then
  scored, and they take turns too.
* The peak over those stages is what must fit the cores Ray is given (ray.num_cpus, and
  never more than this machine's; on a cluster each actor's own CPUs, as Ray places actors
  by their num_cpus).
* No actor computes on less than one thread, so three pools that overlap need at least
  three threads: on two cores the overlapped mode cannot fit, and the synchronous one can
  (two threads for each stage).

The evaluation judge of a reward-model run (layout.roles "judge") computes between
training steps only, and is not counted.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlaif_ray.config import Config

POOLS = ("generators", "labelers", "learner")


def stages(overlapped: bool, generators: int) -> list[tuple[str, ...]]:
    """The groups of pools whose actors compute at the same time (see the module docstring)."""
    if overlapped:
        return [POOLS]
    rollout = [("generators", "labelers")] if generators > 1 else [("generators",), ("labelers",)]
    return [*rollout, ("learner",)]


def peak_threads(pools: dict[str, tuple[int, float, int]], overlapped: bool) -> tuple[int, tuple[str, ...]]:
    """(the most torch threads computing at one time, the pools that ask for them).
    `pools`: name -> (num_actors, num_cpus, torch_threads) for generators, labelers, learner."""
    best = (0, ())
    for stage in stages(overlapped, pools["generators"][0]):
        n = sum(pools[p][0] * pools[p][2] for p in stage)
        if n > best[0]:
            best = (n, stage)
    return best


def least_threads(pools: dict[str, tuple[int, float, int]], overlapped: bool) -> int:
    """The peak with one thread per actor: the fewest threads this layout and mode can ask."""
    return peak_threads({k: (a, c, 1) for k, (a, c, _) in pools.items()}, overlapped)[0]


def auto_threads(pools: dict[str, tuple[int, float, int | str]], cores: int | None,
                 overlapped: bool) -> dict[str, int]:
    """Per-actor torch threads for each pool, a pool's "auto" resolved (a number is kept).

    With `cores` (a local Ray): the pools of each stage share the cores their fixed-thread
    pools leave, in proportion to their CPU reservations (num_actors x num_cpus; by actors
    when none reserves CPUs), rounded down and then the remaining cores handed out by the
    largest remainder, never below one thread an actor. Overlapped, the three pools share
    one budget; synchronous, each stage has all the cores. `cores` None (a cluster, whose
    nodes are not known before it starts): an actor's threads are its own CPUs, num_cpus
    rounded down, at least one."""
    out = {k: t for k, (_, _, t) in pools.items() if t != "auto"}
    auto = [k for k, (_, _, t) in pools.items() if t == "auto"]
    if cores is None:
        return {**out, **{k: max(1, math.floor(pools[k][1] + 1e-9)) for k in auto}}
    for stage in stages(overlapped, pools["generators"][0]):
        members = [k for k in stage if k in auto]
        if not members:
            continue
        budget = max(0, cores - sum(pools[k][0] * out[k] for k in stage if k not in auto))
        weight = {k: pools[k][0] * pools[k][1] for k in members}
        if not sum(weight.values()):
            weight = {k: float(pools[k][0]) for k in members}
        ideal = {k: budget * weight[k] / sum(weight.values()) / pools[k][0] for k in members}
        threads = {k: max(1, math.floor(ideal[k] + 1e-9)) for k in members}
        left = budget - sum(pools[k][0] * threads[k] for k in members)
        while left > 0:
            short = [k for k in members if ideal[k] - threads[k] > 1e-9 and pools[k][0] <= left]
            if not short:
                break
            k = max(short, key=lambda m: ideal[m] - threads[m])
            threads[k] += 1
            left -= pools[k][0]
        out.update(threads)
    return out


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def on_cluster(address: str | None) -> bool:
    """A run that joins a Ray cluster (ray.address, or the RAY_ADDRESS a `ray job submit` job has)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_cores(num_cpus: int | None, machine: int | None = None) -> int:
    """The cores a local Ray run has: ray.num_cpus, never more than this machine's (threads
    beyond the physical cores oversubscribe them whatever Ray is told); the machine's when
    ray.num_cpus is unset (Ray's own default)."""
    machine = machine or machine_cores()
    return min(num_cpus, machine) if num_cpus else machine


def pool_threads(cfg: "Config", cores: int | None) -> dict[str, int]:
    """Each pool's torch threads per actor, `auto` resolved (auto_threads) for `cores`, the
    cores a local Ray run has (None: a cluster, where each actor's own CPUs count)."""
    roles = {k: getattr(cfg.pipeline, k) for k in POOLS}
    return auto_threads({k: (r.num_actors, r.num_cpus, r.torch_threads) for k, r in roles.items()}, cores,
                        cfg.rl.max_staleness > 0)


def thread_warnings(cfg: "Config", machine: int | None = None, cluster: bool | None = None) -> list[str]:
    """The preflight's warnings (not errors: a run that oversubscribes is slower, not wrong)
    when the pools' torch threads that compute at once exceed the cores (this module's
    docstring gives the rule): on a local Ray the peak over the stages against ray.num_cpus (at most
    `machine`'s cores, this machine's when None); on a cluster (`cluster`, default: from
    ray.address / RAY_ADDRESS), each actor's threads against its own CPUs, as Ray places
    actors by their num_cpus."""
    roles = {k: getattr(cfg.pipeline, k) for k in POOLS}
    cluster = cluster if cluster is not None else on_cluster(cfg.ray.address)
    cores = None if cluster else local_cores(cfg.ray.num_cpus, machine)
    threads = pool_threads(cfg, cores)  # `auto` as it resolves here
    if cluster:
        return [f"pipeline.{k}: {threads[k]} torch threads per actor on {r.num_cpus:g} CPUs: Ray may place other "
                f"actors on the cores those threads compute on; set torch_threads <= num_cpus (or auto)"
                for k, r in roles.items() if threads[k] > max(1, math.ceil(r.num_cpus - 1e-9))]
    pools = {k: (r.num_actors, r.num_cpus, threads[k]) for k, r in roles.items()}
    overlapped = cfg.rl.max_staleness > 0
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
