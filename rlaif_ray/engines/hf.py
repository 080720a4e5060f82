"""Engines: a frozen-or-synced causal LM behind one interface, used by the generators (sample
rollouts), the labelers (label-token log-probs, CoT rationales) and the completions endpoint.

    generate(prompts, temperature, top_p, top_k, max_new_tokens, seed) -> tokens, logps, truncated
    label_logprobs(seqs, ids, lookback) -> [B, lookback, len(ids)] float32 on the CPU
    complete(seqs, max_new_tokens, temperature, top_k, seed) -> token lists
    sample_with_logprobs(...)  (the completions endpoint's contract)
    continuation_logprobs(prompt, continuation) -> per-token log-probs at T = 1
    load_weights({name: tensor})  (HF checkpoint names; tied LM head may be absent)
    digest() -> a float that changes when the weights change

`HFEngine` (transformers, CPU or CUDA) is here; `VLLMEngine` (vllm_engine.py) has the same
methods; `rlaif_ray.engines.load_engine` picks one by name. No Ray: an actor holds one engine
(actors/generator.py, actors/labeler.py).
"""
from __future__ import annotations

import warnings

import torch

from rlaif_ray.engines import lm


def _lcp(x: list[int], y: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(x), len(y))
    i = 0
    while i < n and x[i] == y[i]:
        i += 1
    return i


