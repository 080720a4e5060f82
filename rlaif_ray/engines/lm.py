"""Batched language-model primitives shared by the engines and the learner: left-padded
inputs, response log-probs, sampling. Every tensor is built on the device it is given (the
model's), never on the default device.

Logits come from the model's own forward (`head_logits`), so whatever a family does after
its LM head (Gemma-2's final soft-capping, Cohere's logit_scale) applies everywhere; the head
runs on the positions needed only. The learner's log-probs run the head in chunks of
positions (`chunked_logprobs`) when the model's logits are its head's output as they are
(`head_is_plain`), so no [positions, vocabulary] tensor exists beyond a chunk. Sampling uses
exactly the settings passed (`generate`): the model's generation_config.json adds no logits
processor. The learner evaluates the distribution the sampler drew from (`sampled_logprobs`:
temperature, then top-k, then top-p, as transformers and vLLM apply them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# attention implementations that take SDPA's boolean masks (rlaif_ray.cpu.attention adds its
# grouped-query SDPA when a CPU actor switches to it)
SDPA_IMPLEMENTATIONS = {"sdpa"}


def is_sdpa(model) -> bool:
    """Whether `model` attends through SDPA: boolean masks."""
    return getattr(model.config, "_attn_implementation", None) in SDPA_IMPLEMENTATIONS


def model_device(model) -> torch.device:
    """The device of a model's parameters (a DTensor's local shard included)."""
    p = next(model.parameters())
    return p.device if not hasattr(p, "to_local") else p.to_local().device


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids (as HF generate computes them for left padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask, positions(mask)


def pad_rows(rows: list[list[float]], width: int, device, dtype=torch.float32, value: float = 0.0) -> torch.Tensor:
    """Right-padded [len(rows), width] tensor of per-token values (behaviour log-probs, masks)."""
    return torch.tensor([list(r[:width]) + [value] * (width - min(len(r), width)) for r in rows], dtype=dtype,
                        device=device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def response_inputs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Prompts left-padded and responses right-padded, so every response starts at column P:
    (ids [B, P+R], attention mask, response mask [B, R] float, P)."""
    P = max(len(p) for p in prompts)
    R = max(max(len(r) for r in responses), 1)
    ids = [[pad_id] * (P - len(p)) + list(p) + list(r) + [pad_id] * (R - len(r)) for p, r in zip(prompts, responses)]
    mask = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in zip(prompts, responses)]
    rmask = [[1.0] * len(r) + [0.0] * (R - len(r)) for r in responses]
    return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device),
            torch.tensor(rmask, dtype=torch.float32, device=device), P)


def head_logits(model, keep, hidden: bool = False, logits: bool = True, **inputs):
    """Logits of the model's own forward (its LM head and whatever the model applies after it:
    Gemma-2's final soft-capping, Cohere's logit_scale), computed at the kept positions only
    (the vocabulary is large: no full-vocabulary logits for the others). `keep`: an int (the
    last `keep` positions) or a 1-D index tensor, the same for every row (the model's
    `logits_to_keep`: logits [B, K, V]); or a [B, K] tensor of positions per row (the head's
    input is gathered per row by a pre-hook on the output embeddings). Returns (logits,
    the last hidden states at those positions [B, K, H] if `hidden`, else None); with
    `logits` False the head runs on no position and the first is None (chunked_logprobs)."""
    head = getattr(model, "module", model).get_output_embeddings()  # a DDP-wrapped model runs through its wrapper
    per_row = torch.is_tensor(keep) and keep.dim() == 2
    seen = []

    def pick(module, args):
        if not args:
            raise RuntimeError(f"{type(model).__name__} calls its output embeddings without a positional input")
        h = args[0]
        if per_row:
            h = h[torch.arange(h.shape[0], device=h.device)[:, None], keep]
        seen.append(h)
        return (h if logits else h[..., :0, :], *args[1:])

    hidden = hidden or not logits
    handle = head.register_forward_pre_hook(pick) if (per_row or hidden) else None
    try:
        out = model(**inputs, logits_to_keep=0 if per_row else keep)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None and len(seen) != 1:
        raise RuntimeError(f"{type(model).__name__}: its forward ran the output embeddings {len(seen)} times, not once")
    return (out.logits if logits else None), (seen[0] if hidden else None)


# positions per chunk of the LM head in the learner's log-probs (ResponseScorer.logprob_chunk):
# the largest [positions, vocab] tensor; at 152k vocabulary a 1024-row chunk is 0.6 GB in fp32
LOGPROB_CHUNK = 1024


