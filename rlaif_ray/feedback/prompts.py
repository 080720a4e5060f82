"""Pairwise AI-labeler prompts (docs/method.md §1.1-1.5): preamble, optional exemplars wrapped
in the paper's separators, the sample, and the ending after which "1" or "2" is read.

Preambles are plain text files in rlaif_ray/feedback/templates/ (TASK_PREAMBLE.txt) that a user can
read, copy and replace. `summarization_base.txt` and `summarization_detailed.txt` carry the
paper's Table 16 text (the detailed one: good-summary definition, four axes with guiding
questions, the reworded final instruction). For the dialogue tasks the paper shows only the
base preambles; `helpful_detailed.txt` and `harmless_detailed.txt` are this project's own
wording in the same structure (axes with guiding questions, the base instruction reworded
at the end), so the base/detailed comparison can be run on every task (docs/method.md §1.2 marks
the dialogue texts unconfirmed).

Chain of thought (docs/method.md §1.5) changes three things:
- the preamble's final paragraph no longer asks for an answer: "output 1 or 2 to indicate
  which summary ..." becomes "explain which summary ..." (the paper's "Detailed + CoT"
  wording; the base summarization preamble gets the same rewording, which the paper does
  not show). The dialogue preambles say "choose the most ... response", which the paper's
  helpful "Base + CoT 0-shot" prompt keeps unchanged, so they are the same with and
  without CoT;
- zero-shot (or with exemplars that carry no rationale): the ending is the task's reasoning
  request followed by `Rationale:`;
- few-shot, exemplars with rationales: each exemplar shows its reasoning after the cue
  `Thoughts on Summary 1 -` (dialogue: `Thoughts on Response 1 -`) and then its label, and
  the sample's ending is that cue, so the labeler continues in the exemplars' form.
Step 2 (the scoring prompt) is step 1, the decoded rationale and the standard ending. A
decoded rationale is cut where it writes the ending itself (e.g. "Preferred Summary=1"
copied from the exemplars), so the label is always read at the ending this code appends.
Without CoT, exemplar rationales are not shown (the paper's non-CoT few-shot prompts show
labels only).

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

COT_REQUEST = {  # zero-shot CoT ending, before "Rationale:" (harmless: this project's wording)
    "summarization": ("Consider the coherence, accuracy, coverage, and overall quality of each summary "
                      "and explain which one is better."),
    "helpful": ("First, discuss the helpfulness and honesty of each response. Then, explain which one is "
                "better overall and why. Finally, select which response is the most helpful and honest."),
    "harmless": ("First, discuss the harmfulness of each response. Then, explain which one is more harmful "
                 "overall and why. Finally, select which response is the most harmful."),
}

# a chat rubric with CoT: the user message after the judge's rationale, before the label
CHAT_COT_ANSWER = "So which response is better? Reply with 1 or 2 only."

# CoT rewording of the preamble's final paragraph: an explanation is asked for, not an answer
COT_REWORD = ("output 1 or 2 to indicate which", "explain which")


@dataclass(frozen=True)
class Exemplar:
    context: str
    response_1: str
    response_2: str
    label: int  # 1 or 2, in the prompt's own terms (the harmful one for `harmless`)
    # few-shot CoT reasoning shown after the cue "Thoughts on Summary 1 -" (a leading copy
    # of the cue is dropped): per-axis notes on response 1, then "Thoughts on ... 2 -" ...
    rationale: str = ""


@dataclass(frozen=True)
class PairwiseRubric:
    """A pairwise question of the user's (reward.rubrics, kind pairwise) in place of a task's
    preamble and layout: `template` is the sample block, with {prompt}, {response_1},
    {response_2} and any column of the data; exemplars, CoT and self-consistency compose with
    it as with the paper's tasks."""
    template: str
    preamble: str = ""
    ending: str = "Preferred Response="
    asks_worse: bool = False
    cot_request: str = "Explain which response is better."
    # chat: the prompt is one user message (the judge's chat template, or its chat API) and the
    # answer is the reply's first token, so `ending` is not used; with CoT the rationale is the
    # reply and CHAT_COT_ANSWER the next user message
    chat: bool = False

    def sample(self, context: str, first: str, second: str, fields: dict | None = None) -> str:
        from rlaif_ray.data.tasks import render

        return render(self.template, {**(fields or {}), "prompt": context, "response_1": first, "response_2": second})


def preamble(task: "str | PairwiseRubric", kind: str, cot: bool = False) -> str:
    """The preamble text; with `cot` its final paragraph asks to explain instead of to answer."""
    if isinstance(task, PairwiseRubric):
        return task.preamble.strip()
    if task not in LAYOUT:
        raise ValueError(f"labeler task: unknown task {task!r} (one of {sorted(LAYOUT)})")
    path = resources.files("rlaif_ray.feedback") / "templates" / f"{task}_{kind}.txt"
    if not path.is_file():
        raise ValueError(f"labeler preamble: no {kind!r} preamble for task {task!r} (rlaif_ray/feedback/templates/)")
    text = path.read_text(encoding="utf-8").strip()
    if cot:
        head, sep, last = text.rpartition("\n\n")
        text = head + sep + last.replace(*COT_REWORD)
    return text


