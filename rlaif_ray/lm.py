"""Batched language-model primitives shared by the engines and the learner: left-padded
inputs, response log-probs, sampling. Every tensor is built on the device it is given (the
model's), never on the default device."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


class ResponseScorer(torch.nn.Module):
    """A causal LM (and optional scalar value head on its trunk) as one module whose forward
    returns the per-token log-probs of the response columns under softmax(logits / T).

    One module so that FSDP can shard it with the LM's own parameters (embeddings, final
    norm, a tied LM head) and the value head in its root unit: calling `model.model` and
    `model.lm_head` separately from outside would bypass the root's unshard hooks. The LM
    head runs on response positions only (the vocabulary is large)."""

    def __init__(self, model, value_head: torch.nn.Module | None = None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int, temperature: float):
        hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                  use_cache=False).last_hidden_state
        h = hidden[:, start - 1:-1]  # the state before each response token
        logits = self.model.lm_head(h).float() / temperature
        logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, start:].unsqueeze(-1)).squeeze(-1)
        values = self.value_head(h).float().squeeze(-1) if self.value_head is not None else None
        return logp, values


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperature: float = 1.0, value_head=None):
    """Per-token log pi(response_t | prompt, response_<t) under softmax(logits / T).
    `model`: a causal LM or a ResponseScorer. Returns (logprobs [B, R], mask [B, R],
    values [B, R] or None), on the model's device."""
    scorer = model if isinstance(model, ResponseScorer) else ResponseScorer(model, value_head)
    ids, mask, rmask, P = response_inputs(prompts, responses, pad_id, model_device(scorer))
    logp, values = scorer(ids, mask, P, temperature)
    return logp * rmask, rmask, values


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, *, temperature: float,
           top_p: float, top_k: int, max_new_tokens: int, seed: int):
    """Sample one continuation per prompt. Returns token lists (up to and including EOS),
    the behaviour log-prob of each sampled token (of the distribution actually sampled
    from) and whether each hit max_new_tokens without EOS."""
    ids, mask, _ = left_pad(prompts, pad_id, model_device(model))
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                         output_scores=True, return_dict_in_generate=True, use_cache=True)
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
def next_token_logprobs(model, seqs: list[list[int]], pad_id: int, lookback: int = 1) -> torch.Tensor:
    """Log-softmax of the next-token distribution at each of the last `lookback` positions of
    a left-padded batch: shape (batch, lookback, vocab); [:, -1] follows the whole sequence.
    The plain reference the engines' faster label paths are tested against."""
    ids, mask, pos = left_pad(seqs, pad_id, model_device(model))
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return F.log_softmax(model.lm_head(hidden[:, -lookback:]).float(), dim=-1)
