"""Pairwise AI-labeler prompts (METHOD.md 1.1-1.5): preamble, optional exemplars wrapped
in the paper's separators, the sample, and the ending after which "1" or "2" is read.

Preambles are plain text files in rlaif_ray/templates/ (TASK_PREAMBLE.txt) that a user can
read, copy and replace. `summarization_detailed.txt` is this project's wording of the
structure the paper gives in its Table 16 (good-summary definition, four axes, the reworded
final instruction), not a verbatim copy. For the dialogue tasks the paper shows only the base
preambles; `helpful_detailed.txt` and `harmless_detailed.txt` are this project's own
wording in the same structure (axes with guiding questions, the base instruction reworded
at the end), so the base/detailed comparison can be run on every task (METHOD.md 1.2 marks
the dialogue texts unconfirmed).

The harmless preamble asks for the *most harmful* response; `harmful_question` marks it so
the caller inverts the label (the output is always a preference for the better response).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

EXAMPLE_OPEN = "»»»» Example »»»»"
EXAMPLE_CLOSE = "»»»» Follow the instructions and the example(s) above »»»»"

LAYOUT = {  # task -> (context label, response label, ending)
    "summarization": ("Text", "Summary", "Preferred Summary="),
    "helpful": ("Context", "Response", "Preferred Response="),
    "harmless": ("Context", "Response", "Preferred Response="),
}

COT_REQUEST = {
    "summarization": ("Consider the coherence, accuracy, coverage, and overall quality of each summary "
                      "and explain which one is better."),
    "helpful": ("First, discuss the helpfulness and honesty of each response. Then, explain which one is "
                "better overall and why. Finally, select which response is the most helpful and honest."),
    "harmless": ("First, discuss the harmfulness of each response. Then, explain which one is more harmful "
                 "overall and why. Finally, select which response is the most harmful."),
}


@dataclass(frozen=True)
class Exemplar:
    context: str
    response_1: str
    response_2: str
    label: int  # 1 or 2, in the prompt's own terms (the harmful one for `harmless`)
    rationale: str = ""


def preamble(task: str, kind: str) -> str:
    if task not in LAYOUT:
        raise ValueError(f"labeler task: unknown task {task!r} (one of {sorted(LAYOUT)})")
    path = resources.files("rlaif_ray") / "templates" / f"{task}_{kind}.txt"
    if not path.is_file():
        raise ValueError(f"labeler preamble: no {kind!r} preamble for task {task!r} (rlaif_ray/templates/)")
    return path.read_text(encoding="utf-8").strip()


def harmful_question(task: str) -> bool:
    """True when the prompt asks for the worse response, so P(1) must be inverted."""
    return task == "harmless"


def sample_block(task: str, context: str, first: str, second: str) -> str:
    ctx, resp, _ = LAYOUT[task]
    return f"{ctx} - {context}\n{resp} 1 - {first}\n{resp} 2 - {second}"


def build(task: str, context: str, first: str, second: str, *, kind: str = "base",
          exemplars: tuple[Exemplar, ...] = (), rationale: str | None = None, cot: bool = False) -> str:
    """The prompt text. With `cot=True` and no rationale yet it ends with the reasoning request
    and `Rationale:` (step 1); pass the decoded `rationale` to get the scoring prompt (step 2)."""
    parts = [preamble(task, kind)]  # checks the task and preamble names
    _, _, ending = LAYOUT[task]
    if exemplars:
        for ex in exemplars:
            shot = [EXAMPLE_OPEN, sample_block(task, ex.context, ex.response_1, ex.response_2)]
            if ex.rationale:
                shot.append(f"{COT_REQUEST[task]}\nRationale: {ex.rationale}")
            shot.append(f"{ending}{ex.label}")
            parts.append("\n".join(shot))
        parts.append(EXAMPLE_CLOSE)
    parts.append(sample_block(task, context, first, second))
    if cot:
        head = "\n\n".join(parts) + f"\n\n{COT_REQUEST[task]}\nRationale:"
        return head if rationale is None else f"{head} {rationale.strip()}\n{ending}"
    return "\n\n".join(parts) + f"\n{ending}"
