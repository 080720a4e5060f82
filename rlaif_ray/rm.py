"""Reward-model and SFT math and data (METHOD.md sections 2 and 3), as pure functions:
the soft-label RM loss, the text an RM scores, pair/SFT example encoding, accuracy.
The Ray Train loops that use them are in rlaif_ray/supervised.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rm_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy between the AI distribution (p_a, 1 - p_a) and the softmax of
    the two scores: -[p_a log s(r_a - r_b) + (1 - p_a) log s(r_b - r_a)] (METHOD.md 2).
    With p_a in {0, 1} it is the Bradley-Terry loss -log s(r_w - r_l)."""
    d = r_a - r_b
    return p_a * F.softplus(-d) + (1 - p_a) * F.softplus(d)


def rm_text(context: str, response: str) -> str:
    """What the reward model reads: the context, then the response (one format for
    training and for scoring rollouts)."""
    return f"{context}\n\nRESPONSE: {response}"


def encode(tok, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids, cut from the left to max_tokens (the response stays); (ids, was_cut)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return (ids[-max_tokens:], True) if len(ids) > max_tokens else (ids, False)


def label_target(row: dict, kind: str) -> float | None:
    """The training target P(a preferred) of a labeled pair: soft (the AI's p_a), hard (its
    argmax) or human (the pair's human label). None: the row has no usable label."""
    if kind == "human":
        h = row.get("human")
        return None if h not in ("a", "b") else float(h == "a")
    p = row.get("p_a")
    if row.get("error") or p is None or p != p:
        return None
    return float(p) if kind == "soft" else float(p > 0.5) if p != 0.5 else 0.5


def encode_pairs(rows: list[dict], tok, kind: str, max_tokens: int) -> tuple[list[dict], dict]:
    """Labeled pairs -> {ids_a, ids_b, target, human}; skipped and truncated rows are counted."""
    out, skipped, cut = [], 0, 0
    for r in rows:
        t = label_target(r, kind)
        if t is None:
            skipped += 1
            continue
        a, ca = encode(tok, rm_text(r["context"], r["response_a"]), max_tokens)
        b, cb = encode(tok, rm_text(r["context"], r["response_b"]), max_tokens)
        cut += ca + cb
        out.append({"id": r.get("id"), "ids_a": a, "ids_b": b, "target": t, "human": r.get("human")})
    return out, {"pairs": len(out), "skipped_no_label": skipped, "truncated_texts": cut}


def pad_right(seqs: list[list[int]], pad: int, device="cpu", width: int | None = None):
    """Right-padded ids and attention mask, built on `device`."""
    n = width or max(len(s) for s in seqs)
    ids = torch.tensor([list(s) + [pad] * (n - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def scores(model, seqs: list[list[int]], pad: int, device="cpu") -> torch.Tensor:
    """Scalar scores of a sequence-classification model (num_labels=1), read at each
    sequence's last real token (right padding, explicit positions)."""
    ids, mask = pad_right(seqs, pad, device)
    hidden = model(input_ids=ids, attention_mask=mask).logits  # (B, 1) at the last non-pad token
    return hidden[:, 0].float()


def accuracy(r_a: list[float], r_b: list[float], human: list[str]) -> float:
    """Share of human-labelled pairs where the RM scores the human's choice higher."""
    hits = [(a > b) == (h == "a") for a, b, h in zip(r_a, r_b, human) if h in ("a", "b")]
    return sum(hits) / len(hits) if hits else float("nan")


def sft_example(prompt_ids: list[int], response_ids: list[int], eos: int) -> dict:
    """Prompt + response + EOS; the loss covers the response and EOS only."""
    ids = prompt_ids + response_ids + [eos]
    return {"ids": ids, "labels": [-100] * len(prompt_ids) + response_ids + [eos]}


def sft_loss_sum(model, batch: list[dict], pad: int, device: str = "cpu") -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over the response tokens of a batch, and their count."""
    ids, mask = pad_right([b["ids"] for b in batch], pad, device)
    labels, _ = pad_right([b["labels"] for b in batch], -100, device, width=ids.shape[1])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())
