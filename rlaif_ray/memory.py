"""Peak memory of this process over a block of code, sampled (weight updates report the
extra memory a receiver needed: one bucket on the broadcast path, a model copy on the
object-store path)."""
from __future__ import annotations

import threading


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.extra_mb: the peak resident set size during the block
    minus the size at its start, sampled every `every_s` (short spikes can be missed), plus
    the CUDA allocator's peak growth when a GPU is in use."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.extra_mb, self.cuda_extra_mb = every_s, 0.0, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        import psutil
        import torch

        self._proc = psutil.Process()
        self._start = self._peak = self._proc.memory_info().rss
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            self._cuda_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.extra_mb = (self._peak - self._start) / 2**20
        if self._cuda:
            self.cuda_extra_mb = (torch.cuda.max_memory_allocated() - self._cuda_start) / 2**20


def trim_heap() -> None:
    """Hand freed heap back to the OS: glibc keeps it (a learner's backward pass frees GBs, a
    generator's batch its KV cache), and an idle actor would hold it while another peaks.
    Under jemalloc (the learner's allocator where Ray ships one: bundled_jemalloc) its
    arenas' unused pages are purged instead."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    if allocator() == "jemalloc":  # preloaded (the learner, bundled_jemalloc)
        # MALLCTL_ARENAS_ALL = 4096: every arena's dirty and muzzy pages back to the OS now
        ctypes.CDLL(None).mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def allocator() -> str:
    """This process's malloc: "jemalloc" (preloaded) or "system"."""
    import ctypes
    import sys

    if sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallctl"):
        return "jemalloc"
    return "system"


def bundled_jemalloc() -> str | None:
    """The jemalloc shared library Ray's Linux wheels ship (ray/core/libjemalloc.so), or None.
    The learner runs on it (actors.ray_session.learner_malloc_env): torch's activations are
    freed and re-allocated every step, which glibc either keeps (its heap grows by about
    1 GiB over the live peak) or, with a small fixed mmap threshold, returns and page-faults
    back in on every allocation (about a third slower); jemalloc reuses them at about
    glibc's speed and stays within 0.1 GiB of the live peak (BENCHMARKS.md "Settings chosen
    by measurement")."""
    import importlib.util
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return None
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "core", "libjemalloc.so")
    return path if os.path.isfile(path) else None
