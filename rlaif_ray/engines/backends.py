"""The engine backends by name: `hf` (transformers) and `vllm`."""
from __future__ import annotations


def load_engine(backend: str, model_name: str, device: str = "cpu", dtype: str = "auto",
                prefix_sharing: str = "auto", vllm: dict | None = None, lora: dict | None = None, **vllm_kwargs):
    """An engine by backend name: `hf` (transformers) or `vllm` (imported only when asked for;
    `vllm`: a pool's VLLMConfig as a dict). `lora` (model.lora as a dict): the engine takes
    the policy as LoRA adapters (`load_adapter`) on its base model."""
    if backend == "vllm":
        from rlaif_ray.engines.vllm_engine import VLLMEngine

        kwargs = {**(vllm or {}), **vllm_kwargs}
        # `dtype` is model.dtype; the pool's vllm.dtype (VLLMConfig) is the engine's own choice
        kwargs["weight_dtype"] = kwargs.pop("dtype", "auto")
        return VLLMEngine(model_name, dtype=dtype, device=device, lora=lora, **kwargs)
    if backend != "hf":
        raise ValueError(f"unknown engine backend {backend!r} (hf or vllm)")
    from rlaif_ray.engines.hf import HFEngine

    engine = HFEngine(model_name, device=device, dtype=dtype, prefix_sharing=prefix_sharing)
    if lora:
        engine.enable_lora(lora)
    return engine