def chunked_logprobs(head, h: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int = 0,
                     top_p: float = 1.0, chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """sampled_logprobs(head(h), tokens) computed `chunk` positions at a time (h [..., H],
    tokens [...]): each chunk's logits in fp32, its log-softmax and the gather, then dropped;
    under autograd each chunk is recomputed in the backward (torch.utils.checkpoint), so no
    [positions, vocabulary] tensor outlives its chunk, forward or backward. Positions that fit
    one chunk run as one (no recomputation)."""
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_t = h.reshape(-1, h.shape[-1]), tokens.reshape(-1)

    def one(hc, tc):
        return sampled_logprobs(head(hc).float(), tc, temperature, top_k, top_p)

    if flat_t.shape[0] <= chunk:  # one chunk: nothing to save by recomputing it in the backward
        return one(flat_h, flat_t).view(tokens.shape)
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    parts = [checkpoint(one, flat_h[i:i + chunk], flat_t[i:i + chunk], use_reentrant=False) if grad
             else one(flat_h[i:i + chunk], flat_t[i:i + chunk]) for i in range(0, flat_t.shape[0], chunk)]
    return torch.cat(parts).view(tokens.shape)


SORT_ELEMENTS = 1 << 24  # top-p sorts the vocabulary: rows at a time, about this many elements per chunk


def sampling_support(z: torch.Tensor, top_k: int, top_p: float, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Which tokens temperature-scaled logits `z` [..., V] keep under top-k, then top-p on the
    renormalised top-k distribution: bool [..., V]. The same rule as transformers'
    TopKLogitsWarper/TopPLogitsWarper and vLLM's sampler (apply_top_k_top_p): top-k keeps every
    token at least as large as the k-th largest; top-p sorts ascending and drops the tokens
    whose cumulative probability is <= 1 - p, always keeping the most likely. `chosen` [...]:
    tokens kept regardless (the sampled ones: a token at the boundary can fall on the other
    side when the learner's logits differ from the sampler's by rounding, and must not get
    probability 0)."""
    V = z.shape[-1]
    flat = z.detach().reshape(-1, V)
    keep = torch.ones(flat.shape, dtype=torch.bool, device=z.device)
    step = max(1, SORT_ELEMENTS // V)
    with torch.no_grad():
        for i in range(0, flat.shape[0], step):
            x = flat[i:i + step]
            remove = torch.zeros(x.shape, dtype=torch.bool, device=z.device)
            if 0 < top_k < V:
                remove = x < torch.topk(x, top_k, dim=-1).values[:, -1:]
            if top_p < 1.0:
                srt, idx = torch.sort(x.masked_fill(remove, float("-inf")), dim=-1)  # ascending
                drop = srt.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
                drop[:, -1] = False
                remove = remove | drop.scatter(-1, idx, drop)
            keep[i:i + step] = ~remove
    keep = keep.view(z.shape)
    if chosen is not None:
        keep.scatter_(-1, chosen.unsqueeze(-1), True)
    return keep


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """log p(tokens) under the distribution a sampler with these settings draws from:
    softmax(logits / T) restricted to its top-k, then top-p set (sampling_support) and
    renormalised. logits [..., V] (float32), tokens [...]."""
    z = logits / temperature
    if top_k > 0 or top_p < 1.0:
        z = z.masked_fill(~sampling_support(z, top_k, top_p, tokens), float("-inf"))
    return torch.gather(F.log_softmax(z, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


class ResponseScorer(torch.nn.Module):
    """A causal LM (and optional scalar value head on its trunk) as one module whose forward
    returns the per-token log-probs of the response columns under the sampling distribution
    (softmax(logits / T), restricted to its top-k / top-p set when those are on).

    One module so that FSDP can shard it with the LM's own parameters (embeddings, final
    norm, a tied LM head) and the value head in its root unit: calling `model.model` and
    `model.lm_head` separately from outside would bypass the root's unshard hooks. The
    logits come from the model's own forward (head_logits), on response positions only."""

    def __init__(self, model, value_head: torch.nn.Module | None = None, logprob_chunk: int = LOGPROB_CHUNK,
                 value_detached: bool = False):
        super().__init__()
        self.model, self.value_head = model, value_head
        # the value head reads the trunk's states without passing its loss's gradient back into
        # the trunk (rl.value_trunk: detached): the value loss then trains the head alone
        self.value_detached = value_detached
        # positions per chunk of the LM head (chunked_logprobs); 0: all logits at once
        self.logprob_chunk = logprob_chunk

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, start: int | None, temperature: float,
                top_k: int = 0, top_p: float = 1.0, groups: "PromptGroups | None" = None):
        chunked = bool(self.logprob_chunk) and head_is_plain(self.model)
        if groups is not None:  # prompts shared by their responses (PromptGroups): [G, K] outputs
            allowed = attention_mask_4d(self.model, groups.attention, next(self.model.parameters()).dtype)
            keep, inputs, tokens = groups.keep, dict(attention_mask=allowed, position_ids=groups.positions), groups.targets
        else:
            # the states before each response token: positions start-1 .. T-2
            keep = torch.arange(start - 1, ids.shape[1] - 1, device=ids.device)
            inputs, tokens = dict(attention_mask=mask, position_ids=positions(mask)), ids[:, start:]
        logits, h = head_logits(self.model, keep, hidden=self.value_head is not None, logits=not chunked,
                                input_ids=ids, use_cache=False, **inputs)
        if chunked:
            logp = chunked_logprobs(self.model.get_output_embeddings(), h, tokens, temperature, top_k, top_p,
                                    self.logprob_chunk)
        else:
            logp = sampled_logprobs(logits.float(), tokens, temperature, top_k, top_p)
        if self.value_head is not None:
            values = self.value_head(h.detach() if self.value_detached else h).float().squeeze(-1)
        else:
            values = None
        return logp, values



