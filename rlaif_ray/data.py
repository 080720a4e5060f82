"""Task data: TL;DR posts (bundled, or your own JSONL/Parquet), prompt templates, the
train/held-out split and a deterministic, resumable prompt sampler."""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import schemas

TLDR_FIELDS = ("subreddit", "title", "post")
BUNDLED_TLDR = "tldr_posts_dev.jsonl.gz"


class DataError(ValueError):
    """Bad data: the message names the file, row and field."""


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("rlaif_ray") / "data" / name))


# One row of any data file (a post, a pair, an exemplar) may hold at most this many bytes,
# checked on the raw line before it is parsed or tokenized. 200 kB is ~50k tokens, several
# times the longest context a run here takes (vLLM caps max_model_len at 8192), so no usable
# prompt is refused; a row this long is a broken export, and tokenizing it costs seconds and
# GBs only to be skipped. A constant, not a config field, so that every reader of a file
# (preflight, the signal check, sft, train-rm, label) applies the same rule.
MAX_ROW_BYTES = 200_000
_GZIP_MAGIC, _PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"


def file_kind(path: str | Path) -> str:
    """'parquet', 'jsonl.gz' or 'jsonl', from the name (case-insensitive: .PARQUET, .JSONL.GZ)."""
    name = Path(path).name.lower()
    return "parquet" if name.endswith(".parquet") else "jsonl.gz" if name.endswith(".gz") else "jsonl"


def _text_bytes(value) -> int:
    """UTF-8 bytes of the text in a row; raises UnicodeEncodeError on a lone surrogate."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


def _check_row(row: dict, path: Path, i: int) -> int:
    """Every text field encodable (JSON's \\ud800-style escapes can make a lone surrogate,
    which no tokenizer takes); returns the row's text bytes."""
    total = 0
    for key, value in row.items():
        try:
            total += _text_bytes(value)
        except UnicodeEncodeError as e:
            raise DataError(f"{path}: row {i} field {key!r} holds a lone surrogate ({e.object[e.start]!r}, "
                            "an unpaired \\ud800-\\udfff escape), which is not text: fix or remove the row") from None
    return total


def _too_long(path: Path, i: int, size: str) -> DataError:
    return DataError(f"{path}: row {i} is {size} bytes, over the limit of {MAX_ROW_BYTES:,} bytes per row "
                     "(rlaif_ray.data.MAX_ROW_BYTES; far longer than any prompt a model here takes): "
                     "remove or shorten the row")


def read_records(path: str | Path) -> list[dict]:
    """JSONL (optionally .gz) or Parquet rows as dicts; errors name file and row. The file
    type comes from the name, case-insensitively; a row over MAX_ROW_BYTES is refused by its
    byte length before it is parsed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    kind = file_kind(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(rows, start=1):
            if (size := _check_row(row, path, i)) > MAX_ROW_BYTES:
                raise _too_long(path, i, f"{size:,}")
        return rows
    if kind == "jsonl.gz" and head[:2] != _GZIP_MAGIC:
        raise DataError(f"{path}: not a gzip file although named .gz (it starts with {head!r}): "
                        "compress it with gzip, or drop the .gz from its name")
    if kind == "jsonl" and head[:2] == _GZIP_MAGIC:
        raise DataError(f"{path}: gzip-compressed data in a file not named .gz: name it .jsonl.gz")
    if kind == "jsonl" and head == _PARQUET_MAGIC:
        raise DataError(f"{path}: a Parquet file not named .parquet: name it .parquet")
    opener = gzip.open if kind == "jsonl.gz" else open
    rows, i = [], 0
    try:
        with opener(path, "rb") as f:
            while raw := f.readline(MAX_ROW_BYTES + 1):
                i += 1
                if len(raw.rstrip(b"\r\n")) > MAX_ROW_BYTES:  # the rest of the line is counted, never kept
                    size = len(raw)
                    while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
                        size += len(raw)
                    raise _too_long(path, i, f"{size:,}")
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: row {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: row {i} must be a JSON object, got {type(row).__name__}")
                _check_row(row, path, i)
                rows.append(row)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        if kind != "jsonl.gz":
            raise
        if isinstance(e, EOFError):
            raise DataError(f"{path}: the gzip file is truncated (it ends inside row {i + 1}, before the end of "
                            "the compressed stream): copy or compress it again") from None
        raise DataError(f"{path}: corrupt gzip data after row {i} ({e}): copy or compress it again") from None
    return rows


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
