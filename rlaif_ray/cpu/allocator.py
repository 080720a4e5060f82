"""The malloc a CPU actor runs on, and handing freed heap back between phases.

Measured on the quickstart's learner (BENCHMARKS.md, "Settings chosen by measurement"): on
the jemalloc Ray's Linux wheels ship, purged after each step, a step took 18.0 s at 2.89 GiB
peak RSS, against 19.8 s / 3.80 GiB on glibc's defaults (1.10x, and 0.9 GiB less). The
learner's actor is started with `learner_env()` (LD_PRELOAD) and calls `release_heap()` after
each step; generators and labelers stay on glibc and trim after each batch."""
from __future__ import annotations

import os


def release_heap() -> None:
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
    The learner runs on it (learner_env): torch's activations are
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


# glibc with a fixed mmap threshold: freed activations go back to the OS at once, and every
# new one is page-faulted in again (a learner step about a third slower than glibc's default)
GLIBC_LEARNER = (("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "1048576"), ("MALLOC_ARENA_MAX", "2"))


def learner_env() -> dict[str, str]:
    """The environment of a CPU learner's process (rl.release_memory): jemalloc where Ray ships
    one (bundled_jemalloc, preloaded), which reuses a step's freed activations as fast as
    glibc's default and stays within about 0.1 GiB of the live peak, where glibc's default heap
    grows about 1 GiB over it; else glibc with a fixed mmap threshold (as low a peak, a third
    slower). The generators were measured slower on jemalloc (8.1 -> 13.9 s a batch) and keep
    glibc. A value already in the environment wins (an LD_PRELOAD of the user's own)."""
    jemalloc = bundled_jemalloc()
    if jemalloc and "LD_PRELOAD" not in os.environ:
        return {"LD_PRELOAD": jemalloc}
    return {k: os.environ.get(k, v) for k, v in GLIBC_LEARNER}