def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in a model that trains (kept in train mode: gradient checkpointing runs only
    there): every nn.Dropout at p 0, and the attention dropout transformers' attention
    functions read from the layer (`attention_dropout`, `dropout`) and from the config. Left
    on, the learner's log-probs carry dropout noise: the on-policy ratio is not 1, and the KL
    and the gradient are noisy (TRL disables it by default)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    config = getattr(model, "config", None)
    for key, value in (vars(config).items() if config is not None else []):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    return model


def head_is_plain(model) -> bool:
    """Whether a causal LM's logits are its output embeddings' output as they are (checked once
    per model, on three tokens, and kept on it): then log-probs may run the head in chunks
    (chunked_logprobs). A family that changes them after the head (Gemma-2's soft-capping,
    Cohere's logit_scale) keeps the model's own forward. Sharded, every rank runs the check in
    its first forward (a collective)."""
    if getattr(model, "_rlaif_plain_head", None) is None:
        dev = next(model.parameters()).device
        with torch.no_grad():
            ids = torch.tensor([[1, 2, 3]], device=dev)
            logits, h = head_logits(model, 1, hidden=True, input_ids=ids, use_cache=False)
            mine = model.get_output_embeddings()(h)
        model._rlaif_plain_head = bool(torch.allclose(mine.float(), logits.float(), rtol=1e-3, atol=1e-3))
    return model._rlaif_plain_head


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperature: float = 1.0, value_head=None, top_k: int = 0, top_p: float = 1.0):
    """Per-token log pi(response_t | prompt, response_<t) under the sampling distribution:
    softmax(logits / T), restricted to the top-k, then top-p set and renormalised when
    `top_k` > 0 or `top_p` < 1 (sampled_logprobs). `model`: a causal LM or a ResponseScorer.
    Returns (logprobs [B, R], mask [B, R], values [B, R] or None), on the model's device."""
    scorer = model if isinstance(model, ResponseScorer) else ResponseScorer(model, value_head)
    ids, mask, rmask, P = response_inputs(prompts, responses, pad_id, model_device(scorer))
    logp, values = scorer(ids, mask, P, temperature, top_k, top_p)
    return logp * rmask, rmask, values


# the special-token ids of a model's generation config: all `generate` keeps of it
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def generate(model, **kwargs):
    """`model.generate(**kwargs)` with exactly the settings in kwargs (and transformers' neutral
    defaults for the rest): the sampling settings of the model's own generation_config.json
    (a hub model's repetition_penalty, no_repeat_ngram_size, top_k, min_p, ...) are not
    applied, as vLLM does not apply them to explicit SamplingParams. Recorded behaviour
    log-probs are then those of the distribution the passed settings describe, which the
    learner evaluates (sampled_logprobs). Swaps the model's generation_config for the call:
    not for concurrent calls on one model (sampling seeds torch's global RNG anyway)."""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig(
        **{k: getattr(own, k) for k in _TOKEN_IDS if getattr(own, k, None) is not None})
    try:
        return model.generate(**kwargs)
    finally:
        model.generation_config = own


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, *, temperature: float,
           top_p: float, top_k: int, max_new_tokens: int, seed: int, share_prompts: bool = True):
    """Sample one continuation per prompt (`share_prompts`: rows with the same prompt, the k
    samples of one prompt, prefill it once: prefill_shared). Returns token lists (up to and including EOS),
    the behaviour log-prob of each sampled token (of the distribution actually sampled
    from) and whether each hit max_new_tokens without EOS."""
    ids, mask, _ = left_pad(prompts, pad_id, model_device(model))
    past = prefill_shared(model, prompts, pad_id) if share_prompts else None
    torch.manual_seed(seed)
    out = generate(model, input_ids=ids, attention_mask=mask, do_sample=True,
                   temperature=temperature, top_p=top_p, top_k=top_k,
                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                   output_scores=True, return_dict_in_generate=True, use_cache=True,
                   **({"past_key_values": past} if past is not None else {}))
    new = out.sequences[:, ids.shape[1]:]
    # scores are the processed logits (temperature/top-k/top-p applied) that were sampled from
    # one step at a time: stacking every step's full-vocabulary log-softmax costs GBs
    tok_logp = torch.stack([F.log_softmax(s.float(), dim=-1).gather(1, new[:, t:t + 1]).squeeze(1)
                            for t, s in enumerate(out.scores)], dim=1)
    tokens, logps, truncated = [], [], []
    new, tok_logp = new.tolist(), tok_logp.tolist()  # one device-to-host copy each
    for row, lp in zip(new, tok_logp):
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        tokens.append(row[:end])
        logps.append(lp[:end])
        truncated.append(eos_id not in row)
    return tokens, logps, truncated


