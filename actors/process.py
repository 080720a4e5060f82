"""What every actor needs, in one small object each role holds (composition, not a base
class): its torch threads, one busy clock, its dashboard metrics and the fields of `info()`;
on a CPU, the process-level measures of rlaif_ray.cpu, applied here at start-up and at the
end of each compute call, never inside model code.

    self.proc = ActorProcess("generator", name, torch_threads, device)
    self.proc.tune(model)               # start-up: CPU attention for sampling and label reads
    with self.proc.busy():              # one compute call: timed, metrics, heap handed back
        ...
    return self.proc.info(version=...)  # name, role, pid, busy seconds, and the role's own fields
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from .metrics import RoleMetrics


def engine_died(name: str, detail: str) -> None:
    """vLLM's engine process died inside this live actor (a GPU fault, an OOM kill, an NCCL
    abort): the engine cannot be restarted in place, so the actor ends as if it had crashed.
    Ray then restarts it (max_restarts) and the driver's recovery runs as for any dead actor:
    the shard re-dispatched once the new process has the current weights."""
    print(f"{name}: vLLM's engine process died ({detail}); exiting so Ray restarts this actor", flush=True)
    os._exit(70)


def watch_engine(name: str, engine) -> None:
    """A vLLM engine in processes of its own: end this actor when one of them dies, even in
    the middle of a call that would otherwise wait on it for ever (VLLMEngine.watch_engine)."""
    if hasattr(engine, "watch_engine"):
        engine.watch_engine(lambda pid: engine_died(name, f"process {pid} exited"))


@contextmanager
def exit_if_engine_dead(name: str):
    """A call that raised vLLM's EngineDeadError: engine_died."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ == "EngineDeadError":  # vllm.v1.engine.exceptions; no vLLM import on other paths
            engine_died(name, f"{type(err).__name__}: {err}")
        raise


class ActorProcess:
    """`role`: generator, labeler, learner, reward_model, endpoint (the dashboard's tag);
    `device`: cpu or cuda (rlaif_ray.engines.devices.role_device); `release_memory`: hand
    freed heap back to the OS after each compute call (CPU only; rlaif_ray.cpu.allocator)."""

    def __init__(self, role: str, name: str, torch_threads: int, device: str = "cpu", release_memory: bool = True):
        torch.set_num_threads(torch_threads)
        self.role, self.name, self.device = role, name, device
        self.busy_s = 0.0  # seconds inside compute calls, the only busy clock of the actor
        self.metrics = RoleMetrics(role, name)
        self._release, self.allocator = None, None
        if device == "cpu":
            from rlaif_ray.cpu.allocator import allocator, release_heap

            self.allocator = allocator()  # jemalloc where its start-up environment preloads it
            self._release = release_heap if release_memory else None

    def tune(self, model):
        """On a CPU, grouped-query attention without copied KV heads (rlaif_ray.cpu.attention:
        generation 1.17x on the quickstart) for a model that samples or reads labels; unchanged
        elsewhere. Call once, after the model loads."""
        if self.device == "cpu":
            from rlaif_ray.cpu.attention import use_cpu_gqa

            use_cpu_gqa(model)
        return model

    @contextmanager
    def busy(self, metric: str = "batch_s"):
        """Around one compute call: its seconds count as busy and go to the dashboard as
        `metric`; then (CPU) the heap the call freed goes back to the OS. A dead engine
        process ends the actor (exit_if_engine_dead)."""
        t0 = time.perf_counter()
        try:
            with exit_if_engine_dead(self.name):
                yield
        finally:
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.metrics.observe(metric, dt)
            if self._release is not None:
                self._release()

    def info(self, **fields) -> dict:
        """The actor's `info()`: name, role, pid, busy seconds and (CPU) its malloc, plus the
        role's own fields."""
        return {"name": self.name, "role": self.role, "pid": os.getpid(), "busy_s": self.busy_s,
                "allocator": self.allocator, **fields}