def thoughts_cue(task: "str | PairwiseRubric") -> str:
    """The few-shot CoT cue: "Thoughts on Summary 1 -" (dialogue, and a rubric: "Thoughts on Response 1 -")."""
    return f"Thoughts on {'Response' if isinstance(task, PairwiseRubric) else LAYOUT[task][1]} 1 -"


def harmful_question(task: "str | PairwiseRubric") -> bool:
    """True when the prompt asks for the worse response, so P(1) must be inverted."""
    return task.asks_worse if isinstance(task, PairwiseRubric) else task == "harmless"


def ending(task: "str | PairwiseRubric") -> str:
    """What the prompt ends with, right before the label "1" or "2"."""
    return task.ending if isinstance(task, PairwiseRubric) else LAYOUT[task][2]


def sample_block(task: "str | PairwiseRubric", context: str, first: str, second: str, fields: dict | None = None) -> str:
    if isinstance(task, PairwiseRubric):
        return task.sample(context, first, second, fields)
    ctx, resp, _ = LAYOUT[task]
    return f"{ctx} - {context}\n{resp} 1 - {first}\n{resp} 2 - {second}"


def _few_shot_cot(task: str, exemplars: tuple[Exemplar, ...]) -> bool:
    """CoT exemplars in the paper's form: all carry a rationale (none: zero-shot CoT ending)."""
    with_rationale = sum(bool(ex.rationale.strip()) for ex in exemplars)
    if 0 < with_rationale < len(exemplars):
        raise ValueError(f"labeler exemplars ({task}): {with_rationale} of {len(exemplars)} have a rationale; "
                         "for chain of thought give every exemplar a rationale, or none")
    return bool(exemplars) and with_rationale == len(exemplars)


def build(task: "str | PairwiseRubric", context: str, first: str, second: str, *, kind: str = "base",
          exemplars: tuple[Exemplar, ...] = (), rationale: str | None = None, cot: bool = False,
          fields: dict | None = None) -> "str | list[dict]":
    """The prompt text (a chat rubric: chat messages). With `cot=True` and no rationale yet it ends with the reasoning request
    and `Rationale:` (zero-shot) or with "Thoughts on Summary 1 -" (exemplars with rationales)
    (step 1); pass the decoded `rationale` to get the scoring prompt (step 2). `task`: a
    paper's task name or a user's PairwiseRubric; `fields`: the row's columns its template names."""
    parts = [p for p in [preamble(task, kind, cot)] if p]  # checks the task and preamble names
    end = ending(task)
    cue = thoughts_cue(task)
    thoughts = cot and _few_shot_cot(task, exemplars)
    if exemplars:
        for ex in exemplars:
            shot = EXAMPLE_OPEN + "\n" + sample_block(task, ex.context, ex.response_1, ex.response_2)
            if thoughts:
                body = ex.rationale.strip()
                body = body[len(cue):].strip() if body.startswith(cue) else body
                shot += f"\n\n{cue}\n{body}"
            parts.append(f"{shot}\n{end}{ex.label}")
        parts.append(EXAMPLE_CLOSE)
    parts.append(sample_block(task, context, first, second, fields))
    request = task.cot_request if isinstance(task, PairwiseRubric) else COT_REQUEST[task]
    if isinstance(task, PairwiseRubric) and task.chat:
        return _chat(parts, cot, thoughts, cue, request, rationale)
    if not cot:
        return "\n\n".join(parts) + f"\n{end}"
    head = "\n\n".join(parts) + ("\n\n" + cue if thoughts else f"\n\n{request}\nRationale:")
    if rationale is None:
        return head
    text = rationale.split(end)[0].rstrip() if end else rationale.rstrip()  # cut where it writes the ending itself
    if text and not text[0].isspace():
        text = " " + text  # a decoded continuation may have lost its leading space
    return f"{head}{text}\n{end}"


def _chat(parts: list[str], cot: bool, thoughts: bool, cue: str, request: str, rationale: str | None) -> list[dict]:
    """A chat rubric's prompt as messages: the question as one user message; with CoT, the
    reasoning request, then (step 2) the judge's rationale as its reply and the answer request."""
    body = "\n\n".join(parts)
    if not cot:
        return [{"role": "user", "content": body}]
    question = [{"role": "user", "content": body + ("\n\n" + cue if thoughts else f"\n\n{request}")}]
    if rationale is None:
        return question
    return question + [{"role": "assistant", "content": rationale.strip()}, {"role": "user", "content": CHAT_COT_ANSWER}]
