"""Tasks: the prompts a policy answers, as a `PromptSet` (tokenized prompts with the context
the judge sees, a reference when the data has one, and the row's other columns), split into
train and held out, and a deterministic, resumable prompt sampler.

One mechanism for every task: rows from any source (rlaif_ray.data.files.read_rows), the
data's columns renamed to the names the task reads (task.columns), each row made a prompt,
over-long prompts skipped or truncated and counted, bad rows skipped and counted. The paper's
tasks are presets of it: tldr (posts to summarise, the same prompts as always) and
hh_helpful / hh_harmless (the dialogue contexts of the bundled HH pairs); generic is your own."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlaif_ray.config import template_fields
from rlaif_ray.data import schemas
from rlaif_ray.data.files import DataError, bundled_path, read_records, read_rows

TLDR_FIELDS = ("subreddit", "title", "post")
BUNDLED_TLDR = "tldr_posts_dev.jsonl.gz"



def map_columns(rows: list[dict], columns: dict[str, str], where: str) -> list[dict]:
    """The data's columns also under the names a task reads (task.columns: {name: column}; the
    originals stay, so a rubric or a reward may name either); a column the data lacks is one
    DataError naming the source and the column."""
    if not rows:
        raise DataError(f"{where}: no rows (the file is empty)")
    if not columns:
        return rows
    present = set().union(*(r.keys() for r in rows))
    for ours, theirs in columns.items():
        if theirs not in present:
            raise DataError(f"{where}: no column {theirs!r} (task.columns.{ours}); its columns are "
                            f"{', '.join(sorted(present)) or 'none'}")
    return [{**r, **{ours: r.get(col) for ours, col in columns.items()}} for r in rows]


def load_tldr(path: str | Path | None = None, columns: dict[str, str] | None = None, split: str = "train",
              revision: str | None = None) -> list[dict]:
    """TL;DR posts: the bundled ones, or any source read_rows takes (`columns` renames the
    data's columns to subreddit, title, post, summary)."""
    path = path or bundled_path(BUNDLED_TLDR)
    rows = map_columns(read_rows(str(path), split, revision), columns or {}, str(path))
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
    train: list[dict]  # each: prompt_id, prompt_text, prompt_token_ids, reference, context, fields
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
        ids, cut = fit_prompt(tokenizer(text, add_special_tokens=False)["input_ids"], task, f"row {i + 1}")
        if ids is None:
            skipped += 1
            continue
        truncated += cut
        items.append({"prompt_id": f"tldr-{i}", "prompt_text": tokenizer.decode(ids) if cut else text,
                      "prompt_token_ids": ids, "reference": row.get("summary"), "context": post_block(row),
                      "fields": {k: v for k, v in row.items() if k not in ("post", "summary")}})
    return split_prompts(items, task, skipped, truncated, [], "")


def fit_prompt(ids: list[int], task, where: str) -> tuple[list[int] | None, bool]:
    """task.on_long_prompt on a tokenized prompt: (its ids, or None to skip it; whether cut).
    A cut keeps the end (the instruction and the answer cue) and drops the start."""
    if len(ids) <= task.max_prompt_tokens:
        return ids, False
    if task.on_long_prompt == "error":
        raise DataError(f"{where}: prompt has {len(ids)} tokens > task.max_prompt_tokens={task.max_prompt_tokens} "
                        "(set task.on_long_prompt to skip or truncate)")
    if task.on_long_prompt == "skip":
        return None, False
    return ids[-task.max_prompt_tokens:], True


def split_prompts(items: list[dict], task, skipped: int, truncated: int, notes: list[str], where: str) -> PromptSet:
    """The last task.heldout_size usable prompts held out for evaluation, never trained on."""
    if len(items) <= task.heldout_size:
        raise DataError(f"{where + ': ' if where else ''}only {len(items)} usable prompts (skipped {skipped} longer than "
                        f"task.max_prompt_tokens={task.max_prompt_tokens}" + (f"; {notes[0]}" if notes else "")
                        + f"); need more than task.heldout_size={task.heldout_size}")
    cut = len(items) - task.heldout_size
    return PromptSet(train=items[:cut], heldout=items[cut:], skipped_long=skipped, truncated=truncated, notes=notes)


def transcript(messages: list[dict]) -> str:
    """A chat as the judge reads it: "Human: ...\n\nAssistant: ..." (the HH convention)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def render(template: str, row: dict) -> str:
    """A template's fields filled from a row ({{ and }} are literal braces)."""
    return template.format_map({k: "" if row.get(k) is None else row[k] for k in template_fields(template)})


def check_template(template: str, present: set[str], key: str, where: str) -> None:
    """Every field of a template is a column of the data: else one DataError naming both."""
    missing = [f for f in template_fields(template) if f not in present]
    if missing:
        raise DataError(f"{key} uses {{{missing[0]}}}, which {where} has no column of; its columns are "
                        f"{', '.join(sorted(present)) or 'none'}")


def _row_prompt(row: dict, task) -> tuple[list[dict] | None, str]:
    """(chat messages or None, the prompt's text) of a generic row; ValueError says what is
    wrong with the row (skipped and counted by the caller)."""
    if task.prompt_template is not None:
        empty = [k for k in template_fields(task.prompt_template)
                 if row.get(k) is None or (isinstance(row.get(k), str) and not row[k].strip())]
        if empty:
            raise ValueError(f"no value for {', '.join(empty)}")
        return None, render(task.prompt_template, row)
    messages = row.get("messages")
    if messages is not None:
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ValueError("'messages' is not a list of {role, content} texts")
        if messages[-1]["role"] != "user":
            raise ValueError("'messages' does not end with a user turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages], transcript(messages)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty 'prompt'" if isinstance(prompt, str) or prompt is None else "'prompt' is not text")
    return None, prompt


def _tokens(tokenizer, messages: list[dict] | None, text: str, task) -> list[int]:
    if task.prompt_format == "raw":
        return tokenizer(transcript(messages) + "\n\nAssistant:" if messages else text,
                         add_special_tokens=False)["input_ids"]
    chat = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt else []) + \
        (messages or [{"role": "user", "content": text}])
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def generic_prompts(task, tokenizer) -> PromptSet:
    """Your own prompts (task.name generic): one a row, from a `prompt` text, a `messages` chat
    list or task.prompt_template; bad rows are skipped and counted (the first few named)."""
    rows = map_columns(read_rows(task.data_path, task.split, task.revision), task.columns, task.data_path)
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    if task.prompt_template is not None:
        check_template(task.prompt_template, present, "task.prompt_template", task.data_path)
    elif not present & {"prompt", "messages"}:
        raise DataError(f"{task.data_path}: no column 'prompt' or 'messages' (name yours with task.columns.prompt, "
                        f"or write task.prompt_template); its columns are {', '.join(sorted(present)) or 'none'}")
    items, bad, skipped, truncated = [], [], 0, 0
    for i, row in enumerate(rows, start=1):
        try:
            messages, text = _row_prompt(row, task)
        except ValueError as e:
            bad.append(f"row {i}: {e}")
            continue
        ids, cut = fit_prompt(_tokens(tokenizer, messages, text, task), task, f"{task.data_path} row {i}")
        if ids is None:
            skipped += 1
            continue
        truncated += cut
        items.append({"prompt_id": f"row-{i}", "prompt_text": tokenizer.decode(ids), "prompt_token_ids": ids,
                      "reference": row.get("reference") if isinstance(row.get("reference"), str) else None,
                      "context": text, "fields": {k: v for k, v in row.items()
                                                  if k not in ("prompt", "messages", "reference")}})
    notes = [f"{len(bad)} rows skipped as unusable ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''})"] \
        if bad else []
    return split_prompts(items, task, skipped, truncated, notes, task.data_path)


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
        ids, cut = fit_prompt(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids), task,
                              f"{name} row {i}")
        if ids is None:
            skipped += 1
            continue
        truncated += cut
        items.append({"prompt_id": f"{name}-{i}", "prompt_text": tokenizer.decode(ids), "prompt_token_ids": ids,
                      "reference": chosen, "context": context, "fields": {}})
    return split_prompts(items, task, skipped, truncated,
                         [f"{bad} rows without a shared dialogue context skipped"] if bad else [], name)


def task_prompts(task, tokenizer) -> PromptSet:
    """The RL prompt set of a task: TL;DR posts, HH dialogue contexts, or your own (generic)."""
    if task.name == "tldr":
        return build_prompts(load_tldr(task.data_path, task.columns, task.split, task.revision), tokenizer, task)
    if task.name == "generic":
        return generic_prompts(task, tokenizer)
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
    """Prompt items as a PROMPT batch; an item's `fields` (its row's other columns) travel as JSON."""
    cols = {name: [it.get(name) for it in items] for name in schemas.PROMPT.names}
    cols["fields"] = [schemas.dump_fields(it.get("fields")) for it in items]
    return schemas.make_batch(schemas.PROMPT, cols)
