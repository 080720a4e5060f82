"""LoRA adapters (model.lora) through PEFT: wrapping a causal LM, the adapter's tensors under
PEFT's own names, and the adapter folder PEFT, vLLM and `rlaif-ray export` read.

The adapters are injected into the transformers model in place (`wrap` returns the PeftModel;
its `get_base_model()` is the same model object, now holding LoRA layers), so every caller
keeps running the transformers model as before; the PeftModel is kept for
`disable_adapter()` (the reference policy: the base model) and the state-dict helpers.

An adapter folder is PEFT's format: adapter_config.json and adapter_model.safetensors, the
tensors named as `PeftModel.save_pretrained` names them
(base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: no adapter name).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # a PeftModel's prefix before the transformers model's own names
# the adapter's name inside a parameter's name (lora_A.default.weight): PEFT saves it without
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")


def as_dict(lora) -> dict | None:
    """model.lora (a LoraConfig, its dict, or None) as a plain dict (what actors pass around)."""
    if lora is None:
        return None
    return dict(lora) if isinstance(lora, dict) else lora.model_dump()


def peft_config(lora, base_model: str | None = None):
    """PEFT's LoraConfig for model.lora (r, alpha, dropout, target_modules), no bias."""
    from peft import LoraConfig, TaskType

    lora = as_dict(lora)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(lora["r"]), lora_alpha=float(lora["alpha"]),
                      lora_dropout=float(lora["dropout"]), target_modules=lora["target_modules"], bias="none",
                      base_model_name_or_path=base_model)


def wrap(model, lora):
    """`model` (a transformers causal LM) with LoRA adapters injected in place: returns the
    PeftModel; only the adapters require gradients (the base weights are frozen). The
    adapters start as the identity (B = 0): the wrapped model computes what `model` did."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora, getattr(model, "name_or_path", None)))


def peft_name(name: str) -> str:
    """A parameter's name in the transformers model (model.layers.0...lora_A.default.weight)
    as PEFT saves it (base_model.model.model.layers.0...lora_A.weight)."""
    return PREFIX + _ADAPTER_SEGMENT.sub(r".\1", name)


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def adapter_params(model) -> list:
    """(PEFT name, parameter) of every adapter tensor of a wrapped transformers model (its
    named_parameters order: fixed)."""
    return [(peft_name(n), p) for n, p in model.named_parameters() if is_adapter(n)]


def target_problem(module_names, targets) -> str | None:
    """Why model.lora.target_modules does not fit a model whose modules are `module_names`:
    a name that no module's name ends with (None: every one matches; all-linear always does)."""
    if targets == "all-linear":
        return None
    names = list(module_names)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return None
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
    return f"no module of the model is named {', '.join(missing)} (its module names end with: {', '.join(leaves)})"


def write_adapter(folder: str | Path, tensors: dict, lora, base_model: str | None = None) -> Path:
    """An adapter folder (PEFT's format) from {PEFT name: tensor}; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config(lora, base_model).save_pretrained(str(folder))
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    return folder


def read_adapter(folder: str | Path) -> tuple[dict, dict]:
    """(the tensors of an adapter folder by PEFT name, its adapter_config.json)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(str(folder / WEIGHTS_FILE)), json.loads((folder / CONFIG_FILE).read_text())


def shared_adapter_folder(tensors: dict, lora, tag: str) -> str:
    """An adapter folder for a vLLM engine (its engine process reads it by path): in /dev/shm
    (memory) where it has room, else the temp folder; readable by this user only. The caller
    removes it (shutil.rmtree) once the engine no longer needs it."""
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.1 * size + (64 << 20) \
        else tempfile.gettempdir()
    folder = tempfile.mkdtemp(prefix=f"rlaif-ray-adapter-{tag}-", dir=base)
    try:
        write_adapter(folder, tensors, lora)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def load_into(peft_model, tensors: dict) -> None:
    """Install an adapter's tensors ({PEFT name: tensor}, as the learner sends them) into a
    wrapped model in place (set_peft_model_state_dict), strictly: every adapter tensor of the
    model comes, and nothing else."""
    from peft import set_peft_model_state_dict

    mine = {k for k, _ in adapter_params(peft_model.get_base_model())}
    missing, unexpected = sorted(mine - set(tensors)), sorted(set(tensors) - mine)
    if missing or unexpected:
        raise ValueError(f"adapter update does not match the model's adapters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (model.lora differs between learner and generator?)")
    set_peft_model_state_dict(peft_model, tensors)
