"""Response-pair data: the bundled human-labelled sets (HH-format transcripts, PandaLM,
TL;DR), few-shot exemplars, the input rows of `label`, and the reward model's held-out
pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config, ConfigError
from .data import BUNDLED, EXEMPLAR_ROWS, DataError, bundled_path, post_block, read_records, split_transcript
from .prompts import Exemplar

def load_pairs(name: str, n: int | None = None, seed: int = 0, skip_last: int = 0,
               keep_bad: bool = False) -> tuple[list[dict], str]:
    """Pairs with a human label, each presented in a random (seeded) order so the human's
    choice is not always slot a. Returns (pairs, labeler task). `skip_last` rows at the end
    are left out (they serve as few-shot exemplars). A row without a shared context raises,
    or with keep_bad comes back with an `error` and no label."""
    if name not in BUNDLED:
        raise DataError(f"unknown pair set {name!r} (one of {sorted(BUNDLED)})")
    file, task = BUNDLED[name]
    rows = read_records(bundled_path(file))
    rows = rows[:len(rows) - skip_last] if skip_last else rows
    rng = np.random.default_rng(seed)
    out = []
    if name == "tldr_ai_judged":
        for i, row in enumerate(rows[:n] if n else rows, start=1):
            if str(row.get("choice")) not in ("0", "1"):
                raise DataError(f"{file}: row {i} has no 'choice' of 0 or 1")
            out.append({"id": f"{name}-{i}", "context": post_block(row), "response_a": row["summary_0"],
                        "response_b": row["summary_1"], "human": "a" if str(row["choice"]) == "0" else "b"})
        return out, task
    for i, row in enumerate(rows[:n] if n else rows, start=1):
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{file}: row {i} has no text field {key!r}")
        try:
            context, good, bad = split_transcript(row["chosen"], row["rejected"], f"{file} row {i}")
        except DataError as e:
            if not keep_bad:
                raise
            # kept with the reason, so a caller can count it (never dropped silently)
            out.append({"id": f"{name}-{i}", "context": "", "response_a": "", "response_b": "", "human": None,
                        "error": str(e)})
            continue
        if rng.random() < 0.5:
            out.append({"id": f"{name}-{i}", "context": context, "response_a": good, "response_b": bad, "human": "a"})
        else:
            out.append({"id": f"{name}-{i}", "context": context, "response_a": bad, "response_b": good, "human": "b"})
    return out, task


def exemplar_pairs(name: str, k: int):
    """k few-shot exemplars from the last rows of a set (never evaluated), label = slot of
    the response the prompt asks for (the chosen one; the rejected one for `harmless`)."""
    file, task = BUNDLED[name]
    rows = read_records(bundled_path(file))[-k:] if k else []
    shots = []
    if name == "tldr_ai_judged":
        for row in rows:
            shots.append(Exemplar(post_block(row), row["summary_0"], row["summary_1"], int(row["choice"]) + 1))
        return tuple(shots)
    for j, row in enumerate(rows):
        context, good, bad = split_transcript(row["chosen"], row["rejected"], f"{file} exemplar {j}")
        first, second, good_slot = (good, bad, 1) if j % 2 == 0 else (bad, good, 2)
        label = (3 - good_slot) if task == "harmless" else good_slot
        shots.append(Exemplar(context, first, second, label))
    return tuple(shots)


def load_exemplars(path: str | None, k: int):
    """The first k exemplars of a JSONL/Parquet file with context, response_1, response_2,
    label (1 or 2, in the prompt's own terms) and an optional rationale."""
    if not k:
        return ()
    if not path:
        raise DataError(f"reward.pairwise.shots={k} needs reward.pairwise.exemplars_path")
    rows = read_records(path)
    if len(rows) < k:
        raise DataError(f"{path}: {k} exemplars asked for (reward.pairwise.shots), the file has {len(rows)}")
    shots = []
    for i, row in enumerate(rows[:k], start=1):
        for key in ("context", "response_1", "response_2"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{path}: exemplar row {i} has no text field {key!r}")
        if row.get("label") not in (1, 2, "1", "2"):
            raise DataError(f"{path}: exemplar row {i}: 'label' must be 1 or 2, got {row.get('label')!r}")
        shots.append(Exemplar(row["context"], row["response_1"], row["response_2"], int(row["label"]),
                              str(row.get("rationale") or "")))
    return tuple(shots)


def read_label_input(source: str) -> list[dict]:
    """Rows for `rlaif-ray label`: a bundled pair set's name (with its reference label) or a
    JSONL/Parquet file with context, response_a, response_b and an optional human label
    ("a"/"b") and id. A bad row is kept, with an `error` naming the row and field, so the
    output accounts for every input row."""
    if source in BUNDLED:
        rows, _ = load_pairs(source)
        return [{**r, "error": None} for r in rows]
    out = []
    for i, row in enumerate(read_records(source), start=1):
        error = None
        for key in ("context", "response_a", "response_b"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                error = error or f"{source} row {i}: field {key!r} is missing or not a non-empty string"
        human = row.get("human")
        if human is not None and str(human).lower() not in ("a", "b"):
            error = error or f"{source} row {i}: field 'human' must be 'a', 'b' or absent, got {human!r}"
        text = {k: row[k] if isinstance(row.get(k), str) else "" for k in ("context", "response_a", "response_b")}
        out.append({"id": str(row.get("id", f"row-{i}")), **text,
                    "human": None if human is None or error else str(human).lower(), "error": error})
    return out


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: how contexts are compared across data sets."""
    return " ".join(str(text).split())


def rm_heldout(cfg: Config) -> tuple[list[dict], int]:
    """The reward model's held-out human-labelled pairs: the last rm.eval_n usable rows of
    rm.eval_data (a bundled set, minus its exemplar rows; or a file), and how many rows were
    unusable. Their contexts are never fine-tuned on, sampled or labelled for training."""
    r = cfg.rm
    if r.eval_data in BUNDLED:
        rows = load_pairs(r.eval_data, keep_bad=True, skip_last=EXEMPLAR_ROWS if r.eval_data.startswith("hh_") else 0)[0]
    elif Path(r.eval_data).is_file():
        rows = read_label_input(r.eval_data)
    else:
        raise ConfigError(f"rm.eval_data: {r.eval_data} is neither a bundled pair set nor a file")
    ok = [{**x, "error": None} for x in rows if not x.get("error") and x.get("human") in ("a", "b")]
    return ok[-r.eval_n:], len(rows) - len(ok)
