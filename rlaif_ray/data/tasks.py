"""Task data: TL;DR posts (bundled, or your own JSONL/Parquet), prompt templates, the
train/held-out split and a deterministic, resumable prompt sampler."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlaif_ray.data import schemas
from rlaif_ray.data.files import DataError, bundled_path, read_records

TLDR_FIELDS = ("subreddit", "title", "post")
BUNDLED_TLDR = "tldr_posts_dev.jsonl.gz"



def load_tldr(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else bundled_path(BUNDLED_TLDR)
    rows = read_records(path)
    for i, row in enumerate(rows, start=1):
        for key in TLDR_FIELDS:
            if key not in row:
                raise DataError(f"{path}: row {i} has no field {key!r} (needs {', '.join(TLDR_FIELDS)})")
            if not isinstance(row[key], str):
                raise DataError(f"{path}: row {i} field {key!r} must be text, got {type(row[key]).__name__}")
        if not row["post"].strip():
            raise DataError(f"{path}: row {i} field 'post' is empty")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def post_block(row: dict) -> str:
    """The post as the OpenAI TL;DR convention writes it (SUBREDDIT / TITLE / POST)."""
    return f"SUBREDDIT: r/{row['subreddit']}\nTITLE: {row['title']}\nPOST: {row['post'].strip()}"


def policy_prompt(row: dict, tokenizer, prompt_format: str, instruction: str) -> str:
    if prompt_format == "raw":
        return post_block(row) + "\n\nTL;DR:"
    messages = [{"role": "user", "content": f"{instruction}\n\n{post_block(row)}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def dialogue_messages(transcript: str) -> list[dict]:
    """An HH transcript ("Human: ...\n\nAssistant: ...", ending at the open "Assistant:")
    as chat messages, so a chat policy answers it in its own template."""
    import re

    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", transcript.strip())
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"dialogue does not end with a Human turn: {transcript[-80:]!r}")
    return messages


@dataclass
class PromptSet:
    train: list[dict]  # each: prompt_id, prompt_text, prompt_token_ids, reference, context
    heldout: list[dict]
    skipped_long: int = 0
    truncated: int = 0
    notes: list[str] = field(default_factory=list)


def build_prompts(rows: list[dict], tokenizer, task) -> PromptSet:
    """Tokenize every post's prompt, applying the long-prompt policy (counted, never silent).
    The last `task.heldout_size` usable rows are held out for evaluation."""
    items, skipped, truncated = [], 0, 0
    for i, row in enumerate(rows):
        text = policy_prompt(row, tokenizer, task.prompt_format, task.instruction)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > task.max_prompt_tokens:
            if task.on_long_prompt == "error":
                raise DataError(f"row {i + 1}: prompt has {len(ids)} tokens > task.max_prompt_tokens="
                                f"{task.max_prompt_tokens} (set task.on_long_prompt to skip or truncate)")
            if task.on_long_prompt == "skip":
                skipped += 1
                continue
            # keep the end (the instruction/answer cue), drop the start of the post
            ids = ids[-task.max_prompt_tokens:]
            text = tokenizer.decode(ids)
            truncated += 1
        items.append({"prompt_id": f"tldr-{i}", "prompt_text": text, "prompt_token_ids": ids,
                      "reference": row.get("summary"), "context": post_block(row)})
    if len(items) <= task.heldout_size:
        raise DataError(f"only {len(items)} usable prompts (skipped {skipped} longer than "
                        f"task.max_prompt_tokens={task.max_prompt_tokens}); need more than "
                        f"task.heldout_size={task.heldout_size}")
    cut = len(items) - task.heldout_size
    return PromptSet(train=items[:cut], heldout=items[cut:], skipped_long=skipped, truncated=truncated)


BUNDLED = {  # name -> (file, labeler task)
    "hh_harmless": ("hh_harmless_dev.jsonl.gz", "harmless"),
    "hh_helpful": ("hh_helpful_dev.jsonl.gz", "helpful"),
    "pandalm": ("pandalm_helpful_pairs_dev.jsonl.gz", "helpful"),
    # TL;DR reference vs a PPO sample; the label is GPT-4's choice (AI feedback, not human)
    "tldr_ai_judged": ("tldr_ai_judged_pairs_dev.jsonl.gz", "summarization"),
}
ASSISTANT = "\n\nAssistant:"
# configs/exemplars/*.jsonl are the last rows of the bundled HH dev sets: those rows serve as
# few-shot exemplars and are never evaluated (RL held-out prompts, RM held-out pairs)
EXEMPLAR_ROWS = 2


def split_transcript(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(shared context up to the last 'Assistant:', chosen reply, rejected reply)."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[:cut + len(ASSISTANT)]):
        raise DataError(f"{where}: 'chosen' and 'rejected' do not share a context ending in 'Assistant:'")
    head = cut + len(ASSISTANT)
    return chosen[:head].strip(), chosen[head:].strip(), rejected[head:].strip()


def dialogue_prompts(name: str, tokenizer, task) -> PromptSet:
    """RL prompts from the dialogue contexts of a bundled HH pair set (docs/method.md §3: helpful
    and harmless RL starts from the preference data's contexts), in the chat template.
    Rows without a shared context are skipped and counted, like over-long prompts."""
    rows = read_records(bundled_path(BUNDLED[name][0]))[:-EXEMPLAR_ROWS]  # exemplar rows: never prompts
    items, skipped, truncated, bad = [], 0, 0, 0
    for i, row in enumerate(rows, start=1):
        try:
            context, chosen, _ = split_transcript(str(row.get("chosen")), str(row.get("rejected")), f"{name} row {i}")
            messages = dialogue_messages(context)
        except DataError:
            bad += 1
            continue
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if len(ids) > task.max_prompt_tokens:
            if task.on_long_prompt == "error":
                raise DataError(f"{name} row {i}: prompt has {len(ids)} tokens > task.max_prompt_tokens="
                                f"{task.max_prompt_tokens}")
            if task.on_long_prompt == "skip":
                skipped += 1
                continue
            ids, truncated = ids[-task.max_prompt_tokens:], truncated + 1
        items.append({"prompt_id": f"{name}-{i}", "prompt_text": tokenizer.decode(ids), "prompt_token_ids": ids,
                      "reference": chosen, "context": context})
    if len(items) <= task.heldout_size:
        raise DataError(f"{name}: only {len(items)} usable prompts; need more than task.heldout_size={task.heldout_size}")
    cut = len(items) - task.heldout_size
    return PromptSet(train=items[:cut], heldout=items[cut:], skipped_long=skipped, truncated=truncated,
                     notes=[f"{bad} rows without a shared dialogue context skipped"] if bad else [])


def task_prompts(task, tokenizer) -> PromptSet:
    """The RL prompt set of a task: TL;DR posts, or HH dialogue contexts."""
    if task.name == "tldr":
        return build_prompts(load_tldr(task.data_path), tokenizer, task)
    return dialogue_prompts(task.name, tokenizer, task)


class PromptSampler:
    """Shuffled epochs over the train prompts; its state (epoch, position) is checkpointed."""

    def __init__(self, items: list[dict], seed: int):
        self.items, self.seed = items, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self.items):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)


def prompt_batch(items: list[dict]):
    return schemas.make_batch(schemas.PROMPT, {
        name: [it[name] for it in items] for name in schemas.PROMPT.names})
