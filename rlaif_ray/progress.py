"""Terminal progress bars over Ray futures (tqdm, on stderr): model loading, generation,
labeling and evaluation advance as each remote call finishes."""
from __future__ import annotations


def gather(refs: list, desc: str, enabled: bool = True, unit: str = "call", timeout: float | None = None) -> list:
    """ray.get(refs) in order, with a bar that moves as each one completes. A failed call
    raises as ray.get would; `timeout` bounds the whole wait."""
    import time

    import ray
    from tqdm import tqdm

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