@torch.no_grad()
def prefill_shared(model, prompts: list[list[int]], pad_id: int):
    """A KV cache of every prompt but its last token, computed once per distinct prompt and
    repeated for the rows that share it; None when no prompt repeats. `generate` continues
    from it with the full left-padded prompts (the cache covers all columns but the last, so
    generate runs the last prompt token and samples): the k samples of a prompt cost one
    prefill, not k. Left padding to the same width keeps each row's columns and positions
    where the unshared batch has them."""
    from transformers import DynamicCache

    distinct: dict = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    if len(distinct) == len(prompts) or min(len(p) for p in prompts) < 2:
        return None
    unique = [list(p)[:-1] for p in distinct]
    ids, mask, pos = left_pad(unique, pad_id, model_device(model))
    cache = DynamicCache()
    # only the cache is wanted: the LM head on one position, not on every prompt token (a
    # [prompts x tokens x vocabulary] matmul, about a twentieth of the quickstart's sampling time)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(torch.tensor(rows, device=ids.device))
    return cache


@torch.no_grad()
def next_token_logprobs(model, seqs: list[list[int]], pad_id: int, lookback: int = 1) -> torch.Tensor:
    """Log-softmax of the next-token distribution at each of the last `lookback` positions of
    a left-padded batch: shape (batch, lookback, vocab); [:, -1] follows the whole sequence.
    The plain reference the engines' faster label paths are tested against."""
    ids, mask, pos = left_pad(seqs, pad_id, model_device(model))
    logits, _ = head_logits(model, lookback, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return F.log_softmax(logits.float(), dim=-1)


# ---- shared prompts: each prompt through the model once for all its responses ----------


class PromptGroups:
    """Rows that share a prompt packed into one sequence each, prompt first and then its
    responses one after another: [p, r_1, r_2, ..., r_k] (the Prefix Grouper layout, arXiv
    2506.05433). A block attention mask lets every response token see the prompt and the
    earlier tokens of its own response only, and each response's positions continue from the
    prompt's end, so every response token gets exactly the context it had when sampled. The
    prompt's activations are computed once per group instead of once per sample (the prompt
    is most of the tokens), and with gradients its backward runs once too.

    `index` [B, R] maps each row's response tokens to their place in the flat [G * K] output
    (K: the most response tokens in a group); `mask` [B, R] marks real tokens."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
        groups: dict = {}
        for b, p in enumerate(prompts):
            groups.setdefault(tuple(p), []).append(b)
        members = list(groups.values())
        lengths = [len(prompts[m[0]]) + sum(len(responses[b]) for b in m) for m in members]
        L = max(lengths)
        K = max(max(sum(len(responses[b]) for b in m) for m in members), 1)
        R = max(max(len(r) for r in responses), 1)
        G = len(members)
        # plain lists first, then one tensor each, built on the model's device
        ids, pos = [[pad_id] * L for _ in range(G)], [[0] * L for _ in range(G)]
        segment = [[-2] * L for _ in range(G)]  # -1 prompt, i >= 0 response i, -2 padding
        keep = [[0] * K for _ in range(G)]  # the position whose output predicts each token
        targets = [[pad_id] * K for _ in range(G)]
        index = [[0] * R for _ in prompts]
        for g, m in enumerate(members):
            p = list(prompts[m[0]])
            P = len(p)
            ids[g][:P], pos[g][:P], segment[g][:P] = p, list(range(P)), [-1] * P
            at, k = P, 0
            for i, b in enumerate(m):
                r = list(responses[b])
                n = len(r)
                if n:
                    ids[g][at:at + n], pos[g][at:at + n], segment[g][at:at + n] = r, list(range(P, P + n)), [i] * n
                    # token t of the response follows the prompt's last token (t = 0) or its own t - 1
                    keep[g][k:k + n] = [P - 1] + list(range(at, at + n - 1))
                    targets[g][k:k + n] = r
                    index[b][:n] = [g * K + j for j in range(k, k + n)]
                at, k = at + n, k + n
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        seg = as_long(segment)
        q, kv = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a key is visible when it is not after the query and is in the prompt or the query's own segment
        see = causal & ((kv == -1) | (kv == q)) & (q != -2)
        see |= torch.eye(L, dtype=torch.bool, device=device)  # padding sees itself: no all-masked row (NaN in softmax)
        self.ids, self.positions, self.keep, self.targets = as_long(ids), as_long(pos), as_long(keep), as_long(targets)
        self.attention = see[:, None]  # [G, 1, L, L], True = attend
        self.index = as_long(index)
        self.mask = pad_rows([[1.0] * len(r) for r in responses], R, device)
        self.num_groups, self.tokens = G, sum(lengths)

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """[G, K] per-token values back to the rows' [B, R] layout (0 on padding)."""
        return flat.reshape(-1)[self.index] * self.mask


def attention_mask_4d(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block mask as the model's attention takes a prepared 4D mask: boolean for SDPA
    (True = attend), additive (0 / most negative) for eager attention."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if is_sdpa(model):
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"shared-prompt forward needs sdpa or eager attention, not {impl!r}")


# model types whose layers carry a state along the sequence (SSM, convolution, linear attention)
RECURRENT_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "falcon_h1", "lfm2", "lfm2_vl",
                         "qwen3_next", "granitemoehybrid", "zamba", "zamba2", "bamba", "nemotron_h",
                         "recurrent_gemma", "xlstm", "minimax", "plamo2"}


