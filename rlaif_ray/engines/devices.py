"""Devices and precision: one rule for where a role runs and in which dtype it computes, and
a guard that catches tensors built without a device inside the project's own code.

A CPU-only torch cannot place a transformers model on a (fake) CUDA device, so the GPU path
cannot be executed here. The guard is the strongest check that does run on CPU: every
tensor the project creates during a step must name its device (or inherit one, as the
`*_like` functions and `.to(x.device)` do). A factory call from rlaif_ray/ or actors/
without `device=` is exactly the bug that works on CPU and fails on the first CUDA step
("expected all tensors to be on the same device"). See `DeviceGuard` for its reach.
"""
from __future__ import annotations

import os
import sys
from typing import Literal

import torch
from torch.overrides import TorchFunctionMode

Precision = Literal["auto", "float32", "bfloat16"]


def role_device(num_gpus: float) -> str:
    """The device of an actor given its Ray GPU share: Ray sets CUDA_VISIBLE_DEVICES, so the
    actor's GPU is always `cuda` (index 0 of what it sees)."""
    return "cuda" if num_gpus > 0 else "cpu"


def collective_backend(device: str) -> str:
    """torch.distributed backend for tensors on `device`: NCCL for CUDA, gloo for CPU."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def collective_device(backend: str) -> str:
    """Where a group's tensors must live: NCCL moves CUDA tensors only."""
    return "cuda" if backend == "nccl" else "cpu"


def compute_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (tensor cores; fp32 master weights are kept where weights are
    trained), float32 on CPU (bf16 matmuls are slower than fp32 on most CPUs)."""
    _check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, precision)


def _check_precision(precision: str) -> None:
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"model.dtype: unknown precision {precision!r} (auto, float32 or bfloat16)")


def cpu_capabilities() -> dict:
    """This CPU's instruction sets as torch reports them ({} where torch cannot say)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get else {}
    except Exception:  # an unknown CPU: no claim of fast bf16
        return {}


def vllm_dtype(precision: str, device: str | torch.device, caps: dict | None = None, choice: str = "auto") -> str:
    """The dtype a vLLM engine holds its weights in. `choice` (a pool's vllm.dtype), unless
    auto, is taken as given on any device. Else by `precision` (model.dtype): `bfloat16` is
    honoured everywhere; `auto` and `float32` give bf16 on CUDA (vLLM's GPU default; the
    learner's importance ratio corrects the small precision gap) and on CPUs whose bf16 vLLM's
    CPU backend computes with vector instructions (AVX-512, whose BF16 extension or AMX make it
    faster still, or Arm's BF16), float32 on the rest. On an AVX2-only CPU the bf16 matmuls are
    emulated: the same engine sampled 3.1x the tokens/s in fp32 (BENCHMARKS.md, "Generation
    throughput")."""
    _check_precision(precision)
    if choice != "auto":
        if choice not in ("bfloat16", "float32"):
            raise ValueError(f"vllm.dtype must be auto, bfloat16 or float32, not {choice!r}")
        return choice
    if precision == "bfloat16" or torch.device(device).type == "cuda":
        return "bfloat16"
    caps = cpu_capabilities() if caps is None else caps
    arm = str(caps.get("architecture", "")).startswith(("aarch64", "arm"))
    fast = any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "avx512_f")) or (arm and caps.get("bf16"))
    return "bfloat16" if fast else "float32"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def enable_tf32(device: str | torch.device) -> None:
    """TF32 for the fp32 matmuls that remain on GPU (master-weight updates, the fp32 log-softmax
    inputs stay exact: TF32 only affects matmul/conv inputs)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# factory functions whose result lands on the default device unless `device=` is given
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}
_OWN = tuple(os.sep + d + os.sep for d in ("rlaif_ray", "actors"))


class DeviceGuard(TorchFunctionMode):
    """Records every tensor factory call made from the project's own code (rlaif_ray/,
    actors/) without an explicit `device=`, with the file and line.

    What it catches: a tensor built on the default (CPU) device that then meets a model on
    another device: ids, masks, positions, behaviour log-probs, rewards, flags. Calls
    whose input is already a tensor (`torch.as_tensor(t)`) keep their input's device and
    are not flagged.
    What it cannot catch: a tensor created with an explicit but wrong device, a `.cpu()`
    in the wrong place, code inside torch/transformers, kernels that do not exist or
    differ on CUDA (fused AdamW, NCCL, bf16 numerics): `make gpu-check` on a GPU covers those.
    """

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None and not (args and torch.is_tensor(args[0])):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(("devices.py", "overrides.py")):
                frame = frame.f_back
            where = frame.f_code.co_filename if frame is not None else ""
            if any(d in where for d in _OWN) and os.sep + "tests" + os.sep not in where:
                self.violations.append(f"{os.path.relpath(where)}:{frame.f_lineno}: torch.{func.__name__} "
                                       "without device=")
        return func(*args, **kwargs)
