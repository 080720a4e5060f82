"""Weight sync from learner rank 0 to the generators, and its cost model.

Two paths (`pipeline.weight_sync`):
- object_store: rank 0 returns its parameters, cast to the receivers' dtype, as numpy
  arrays (`pack`: bf16 travels as its raw 16-bit pattern, numpy has no bf16); Ray's object
  store carries them (zero-copy readers on one node, node-to-node transfers across a
  cluster) and every generator stages them (`unpack`). Works everywhere; the CPU default.
- broadcast: rank 0 and the generators (every tensor-parallel worker of a vLLM engine is a
  rank) form a process group of their own (NCCL on GPU, gloo on CPU), beside the learner's
  training group. Rank 0 broadcasts a header (version, tensor count, bucket size) and then
  the parameters in buckets of at most `pipeline.sync_bucket_mb`, in a fixed order (the spec
  rank 0 gave the receivers when the group formed), already cast to the receivers' dtype.
  Each receiver loads a bucket into its model as it arrives (vLLM: `reload_weights` with an
  iterator, layer by layer), so its extra memory is one bucket, never a model copy. A
  receiver checks the version before loading anything; told another version, it still
  reads every bucket (the group stays in step) and refuses.

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
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout  # a member that never arrives fails the collective instead of hanging it
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def pack(named, dtype: str, adapter: bool = False) -> dict:
    """(name, tensor) pairs -> an object-store payload in `dtype`: numpy arrays (zero-copy
    through Ray's store); bfloat16 as its int16 bit pattern. `adapter`: the pairs are a LoRA
    adapter's tensors under PEFT's names (model.lora), not the model's weights."""
    import torch

    want = getattr(torch, dtype)
    arrays = {}
    for k, t in named:
        t = t.detach().to(device="cpu", dtype=want).contiguous()
        arrays[k] = (t.view(torch.int16) if want == torch.bfloat16 else t).numpy()
    return {"dtype": dtype, "arrays": arrays, **({"adapter": True} if adapter else {})}


def unpack(payload: dict) -> dict:
    """The inverse of `pack`: {name: torch tensor} in the payload's dtype (no copy)."""
    import warnings

    import torch

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


def plan_buckets(tensor_spec: list, bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensor_spec` ((name, shape, dtype) in send order) grouped into buckets of at
    most `bucket_bytes` (a tensor larger than that is a bucket of its own). Sender and
    receivers compute the same plan from the same spec, so only raw bytes travel."""
    buckets, cur, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(tensor_spec):
        n = nbytes(shape, dtype)
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def nbytes(shape, dtype: str) -> int:
    """Bytes of a tensor of `shape` in `dtype` (a name: "bfloat16")."""
    import torch

    n = torch.empty((), dtype=getattr(torch, dtype), device="meta").element_size()
    for d in shape:
        n *= int(d)
    return n


def send_buckets(group, named, tensor_spec: list, version: int, bucket_bytes: int, device: str = "cpu") -> dict:
    """Rank 0: a header (version, tensor count, bucket size), then each bucket of `named`
    ((name, tensor) in spec order, already in the spec's dtype; an iterator that gathers one
    shard at a time keeps the learner's extra memory at one bucket) as one flat byte buffer.
    Returns the bytes sent and the largest bucket."""
    import torch

    _broadcast(group, torch.tensor([version, len(tensor_spec), bucket_bytes], dtype=torch.int64, device=device))
    it = iter(named)
    sent = largest = 0
    for idx in plan_buckets(tensor_spec, bucket_bytes):
        sizes = [nbytes(tensor_spec[i][1], tensor_spec[i][2]) for i in idx]
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        offset = 0
        for i, n in zip(idx, sizes):  # each gathered tensor is copied in and dropped: bucket + one tensor
            name, t = next(it)
            if name != tensor_spec[i][0]:
                raise WeightVersionError(f"rank 0 sends {name} where the spec has {tensor_spec[i][0]}")
            buf[offset:offset + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
            offset += n
            del t
        _broadcast(group, buf)
        sent += buf.numel()
        largest = max(largest, buf.numel())
        del buf
    if str(device).startswith("cuda"):
        # NCCL's wait() only orders this device's stream after the broadcast; the host returns
        # at once. Wait for the transfer so the caller's clock (weight_broadcast_s) measures it
        torch.cuda.synchronize(device)
    return {"bytes": sent, "largest_bucket": largest}


def receive_header(group, tensor_spec: list, bucket_bytes: int, who: str, device: str = "cpu") -> int:
    """A receiver: read rank 0's header; returns the version it is sending."""
    import torch

    header = torch.zeros(3, dtype=torch.int64, device=device)
    _broadcast(group, header)
    sent_version, count, sent_bucket = (int(x) for x in header.tolist())
    if count != len(tensor_spec) or sent_bucket != bucket_bytes:
        raise WeightVersionError(f"{who}: rank 0 sent {count} tensors in buckets of {sent_bucket} bytes, "
                                 f"the spec has {len(tensor_spec)} in buckets of {bucket_bytes}: rebuild the group")
    return sent_version


def receive_stream(group, tensor_spec: list, bucket_bytes: int, device: str = "cpu", keep: bool = True):
    """After the header: yields (name, tensor) bucket by bucket as they arrive (views into one
    bucket's buffer, valid until the next bucket), so a loader that copies each into place
    holds one bucket beyond its model. keep=False reads and drops every bucket (a refused
    version: the group stays in step)."""
    import torch

    for idx in plan_buckets(tensor_spec, bucket_bytes):
        sizes = [nbytes(tensor_spec[i][1], tensor_spec[i][2]) for i in idx]
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        _broadcast(group, buf)
        offset = 0
        for i, n in zip(idx, sizes):
            name, shape, dtype = tensor_spec[i]
            if keep:
                yield name, buf[offset:offset + n].view(getattr(torch, dtype)).view(shape)
            offset += n
        del buf


def receive_into(load, group, tensor_spec: list, version: int, who: str, bucket_bytes: int, device: str = "cpu"):
    """A receiver: the header, then `load(stream)` with the buckets as they arrive; a version
    other than `version` is refused before anything is loaded (its buckets are still read, so
    the group stays in step) with WeightVersionError naming `who`."""
    sent = receive_header(group, tensor_spec, bucket_bytes, who, device)
    if sent != version:
        for _ in receive_stream(group, tensor_spec, bucket_bytes, device, keep=False):
            pass
        raise WeightVersionError(f"{who} expected weights version {version} but rank 0 sent version {sent}")
    return load(receive_stream(group, tensor_spec, bucket_bytes, device))


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
