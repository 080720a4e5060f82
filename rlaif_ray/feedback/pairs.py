"""Response-pair data: the bundled human-labelled sets (HH-format transcripts, PandaLM,
TL;DR), a user's own file of human-labelled pairs (`eval-labeler --data FILE`), few-shot
exemplars, the input rows of `label`, and the reward model's held-out pairs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlaif_ray.config import ConfigError, RMConfig
from rlaif_ray.data.files import DataError, bundled_path, read_records
from rlaif_ray.data.tasks import BUNDLED, EXEMPLAR_ROWS, post_block, split_transcript
from rlaif_ray.feedback.prompts import Exemplar, harmful_question


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


# ---- the user's own human-labelled pairs (`eval-labeler --data FILE`) ----------------------

PAIR_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # any case: .JSONL.GZ, .Parquet
PAIR_FORMS = "either 'chosen'/'rejected' (HH transcripts) or 'context'/'response_1'/'response_2'/'label'"


@dataclass(frozen=True)
class PairFile:
    """A file of human-labelled pairs, read and checked whole (preflight, before any model
    loads). `rows`: each usable row as (id, context, the response the human preferred, the
    other one), in file order; `skipped`: one reason per row left out (counted and reported,
    never dropped silently); `total`: the file's rows."""
    path: str
    rows: tuple[tuple[str, str, str, str], ...]
    skipped: tuple[str, ...]
    total: int


def looks_like_file(name: str) -> bool:
    """A `--data` entry that names a file rather than a bundled set (bundled names hold no
    '.' or '/')."""
    return any(c in name for c in "./\\")


def _text(row: dict, key: str, where: str, form: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where} has no field {key!r} ({form} form)")
    if not isinstance(row[key], str):
        raise DataError(f"{where} field {key!r} must be text, got {type(row[key]).__name__}")
    if not row[key].strip():
        raise DataError(f"{where} field {key!r} is empty")
    return row[key]


def _label(value, where: str) -> int:
    """1 or 2 as int, text or a whole float (Parquet columns with nulls come as floats)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and value in (1, 2)) \
        or (isinstance(value, str) and value.strip() in ("1", "2"))
    if not ok:
        raise DataError(f"{where} field 'label' must be 1 or 2 (the response the human preferred), got {value!r}")
    return int(float(value))


def read_pair_file(path: str | Path) -> PairFile:
    """Human-labelled pairs from a JSONL (optionally .gz) or Parquet file, one pair a row, in
    either form: `chosen`/`rejected` as in the bundled HH files (two transcripts sharing the
    dialogue up to the last 'Assistant:'; the human preferred `chosen`), or `context`,
    `response_1`, `response_2` and `label` (1 or 2: the response the human preferred). A row
    missing a field, with a field that is not text or empty, or a label other than 1/2 stops
    with the file, row and field named; a row that cannot be a pair (HH transcripts without a
    shared context, or the same response twice) is skipped with its reason."""
    path = Path(path)
    if not path.name.lower().endswith(PAIR_FILE_SUFFIXES):
        raise DataError(f"{path}: unknown file format (the name ends in neither {', '.join(PAIR_FILE_SUFFIXES)}): "
                        "pairs are read from JSONL, gzip-compressed JSONL or Parquet; name the file accordingly")
    rows = read_records(path)  # a missing file, bad JSON/UTF-8/gzip, a row over MAX_ROW_BYTES: one error
    if not rows:
        raise DataError(f"{path}: no rows (each row is a pair in {PAIR_FORMS} form)")
    usable, skipped = [], []
    for i, row in enumerate(rows, start=1):
        where = f"{path}: row {i}"
        if "chosen" in row or "rejected" in row:
            chosen, rejected = (_text(row, k, where, "chosen/rejected") for k in ("chosen", "rejected"))
            try:
                context, good, bad = split_transcript(chosen, rejected, where)
            except DataError:
                skipped.append(f"row {i}: 'chosen' and 'rejected' do not share a dialogue ending in 'Assistant:'")
                continue
        elif any(k in row for k in ("context", "response_1", "response_2", "label")):
            form = "context/response_1/response_2/label"
            context, first, second = (_text(row, k, where, form) for k in ("context", "response_1", "response_2"))
            if "label" not in row or row["label"] is None:
                raise DataError(f"{where} has no field 'label' ({form} form: 1 or 2, the response the human preferred)")
            good, bad = (first, second) if _label(row["label"], where) == 1 else (second, first)
        else:
            fields = ", ".join(map(repr, list(row)[:8])) or "none"
            raise DataError(f"{where} is not a pair: it needs {PAIR_FORMS} (its fields: {fields})")
        if good.strip() == bad.strip():
            skipped.append(f"row {i}: the two responses are the same text (no preference to agree with)")
            continue
        usable.append((f"row-{i}" if row.get("id") is None else str(row["id"]), context, good, bad))
    if not usable:
        raise DataError(f"{path}: no usable pairs: all {len(rows)} rows skipped ({'; '.join(skipped[:3])})")
    return PairFile(str(path), tuple(usable), tuple(skipped), len(rows))


def file_pairs(pf: PairFile, n: int | None = None, seed: int = 0, skip_last: int = 0) -> list[dict]:
    """A pair file's rows as load_pairs gives a bundled set's: the first n usable rows
    (after leaving out `skip_last` at the end, the exemplars), each in a random (seeded)
    order so the human's choice is not always slot a; `human` is the preferred slot."""
    rows = pf.rows[:len(pf.rows) - skip_last] if skip_last else pf.rows
    rng = np.random.default_rng(seed)
    out = []
    for row_id, context, good, bad in rows[:n] if n else rows:
        if rng.random() < 0.5:
            out.append({"id": row_id, "context": context, "response_a": good, "response_b": bad, "human": "a"})
        else:
            out.append({"id": row_id, "context": context, "response_a": bad, "response_b": good, "human": "b"})
    return out


def file_exemplars(pf: PairFile, task: str, k: int) -> tuple:
    """k few-shot exemplars from the last usable rows of a pair file (never evaluated), as
    exemplar_pairs builds them: the preferred response alternately first and second, the
    label in the prompt's own terms (the other response for `harmless`, which asks for the
    more harmful one)."""
    shots = []
    for j, (_, context, good, bad) in enumerate(pf.rows[-k:] if k else ()):
        first, second, good_slot = (good, bad, 1) if j % 2 == 0 else (bad, good, 2)
        shots.append(Exemplar(context, first, second, 3 - good_slot if harmful_question(task) else good_slot))
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


def rm_heldout(r: RMConfig) -> tuple[list[dict], int]:
    """The reward model's held-out human-labelled pairs: the last rm.eval_n usable rows of
    rm.eval_data (a bundled set, minus its exemplar rows; or a file), and how many rows were
    unusable. Their contexts are never fine-tuned on, sampled or labelled for training."""
    if r.eval_data in BUNDLED:
        rows = load_pairs(r.eval_data, keep_bad=True, skip_last=EXEMPLAR_ROWS if r.eval_data.startswith("hh_") else 0)[0]
    elif Path(r.eval_data).is_file():
        rows = read_label_input(r.eval_data)
    else:
        raise ConfigError(f"rm.eval_data: {r.eval_data} is neither a bundled pair set nor a file")
    ok = [{**x, "error": None} for x in rows if not x.get("error") and x.get("human") in ("a", "b")]
    return ok[-r.eval_n:], len(rows) - len(ok)
