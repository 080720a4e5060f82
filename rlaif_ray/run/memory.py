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
