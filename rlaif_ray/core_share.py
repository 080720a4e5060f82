"""Idle cores lent to the actors that compute (pipeline.share_idle_cores; README "Threads
that fit the cores").

Overlapped on a small machine, every actor gets the threads that fit when all three pools
compute at once (on 2 cores, one each), yet much of the time some of them wait: the
generator for the next weights, the labeler for the next rollouts, the learner for the next
batch. Their cores then sit idle. A CoreShare lets the actors of one node see each other:
a small shared table (one int per actor, in /dev/shm) holds the threads each actor computes
with now, 0 while it waits. At the start of a compute call and at every decoder layer
(forward, and backward through a gradient hook), an actor takes the cores the others leave,
never fewer than its own torch_threads and never more than the node's cores:

    mine = max(floor, min(cores, cores - sum(others)))

Two actors that start at the same moment may both take the idle cores for one layer; each
sees the other at its next layer (milliseconds) and gives them back. Each actor writes only
its own slot, so the table needs no lock. Thread counts change only between operations, in
the thread that computes, and drop back to the actor's own torch_threads when a call ends
(the table then says 0). On the CPU measured (torch 2.13 with MKL and OpenMP, AVX-512) the
policy's forward and backward, the labeler's rewards and its reference log-probs were
bitwise the same at 1 and 2 threads; tests/test_core_share.py checks they agree to rounding,
as BLAS libraries do not promise more.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import time
import uuid
from contextlib import contextmanager

SLOTS = 256  # actors of one run on one node (slots are handed out by pool, see share_spec)


def table_path(tag: str) -> str:
    """A new table's file: in /dev/shm (memory) where there is one, else the temp folder."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:60]
    return os.path.join(base, f"rlaif-ray-cores-{safe}-{uuid.uuid4().hex[:8]}")


def create_table(path: str) -> str:
    """The driver creates the table before the actors open it (zeros: nobody computes);
    readable by this user only."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"\0" * (SLOTS * 4))
    return path


def remove_table(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (its `_no_split_modules` classes, as FSDP
    shards them), found inside any wrapper (the learner's ResponseScorer); [] if none."""
    hf = next((m for m in model.modules() if getattr(m, "_no_split_modules", None)), None)
    names = set(hf._no_split_modules) if hf is not None else set()
    return [m for m in model.modules() if type(m).__name__ in names]


class CoreShare:
    """One actor's view of its node's table. `spec` None: off (the actor keeps its
    torch_threads and computes() only times the calls). `elastic` False: the actor is counted
    while it computes but keeps its threads (a vLLM engine, whose threads are fixed at start)."""

    def __init__(self, spec: dict | None, floor: int, elastic: bool = True):
        self.floor, self.current = max(1, floor), max(1, floor)
        self.elastic = elastic and spec is not None
        self.active, self.busy_s, self.thread_s, self._t = False, 0.0, 0.0, 0.0
        self.changes = 0  # thread-count changes made (how often the share moved)
        self.view = None
        if spec is not None:
            self.cores, self.slot = int(spec["cores"]), int(spec["slot"])
            self.slots = int(spec.get("slots", SLOTS))  # the run's actors: the part of the table summed
            if not 0 <= self.slot < self.slots <= SLOTS:
                raise ValueError(f"core share: slot {self.slot} outside 0..{min(self.slots, SLOTS) - 1}")
            fd = os.open(spec["path"], os.O_RDWR)
            try:
                self._mm = mmap.mmap(fd, SLOTS * 4)
            finally:
                os.close(fd)
            self.view = memoryview(self._mm).cast("i")
            self.view[self.slot] = 0  # a restarted actor starts idle

    def others(self) -> int:
        """Threads the other actors of this node compute with now."""
        return sum(self.view[:self.slots]) - self.view[self.slot]

    def acquire(self) -> int:
        """Take this actor's share now (inside a compute call); returns its threads."""
        if self.view is None:
            return self.current
        now = time.perf_counter()
        self._count(now)
        if self.elastic:
            n = max(self.floor, min(self.cores, self.cores - self.others()))
            if n != self.current:
                import torch

                torch.set_num_threads(n)
                self.current, self.changes = n, self.changes + 1
        self.view[self.slot] = self.current
        return self.current

    def _count(self, now: float) -> None:
        """The slice since the last count: busy seconds and thread-seconds add the same slices,
        so an actor that kept one thread count has exactly that mean."""
        if self.active:
            self.busy_s += now - self._t
            self.thread_s += (now - self._t) * self.current
        self._t = now

    def release(self) -> None:
        """Idle: 0 in the table, and back to the actor's own threads, so that work outside a
        compute call (weight installs, checkpoints) never runs on cores lent meanwhile."""
        if self.view is None:
            return
        self._count(time.perf_counter())
        self.view[self.slot] = 0
        if self.elastic and self.current != self.floor:
            import torch

            torch.set_num_threads(self.floor)
            self.current = self.floor

    @contextmanager
    def computing(self):
        """Around a compute call: the actor counts as busy with its share, and its busy and
        thread-seconds are kept (threads_mean; with the share off, busy seconds only)."""
        self._t = t0 = time.perf_counter()
        self.active = True
        self.acquire()
        try:
            yield self
        finally:
            self.release()
            self.active = False
            if self.view is None:
                self.busy_s += time.perf_counter() - t0

    def threads_mean(self) -> float | None:
        """Mean threads while computing (thread-seconds / busy seconds); None before any call
        or when the share is off."""
        return self.thread_s / self.busy_s if self.view is not None and self.busy_s > 0 else None

    def attach(self, model) -> int:
        """Re-take the share at each decoder layer of `model`, forward and backward (a
        gradient hook on each layer's output); returns the layers hooked (0 when off)."""
        if not self.elastic:
            return 0
        layers = decoder_layers(model)
        for layer in layers:
            layer.register_forward_pre_hook(self._before_layer)
            layer.register_forward_hook(self._after_layer)
        return len(layers)

    def _before_layer(self, module, args) -> None:
        if self.active:
            self.acquire()

    def _after_layer(self, module, args, out) -> None:
        h = out[0] if isinstance(out, tuple) else out
        if self.active and getattr(h, "requires_grad", False):
            h.register_hook(self._on_grad)

    def _on_grad(self, grad) -> None:
        if self.active:
            self.acquire()

    def close(self) -> None:
        if self.view is not None:
            self.view[self.slot] = 0
            self.view.release()
            self._mm.close()
            self.view = None
