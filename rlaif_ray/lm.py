"""Batched language-model primitives shared by the generator, labeler and learner:
left-padded forward passes, next-token log-probs, sequence log-probs and sampling."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids (as HF generate computes them for left padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask, positions(mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def next_token_logprobs(model, seqs: list[list[int]], pad_id: int, lookback: int = 1) -> torch.Tensor:
    """Log-softmax of the next-token distribution at each of the last `lookback` positions:
    shape (batch, lookback, vocab); [:, -1] is the distribution after the whole sequence."""
    ids, mask, pos = left_pad(seqs, pad_id)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[:, -lookback:]).float()
    return F.log_softmax(logits, dim=-1)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperature: float = 1.0, value_head=None):
    """Per-token log pi(response_t | prompt, response_<t) under softmax(logits / T).

    Prompts are left-padded and responses right-padded, so every response starts at the
    same column and the LM head runs on response positions only (the vocab is large).
    Returns (logprobs [B, R], mask [B, R], values [B, R] or None).
    """
    P = max(len(p) for p in prompts)
    R = max(max(len(r) for r in responses), 1)
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + R), dtype=torch.long)
    rmask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, P:P + len(r)] = 1
            rmask[i, :len(r)] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         use_cache=False).last_hidden_state
    h = hidden[:, P - 1:P + R - 1]  # the state before each response token
    logits = model.lm_head(h).float() / temperature
    targets = ids[:, P:P + R]
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    values = value_head(h.float()).squeeze(-1) if value_head is not None else None
    return logp * rmask, rmask, values


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, *, temperature: float,
           top_p: float, top_k: int, max_new_tokens: int, seed: int):
    """Sample one continuation per prompt. Returns token lists (up to and including EOS),
    the behaviour log-prob of each sampled token (of the distribution actually sampled
    from) and whether each hit max_new_tokens without EOS."""
    ids, mask, _ = left_pad(prompts, pad_id)
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
    for i in range(new.shape[0]):
        row = new[i].tolist()
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        tokens.append(row[:end])
        logps.append(tok_logp[i, :end].tolist())
        truncated.append(eos_id not in row)
    return tokens, logps, truncated
