"""Weight sync from learner rank 0 to the generators, and its cost model.

Two paths (`pipeline.weight_sync`):
- object_store: rank 0 returns its parameters, cast to the receivers' dtype, as numpy
  arrays (`pack`: bf16 travels as its raw 16-bit pattern, numpy has no bf16); Ray's object
  store carries them (zero-copy readers on one node, node-to-node transfers across a
  cluster) and every generator stages them (`unpack`). Works everywhere; the CPU default.
- broadcast: rank 0 and the generators form a process group of their own (NCCL on GPU,
  gloo on CPU), beside the learner's training group. Rank 0 broadcasts a header
  (version, tensor count) and then every parameter in a fixed order (the spec rank 0 gave
  the receivers when the group formed). A receiver checks the version against the one the
  driver told it, after reading every tensor so the group stays in step.

The driver waits for every member with `pipeline.sync_timeout_s` and names the ones that
did not answer (driver.wait_named).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass


class WeightVersionError(RuntimeError):
    pass


def host_store(host: str, world: int, timeout_s: float):
    """Rank 0's TCP store on a port the OS picks (`store.port`): nothing to race for, unlike
    probing a free port and binding it later. It does not wait for the others here."""
    import torch.distributed as dist

    return dist.TCPStore(host, 0, world, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_store(master: str, port: int, world: int, timeout_s: float):
    """Ranks 1..world-1: a client of rank 0's store."""
    import torch.distributed as dist

    return dist.TCPStore(master, port, world, False, timeout=datetime.timedelta(seconds=timeout_s))


def open_group(master: str, port: int, rank: int, world: int, backend: str, timeout_s: float, name: str = "weights",
               store=None):
    """A standalone process group on rank 0's store (`store`: rank 0 passes the one it hosts).
    It does not touch torch's default group, so the learner keeps its own gloo/NCCL group
    for gradients."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.PrefixStore(name, store if store is not None else join_store(master, port, world, timeout_s))
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def pack(named, dtype: str) -> dict:
    """{name: tensor} (or (name, tensor) pairs) -> an object-store payload in `dtype`:
    numpy arrays (zero-copy through Ray's store); bfloat16 as its int16 bit pattern."""
    import torch

    want = getattr(torch, dtype)
    items = named.items() if isinstance(named, dict) else named
    arrays = {}
    for k, t in items:
        t = t.detach().to(device="cpu", dtype=want).contiguous()
        arrays[k] = (t.view(torch.int16) if want == torch.bfloat16 else t).numpy()
    return {"dtype": dtype, "arrays": arrays}


def unpack(payload: dict) -> dict:
    """The inverse of `pack`: {name: torch tensor} in the payload's dtype (no copy)."""
    import torch

    import warnings

    dtype = payload["dtype"]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arrays from the object store are read-only; they are only read
        for k, a in payload["arrays"].items():
            t = torch.from_numpy(a)
            out[k] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


def _broadcast(group, tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def spec(named: list[tuple[str, "object"]]) -> list[tuple[str, list[int], str]]:
    """What receivers allocate: (name, shape, dtype) in the order rank 0 sends."""
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in named]


def send(group, named, version: int, device: str = "cpu", count: int | None = None) -> int:
    """Rank 0: the header, then every tensor of `named` ((name, tensor) pairs; an iterator
    that gathers shards one at a time needs `count`). Returns the bytes sent."""
    import torch

    count = len(named) if count is None else count
    _broadcast(group, torch.tensor([version, count], dtype=torch.int64, device=device))
    sent = 0
    for _, t in named:
        t = t.detach().to(device).contiguous()
        _broadcast(group, t)
        sent += t.numel() * t.element_size()
    return sent


def receive(group, tensor_spec: list, version: int, who: str, device: str = "cpu") -> dict:
    """A generator: read the header and every tensor; refuse a version other than the one
    expected (the tensors are still read, so the group stays in step)."""
    import torch

    header = torch.zeros(2, dtype=torch.int64, device=device)
    _broadcast(group, header)
    sent_version, count = (int(x) for x in header.tolist())
    if count != len(tensor_spec):
        raise WeightVersionError(f"{who}: rank 0 sent {count} tensors, the spec has {len(tensor_spec)}")
    out = {}
    for name, shape, dtype in tensor_spec:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        _broadcast(group, t)
        out[name] = t
    if sent_version != version:
        raise WeightVersionError(f"{who} expected weights version {version} but rank 0 sent version {sent_version}")
    return out


@dataclass
class SyncCost:
    bytes: float
    seconds: float


def sync_cost(params: float, bytes_per_param: float, gbytes_per_s: float, hops: int = 1,
              latency_s: float = 0.0) -> SyncCost:
    """Time to move one policy version: bytes / bandwidth per hop, plus a fixed latency.
    NCCL's pipelined ring/tree broadcast costs about one hop at bus bandwidth whatever the
    number of receivers; the object-store path costs one hop per node that pulls a copy
    (Ray pulls from any node already holding one, so about log2(nodes) rounds)."""
    size = params * bytes_per_param
    return SyncCost(size, hops * size / (gbytes_per_s * 1e9) + latency_s)