def full_attention_only(config) -> bool:
    """Whether every layer of the model is full (global, causal) attention: what a packed
    block mask is exact for. A sliding-window layer is handed the custom 4D mask unchanged
    (responses would see the prompt and their siblings past the window), and a recurrent,
    convolution or linear-attention layer ignores it (each response's state would run through
    its siblings): Mistral-7B-v0.1, Gemma-2/3, Phi-3, gpt-oss, Cohere2; Jamba, Falcon-H1, LFM2,
    Qwen3-Next, Granite-4-H."""
    if getattr(config, "model_type", None) in RECURRENT_MODEL_TYPES:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return False  # one window for every layer (Mistral v0.1, Phi-3); Qwen2 sets it but turns it off
    return not any(k.startswith(("mamba_", "ssm_", "conv_L")) for k in vars(config))


def supports_shared_prompts(model) -> bool:
    """Whether one pass over a prompt and all its samples (a block mask) gives each sample's
    log-probs exactly: the attention takes a custom 4D mask (SDPA or eager; flash attention
    kernels take no arbitrary mask) and every layer is full attention (full_attention_only).
    Otherwise the callers run one sequence per sample."""
    sdpa_or_eager = is_sdpa(model) or (getattr(model.config, "_attn_implementation", None) or "eager") == "eager"
    return sdpa_or_eager and full_attention_only(model.config)


def shared_prompt_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, share: bool = True):
    """`grouped_logprobs` where it pays and works (`share`, a prompt repeats, the attention takes
    a block mask), else `response_logprobs`: the same result either way."""
    inner = model.model if isinstance(model, ResponseScorer) else model
    if share and supports_shared_prompts(inner) and len(set(map(tuple, prompts))) < len(prompts):
        return grouped_logprobs(model, prompts, responses, pad_id, temperature, top_k, top_p)
    return response_logprobs(model, prompts, responses, pad_id, temperature, top_k=top_k, top_p=top_p)


def grouped_logprobs(scorer, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """`response_logprobs` with each distinct prompt computed once for all its responses
    (PromptGroups): the same (logprobs [B, R], mask [B, R], values or None) to float
    rounding, from G * (P + k R) tokens instead of B * (P + R)."""
    scorer = scorer if isinstance(scorer, ResponseScorer) else ResponseScorer(scorer)
    grp = PromptGroups(prompts, responses, pad_id, model_device(scorer))
    logp, values = scorer(grp.ids, None, None, temperature, top_k, top_p, groups=grp)
    return grp.rows(logp), grp.mask, (grp.rows(values) if values is not None else None)
