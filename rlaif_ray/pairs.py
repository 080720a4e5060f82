"""Response-pair data for the AI labeler (HH-format transcripts) and the alignment and
position-bias metrics of METHOD.md section 7."""
from __future__ import annotations

import numpy as np

from .data import DataError, bundled_path, read_records
from .signal import wilson_interval

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
        from .data import post_block

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
    from .prompts import Exemplar

    file, task = BUNDLED[name]
    rows = read_records(bundled_path(file))[-k:] if k else []
    shots = []
    if name == "tldr_ai_judged":
        from .data import post_block

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
    from .prompts import Exemplar

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


def alignment(p_a: list[float], human: list[str]) -> dict:
    """z_acc = mean 1[argmax P_AI == human]; an exact 0.5 counts half. With a 95% CI."""
    hits = sum(0.5 if p == 0.5 else float((p > 0.5) == (h == "a")) for p, h in zip(p_a, human))
    n = len(human)
    lo, hi = wilson_interval(hits, n)
    return {"n": n, "alignment": hits / n if n else float("nan"), "ci95": [lo, hi]}


def position_bias(p_ab: list[float], p_ba: list[float]) -> dict:
    """Share of pairs where the same slot wins in both orders, and which slot."""
    first = sum(1 for x, y in zip(p_ab, p_ba) if x > 0.5 and y > 0.5)
    second = sum(1 for x, y in zip(p_ab, p_ba) if x < 0.5 and y < 0.5)
    n = len(p_ab)
    same = first + second
    return {"same_position_share": same / n if n else float("nan"),
            "of_which_first_slot": first / same if same else float("nan")}


def parse_variant(text: str) -> tuple[str, bool, int]:
    """'base', 'detailed:2', 'base+cot', 'detailed+cot:1' -> (preamble, cot, shots)."""
    head, _, k = text.partition(":")
    preamble, _, cot = head.partition("+")
    if preamble not in ("base", "detailed") or cot not in ("", "cot") or (k and not k.isdigit()):
        raise ValueError(f"prompt variant {text!r}: expected PREAMBLE[+cot][:K], e.g. base, detailed+cot, base:2")
    return preamble, cot == "cot", int(k or 0)


def evaluate_labeler(judge, name: str, variant: str, n: int, seed: int = 0, cot_max_tokens: int = 64) -> dict:
    """Alignment with the human label (debiased, and from the first order alone) and the
    position-bias figures for one pair set and one prompt variant."""
    from .labeling import PairwiseOptions

    preamble, cot, k = parse_variant(variant)
    rows, task = load_pairs(name, n, seed, skip_last=k)
    opts = PairwiseOptions(task=task, preamble=preamble, shots=exemplar_pairs(name, k), cot=cot,
                           cot_max_tokens=cot_max_tokens)
    p_a, p_ab, p_ba = judge.prefer([r["context"] for r in rows], [r["response_a"] for r in rows],
                                   [r["response_b"] for r in rows], opts)
    human = [r["human"] for r in rows]
    return {"data": name, "variant": variant, "task": task, **alignment(p_a, human),
            "single_order_alignment": alignment(p_ab, human)["alignment"], **position_bias(p_ab, p_ba)}
