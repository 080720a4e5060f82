"""The weight-sync protocol between learner rank 0 and the generators, from the driver: the
object-store path (every generator stages the version and acknowledges it) and the broadcast
path (a process group of rank 0 and every generator's engine workers, NCCL on GPU and gloo on
CPU; rlaif_ray/engines/weight_sync.py moves the bytes). Every wait is bounded by
pipeline.sync_timeout_s and names the actors that did not answer."""
from __future__ import annotations

import ray

from rlaif_ray.engines.devices import collective_backend
from rlaif_ray.engines.weight_sync import WeightVersionError


class WeightSyncTimeout(RuntimeError):
    """A member of a weight sync did not answer within pipeline.sync_timeout_s."""


def wait_named(refs: list, names: list[str], timeout: float, what: str) -> list:
    """Results of `refs`, or WeightSyncTimeout naming every actor that did not answer
    within `timeout` seconds (never a hang)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        ray.get(ready)  # a member that died is the cause: raise its error, not the timeout
        late = [n for n, r in zip(names, refs) if r not in ready]
        raise WeightSyncTimeout(f"{what} not acknowledged within {timeout:.0f}s by {late}")
    return ray.get(refs)  # re-raises an actor's own error


def check_acks(acks: list[int], names: list[str], version: int) -> None:
    wrong = [f"{n} holds version {a}" for n, a in zip(names, acks) if a != version]
    if wrong:
        raise WeightVersionError(f"weight sync to version {version}: {', '.join(wrong)}")


def sync_weights(gens, weights_ref, version: int, timeout: float, names: list[str] | None = None) -> None:
    """The object-store path: every generator stages the weights and acknowledges the
    version it now holds, which must be `version`."""
    names = names or [f"generator-{i}" for i in range(len(gens))]
    acks = wait_named([g.set_weights.remote(weights_ref, version) for g in gens], names, timeout,
                      f"weight sync to version {version}")
    check_acks(acks, names, version)


def broadcast_weights(learners: list, gens, version: int, timeout: float, names: list[str] | None = None,
                      dtype: str = "float32", bucket_mb: float = 256) -> None:
    """The broadcast path: learner rank 0 sends over the weight group (the other ranks take
    part in gathering the shards) while every generator receives; a member that does not
    answer within `timeout` is named."""
    names = names or [f"generator-{i}" for i in range(len(gens))]
    senders = [f"learner-{r}" for r in range(len(learners))]
    out = wait_named([w.broadcast_weights.remote(version, dtype, int(bucket_mb * 2**20)) for w in learners]
                     + [g.receive_weights.remote(version) for g in gens],
                     senders + names, timeout, f"weight broadcast of version {version}")
    check_acks(out[len(learners):], names, version)


def form_weight_group(learner0, gens, device: str, timeout: float, dtype: str = "float32",
                      bucket_mb: float = 256) -> None:
    """Rank 0 and the generators' engine workers (one rank each: a tensor-parallel engine
    brings several) join a new weight-broadcast group (NCCL on GPU, gloo on CPU); formed at
    start and again whenever a member was replaced."""
    ranks = [i["weight_ranks"] for i in ray.get([g.info.remote() for g in gens])]
    first = [1 + sum(ranks[:i]) for i in range(len(gens))]
    backend, world = collective_backend(device), 1 + sum(ranks)
    (master, port), spec = ray.get([learner0.host_store.remote("weights", world, timeout),
                                    learner0.weight_spec.remote(dtype)])
    wait_named([learner0.join_weight_group.remote(master, port, world, backend, timeout)]
               + [g.join_weight_group.remote(master, port, first[i], world, backend, spec, timeout,
                                             int(bucket_mb * 2**20)) for i, g in enumerate(gens)],
               ["learner-0"] + [f"generator-{i}" for i in range(len(gens))], timeout, "forming the weight group")
