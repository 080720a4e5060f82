"""Supervised fine-tuning and reward-model training, the parts without Ray
(docs/method.md §2 and §3): the soft-label RM loss, the text an RM scores, pair and SFT
example encoding, the data sets of `sft` and `train-rm`, and their batch checks. The Ray
Train loops are in actors/ray_train.py."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from rlaif_ray.config import Config, ConfigError, RMConfig, TrainerConfig
from rlaif_ray.data.files import read_records
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.engines import lm
from rlaif_ray.feedback.pairs import BUNDLED, load_pairs, normalize_text, read_label_input, rm_heldout


def rm_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy between the AI distribution (p_a, 1 - p_a) and the softmax of
    the two scores: -[p_a log s(r_a - r_b) + (1 - p_a) log s(r_b - r_a)] (docs/method.md §2).
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


def sft_loss_sum(model, batch: list[dict], pad: int, device: str = "cpu",
                 chunk: int = lm.LOGPROB_CHUNK) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over the response tokens of a batch, and their count.
    `model` may be DDP-wrapped. The LM head runs on the response positions only, `chunk` of
    them at a time (lm.chunked_logprobs: no [tokens, vocabulary] tensor beyond a chunk) when
    the model's logits are its head's output (lm.head_is_plain); else, or with chunk 0, the
    model's own logits at every position."""
    ids, mask = pad_right([b["ids"] for b in batch], pad, device)
    labels, _ = pad_right([b["labels"] for b in batch], -100, device, width=ids.shape[1])
    target = labels[:, 1:]
    inner = getattr(model, "module", model)
    if chunk and lm.head_is_plain(inner):
        _, h = lm.head_logits(model, 0, logits=False, input_ids=ids, attention_mask=mask)
        scored = target != -100
        logp = lm.chunked_logprobs(inner.get_output_embeddings(), h[:, :-1][scored], target[scored], 1.0,
                                   chunk=chunk)
        return -logp.sum(), int(scored.sum())
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


def sft_data(cfg: Config, tok) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) SFT examples from the task's posts that have a reference summary;
    the task's RL held-out posts are never used."""
    s = cfg.sft
    task = cfg.task.model_copy(update={"data_path": s.data_path or cfg.task.data_path})
    ps = task_prompts(task, tok)  # TL;DR reference summaries, or HH chosen responses
    # posts whose pairs measure the reward model are never fine-tuned on (the RM starts from SFT)
    held_ctx = {normalize_text(x["context"]) for x in rm_heldout(cfg.rm)[0]}
    kept = [it for it in ps.train if normalize_text(it["context"]) not in held_ctx]
    rm_overlap = len(ps.train) - len(kept)
    items = [it for it in kept if it.get("reference")]
    if s.max_examples:
        items = items[:s.max_examples]
    if len(items) <= s.heldout:
        raise ConfigError(f"sft.heldout={s.heldout}: only {len(items)} posts with a reference summary")
    ex = [sft_example(it["prompt_token_ids"], tok(" " + it["reference"].strip() if cfg.task.prompt_format == "raw"
                                                  else it["reference"].strip(), add_special_tokens=False)["input_ids"]
                      [:s.max_response_tokens], tok.eos_token_id) for it in items]
    return ex[:-s.heldout], ex[-s.heldout:], {"examples": len(items), "skipped_long": ps.skipped_long,
                                              "no_reference": sum(1 for it in kept if not it.get("reference")),
                                              "dropped_rm_heldout_posts": rm_overlap}


def rm_data(r: RMConfig, tok) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) encoded pairs: training pairs from rm.labels (the output of `label`,
    or any pairs file with a human label for rm.label_kind=human); held-out pairs with a
    human label from rm.eval_data, never trained on (same contexts are dropped, counted)."""
    if not r.labels:
        raise ConfigError("rm.labels: the output folder of `rlaif-ray label` (or a pairs file with human labels)")
    path = Path(r.labels)
    if r.labels in BUNDLED:  # the set's own human labels (RLHF baseline); bad rows kept with an error
        rows = [{"error": None, **x} for x in load_pairs(r.labels, keep_bad=True)[0]]
    elif path.is_dir():
        rows = pq.read_table(path).to_pylist()
    elif path.is_file():
        rows = read_label_input(str(path)) if r.label_kind == "human" else read_records(path)
    else:
        raise ConfigError(f"rm.labels: {path} not found")
    held_rows, unusable_held = rm_heldout(r)
    # a training pair on a held-out context (the same post or dialogue) would leak: dropped, counted
    held_ctx = {normalize_text(x["context"]) for x in held_rows}
    overlap = sum(1 for x in rows if normalize_text(x.get("context") or "") in held_ctx)
    rows = [x for x in rows if normalize_text(x.get("context") or "") not in held_ctx][:r.max_pairs]
    train, counts = encode_pairs(rows, tok, r.label_kind, r.max_tokens)
    held, hcounts = encode_pairs(held_rows, tok, "human", r.max_tokens)
    counts.update({"dropped_heldout_overlap": overlap, "heldout_pairs": len(held),
                   "heldout_unusable": unusable_held + hcounts["skipped_no_label"],
                   "heldout_truncated_texts": hcounts["truncated_texts"]})
    if not train:
        raise ConfigError(f"rm.labels: no usable {r.label_kind} labels in {r.labels} ({counts})")
    return train, held, counts


def check_batch(tc: TrainerConfig, batch_size: int, name: str, n: int) -> int:
    """Refuses layouts that cannot train; returns the examples left out of each epoch."""
    if batch_size % tc.num_workers:
        raise ConfigError(f"{name}.batch_size={batch_size} does not divide across "
                          f"{name}.trainer.num_workers={tc.num_workers}")
    if n < batch_size:
        raise ConfigError(f"{name}: {n} training examples is less than one batch ({name}.batch_size={batch_size})")
    return n % batch_size