class HFEngine:
    """A transformers causal LM on one device. `model` is a loaded model (or a name: loaded
    in `dtype` on `device`). Label-token log-probs share prefixes through a KV cache on CPU
    (`prefix_sharing`) and run as right-padded batches on GPU."""

    def __init__(self, model, tokenizer=None, device: str = "cpu", dtype: str = "auto", prefix_sharing: str = "auto"):
        from rlaif_ray.engines.models import load_model, load_tokenizer

        if isinstance(model, str):
            self.tok = tokenizer or load_tokenizer(model)
            model = load_model(model, dtype, device)
        else:
            self.tok = tokenizer
        self.model = model.eval()
        self.device = lm.model_device(model)
        self.dtype = next(model.parameters()).dtype
        self.pad = self.tok.pad_token_id if self.tok is not None else \
            (model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id)
        self.eos = self.tok.eos_token_id if self.tok is not None else model.config.eos_token_id
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        # auto: on for CPU (single rows beat padded batches there, measured); off on a GPU,
        # where the rows of a padded batch run in parallel
        self.share_prefixes = prefix_sharing == "on" or (prefix_sharing == "auto" and self.device.type == "cpu")
        self.prefix_caching = False  # (vLLM's automatic prefix cache; reported by the generator)
        self._root: tuple | None = None  # (tokens, KV cache of exactly them, weights' versions): see _root_cache

    def _ids(self, rows: list[list[int]], width: int | None = None) -> torch.Tensor:
        """Right-padded [B, width] token ids on the model's device."""
        width = width or max(len(r) for r in rows)
        return torch.tensor([list(r) + [self.pad] * (width - len(r)) for r in rows], dtype=torch.long,
                            device=self.device)

    # ---- generation -------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, temperature, top_p, top_k, max_new_tokens, seed):
        return lm.sample(self.model, prompts, self.pad, self.eos, temperature=temperature, top_p=top_p,
                         top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)

    weight_ranks = 1  # members of the weight group this engine needs (vLLM: its tensor-parallel size)

    def load_weights(self, weights: dict) -> None:
        """Copy new weights (torch tensors, HF names) into the model, cast to its dtype."""
        unknown = [k for k in weights if k not in dict(self.model.named_parameters())]
        if unknown:
            raise ValueError(f"weight update has {len(unknown)} parameters the model lacks, e.g. {unknown[:3]}")
        self.load_stream(weights.items())

    def load_stream(self, stream) -> None:
        """Copy (name, tensor) pairs into the model as they come (a bucket at a time from the
        weight group); every parameter must come once (a tied LM head with its embedding)."""
        params = dict(self.model.named_parameters())
        seen = set()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arrays from the object store are read-only
            for name, t in stream:
                params[name].copy_(t)  # copy_ moves and casts to the parameter's device and dtype
                seen.add(name)
                del t  # a bucket's buffer is freed as soon as its last view is copied
        missing = [k for k in params if k not in seen and not _tied(k, self.model)]
        if missing:
            raise ValueError(f"weight update lacks {len(missing)} parameters, e.g. {missing[:3]}")

    def enable_lora(self, lora) -> None:
        """LoRA adapters (model.lora) injected into the model in place, at the identity (B = 0)
        until the first `load_adapter`: the same config as the learner's, so each sync is the
        adapter's tensors alone."""
        from rlaif_ray.engines import adapters

        self.peft = adapters.wrap(self.model, lora)
        self.model = self.peft.get_base_model().eval()  # the same model object, holding the adapters

    def load_adapter(self, tensors: dict, version: int) -> None:
        """A policy version as adapter tensors ({PEFT name: tensor}), copied in place (cast to
        the model's dtype); `version` is the vLLM engine's concern."""
        from rlaif_ray.engines import adapters

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arrays from the object store are read-only; they are only read
            adapters.load_into(self.peft, tensors)

    def join_weight_group(self, master: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> None:
        from rlaif_ray.engines import weight_sync

        self._group = weight_sync.open_group(master, port, first_rank, world, backend, timeout_s)
        self._group_device = "cuda" if backend == "nccl" else "cpu"

    def receive_weights(self, tensor_spec: list, version: int, who: str, bucket_bytes: int) -> None:
        """One policy version from the weight group, loaded bucket by bucket as it arrives."""
        from rlaif_ray.engines import weight_sync

        weight_sync.receive_into(self.load_stream, self._group, tensor_spec, version, who, bucket_bytes,
                                 self._group_device)

    def continuation_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        with torch.no_grad():
            logp, _, _ = lm.response_logprobs(self.model, [prompt], [continuation], self.pad, 1.0)
        return logp[0].tolist()

    def digest(self) -> float:
        """A cheap fingerprint of the weights (tests check that a sync changed them)."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    # ---- label scoring -------------------------------------------------------------------

    def label_logprobs(self, seqs: list[list[int]], ids: list[int], lookback: int = 1) -> torch.Tensor:
        """[B, lookback, len(ids)] (float32, CPU): log-probs of `ids` as next token after each of
        the last `lookback` positions of each sequence. `share_prefixes`: shared token prefixes
        run once (see _shared); otherwise right-padded batched passes (_padded)."""
        pick = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.share_prefixes and len(seqs) > 1:
            return self._shared(seqs, lookback, pick)
        return self._padded(seqs, lookback, pick)

    def _last(self, ids: torch.Tensor, lengths: list[int], lookback: int, pick: torch.Tensor, **past) -> torch.Tensor:
        """One forward of the model over right-padded rows `ids` [B, T] (after the KV cache in
        `past`, if any): log-softmax of its logits at the last `lookback` real positions of
        each row, at the `pick` token ids only, on the CPU. The model's own forward
        (lm.head_logits: soft-capping and logit scales included), its LM head (vocab x
        hidden) on those positions only."""
        at = torch.tensor([[n - lookback + k for k in range(lookback)] for n in lengths], device=self.device)
        logits, _ = lm.head_logits(self.model, at, input_ids=ids, **past)
        return logits.float().log_softmax(-1)[..., pick].cpu()

    PAD_SLACK_CPU = 1.15  # on CPU a padded batch is cut where padding would exceed 15% of its real tokens

    @torch.no_grad()
    def _padded(self, seqs: list[list[int]], lookback: int, pick: torch.Tensor) -> torch.Tensor:
        """Batched passes, rows right-padded: a causal model never lets a real token see the
        pads after it, so no attention mask is needed (sdpa keeps its fast causal kernel,
        unlike a left-padded batch's explicit mask) and positions are the plain 0..n-1.
        On a GPU one pass (rows run in parallel); on CPU, where a pad costs as much as a
        real token, rows sorted by length are cut into buckets of similar lengths."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        slack = self.PAD_SLACK_CPU if self.device.type == "cpu" else float("inf")
        buckets, cur = [], []
        for i in order:  # longest first: a bucket's width is its first row's length
            if cur and (len(cur) + 1) * len(seqs[cur[0]]) > slack * (sum(len(seqs[j]) for j in cur) + len(seqs[i])):
                buckets.append(cur)
                cur = []
            cur.append(i)
        buckets.append(cur)
        out = torch.empty(len(seqs), lookback, len(pick), device="cpu")
        for rows in buckets:
            out[rows] = self._last(self._ids([seqs[i] for i in rows]), [len(seqs[i]) for i in rows], lookback, pick,
                                   use_cache=False)
        return out

    def _versions(self) -> tuple:
        # in-place weight updates (load_state_dict, copy_) bump a tensor's version: a cached
        # prefix is only reused under the weights it was computed with
        return tuple((id(p), p._version) for p in self.model.parameters())

    def _root_cache(self, tokens: list[int]):
        """A KV cache holding exactly `tokens`, kept across calls: the root (preamble,
        exemplars) is the same for every batch of a run, so it is computed once per engine;
        a different root reuses the cached one up to their common prefix."""
        from transformers import DynamicCache

        versions = self._versions()
        if self._root is not None and self._root[2] == versions:
            old, cache, _ = self._root
            keep = _lcp(old, tokens)
            extra = cache.get_seq_length() - keep
            if extra > 0:
                cache.crop(-extra)
        else:
            cache, keep = DynamicCache(), 0
        if len(tokens) > keep:
            self.model.model(input_ids=self._ids([tokens[keep:]]), past_key_values=cache, use_cache=True)
        self._root = (list(tokens), cache, versions)
        return cache

    MIN_SHARED = 16  # tokens two sequences must share beyond the common root to form a group

    @torch.no_grad()
    def _shared(self, seqs: list[list[int]], lookback: int, pick: torch.Tensor) -> torch.Tensor:
        """Prefix-shared passes with a KV cache (on CPU a padded batch is slower per sequence
        than single rows; benchmarks/labeling.py). The root shared by all sequences
        (preamble, exemplars) is cached across calls (_root_cache); sequences that share
        more (the two orders of one pair: preamble + context) extend it once as a group;
        the group's tails (nearly equal lengths) then run as one right-padded batch over the
        cache repeated per row. The cache is cut back to the root after each group.
        Exact up to float rounding: the same tokens at the same positions."""
        shortest = min(len(s) for s in seqs)
        root = max(0, min(min(_lcp(seqs[0], s) for s in seqs[1:]), shortest - lookback))
        groups: list[list[int]] = []
        for i, s in enumerate(seqs):
            for g in groups:
                if _lcp(seqs[g[0]], s) >= root + self.MIN_SHARED:
                    g.append(i)
                    break
            else:
                groups.append([i])
        out = torch.empty(len(seqs), lookback, len(pick), device="cpu")
        cache = self._root_cache(seqs[0][:root])

        for g in groups:
            shared = min(min(_lcp(seqs[g[0]], seqs[j]) for j in g), min(len(seqs[j]) for j in g) - lookback)
            if shared > root:
                self.model.model(input_ids=self._ids([seqs[g[0]][root:shared]]), past_key_values=cache,
                                 use_cache=True)
            tails = [seqs[j][shared:] for j in g]
            if len(g) > 1 and shared > 0:
                cache.batch_repeat_interleave(len(g))
            # right padding: no row sees another's pads, positions continue from the cache
            # (an empty cache, no shared prefix at all: a plain pass that leaves it untouched)
            past = dict(past_key_values=cache, use_cache=True) if shared > 0 else dict(use_cache=False)
            out[g] = self._last(self._ids(tails), [len(t) for t in tails], lookback, pick, **past)
            if len(g) > 1 and shared > 0:
                cache.batch_select_indices(torch.tensor([0], device=self.device))  # before the crop
            extra = cache.get_seq_length() - root
            if extra > 0:
                cache.crop(-extra)  # negative crop: the same in transformers 4.x and 5.x
        return out

    def _eos_ids(self) -> set:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    @torch.no_grad()
    def complete(self, seqs: list[list[int]], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> list[list[int]]:
        """Decode a continuation per sequence: greedy at temperature 0, else sampled."""
        ids, mask, _ = lm.left_pad(seqs, self.pad, self.device)
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
        # only these settings: the model's generation_config adds no processor (lm.generate)
        out = lm.generate(self.model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          pad_token_id=self.pad, **sampling)[:, ids.shape[1]:]
        eos = self._eos_ids()
        rows = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:cut])
        return rows

    @torch.no_grad()
    def sample_with_logprobs(self, seqs: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                             top_k: int, logprobs: int, seed: int, batch_size: int = 8,
                             should_stop=None) -> list[dict]:
        """For the completions endpoint: per sequence the new token ids, their log-probs under
        the model (temperature 1, before any sampling transform, as OpenAI reports them), the
        `logprobs` most likely tokens at each step, and "stop" or "length".

        Bounded memory: the prompts run in batches of at most `batch_size`, and of each step
        only the chosen token's log-prob and the top `logprobs` are kept (`_StepLogprobs`).
        `should_stop()` (a deadline, a cancellation) is asked before each batch and after each
        decoding step; when it says stop, generation ends at that step and TimeoutError is raised."""
        from transformers import StoppingCriteriaList

        torch.manual_seed(seed)
        # top_k 0 is off (None would take transformers' default of 50); only these settings apply
        sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
                    if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        stop = _StopWhen(should_stop)
        results = []
        for start in range(0, len(seqs), max(1, batch_size)):
            if should_stop is not None and should_stop():
                raise TimeoutError(f"stopped before prompt {start} of {len(seqs)}")
            chunk = seqs[start:start + batch_size]
            ids, mask, _ = lm.left_pad(chunk, self.pad, self.device)
            record = _StepLogprobs(logprobs)
            out = lm.generate(self.model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=self.pad, return_dict_in_generate=True, logits_processor=[record],
                              stopping_criteria=StoppingCriteriaList([stop]), **sampling)
            if stop.stopped:
                raise TimeoutError(f"stopped while generating prompts {start}..{start + len(chunk) - 1}")
            results += record.rows(out.sequences[:, ids.shape[1]:], self._eos_ids())
        return results


class _StopWhen:
    """A stopping criterion that ends generation at the step where `should_stop()` says so."""

    def __init__(self, should_stop):
        self.should_stop, self.stopped = should_stop, False

    def __call__(self, input_ids, scores, **kwargs):
        self.stopped = self.stopped or (self.should_stop is not None and bool(self.should_stop()))
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


class _StepLogprobs:
    """A logits processor, first in the list, that reads the raw float32 logits of each step
    (before any temperature/top-k/top-p warper) and returns them unchanged: it keeps the top
    `k` log-probs of each step, and the log-prob of the chosen token once the next step (or
    the output) tells which it was; the full-vocabulary row of one step is held until then."""

    def __init__(self, k: int):
        self.k = k
        self.chosen: list[torch.Tensor] = []  # per step [B]: log-prob of the token chosen there
        self.tops: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step ([B, k] values, [B, k] ids)
        self.pending: list = []  # the last step's (raw logits [B, V], logsumexp [B]) until its token is known

    def __call__(self, input_ids, scores):
        if self.pending:
            raw, lse = self.pending.pop()
            self.chosen.append(raw.gather(1, input_ids[:, -1:])[:, 0] - lse)
        lse = scores.logsumexp(-1)
        if self.k:
            v, i = scores.topk(self.k, dim=-1)
            self.tops.append(((v - lse[:, None]).cpu(), i.cpu()))
        self.pending.append((scores, lse))
        return scores

    def rows(self, new: torch.Tensor, eos: set) -> list[dict]:
        """Per row of the new tokens [B, T]: ids up to EOS, their log-probs, the top-k, finish reason."""
        if self.pending and len(self.chosen) < new.shape[1]:  # the last step's token is in the output
            raw, lse = self.pending.pop()
            self.chosen.append(raw.gather(1, new[:, len(self.chosen):len(self.chosen) + 1])[:, 0] - lse)
        self.pending.clear()
        lp = torch.stack(self.chosen, dim=1).float().cpu() if self.chosen else torch.zeros(new.shape[0], 0)
        out = []
        for b, row in enumerate(new.tolist()):
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            toks = row if cut is None else row[:cut]
            top = [list(zip(self.tops[i][1][b].tolist(), self.tops[i][0][b].tolist())) for i in range(len(toks))] \
                if self.k else None
            out.append({"ids": toks, "token_logprobs": lp[b, :len(toks)].tolist(), "top": top,
                        "finish_reason": "length" if cut is None else "stop"})
        return out


def _tied(name: str, model) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
