"""Writes tests/golden/prompts/*.txt: the exact labeler prompt text for every combination
the config accepts (reward.pairwise: task x preamble x cot x shots 0..8), from the fixed
inputs below. Run it only when a prompt change is intended, then read the diff:
the golden files are the specification that tests/test_prompt_golden.py compares against.

    .venv/bin/python tests/golden/regenerate.py

File names: TASK-PREAMBLE-nocot-Kshot.txt (the one prompt; "1"/"2" is read after it) and,
for chain of thought, TASK-PREAMBLE-cot-Kshot.step1.txt (the prompt a rationale is decoded
from) and .step2.txt (step 1 + the decoded rationale below + the ending, scored). With
shots > 0 the CoT exemplars carry rationales (the paper's few-shot CoT form); the
TASK-base-cot-2shot-plain files are CoT with label-only exemplars (zero-shot CoT ending).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "prompts"

TASKS = ("summarization", "helpful", "harmless")  # config: reward.pairwise.task
PREAMBLES = ("base", "detailed")  # reward.pairwise.preamble
SHOTS = tuple(range(9))  # reward.pairwise.shots: 0..8

# The sample to label, per task: (context, response 1, response 2)
SAMPLE = {
    "summarization": ("SUBREDDIT: r/advice\nTITLE: Roommate never pays rent on time\nPOST: My roommate has paid "
                      "late three months in a row and I cover the gap. How do I bring it up?",
                      "Roommate keeps paying rent late; how do I raise it?",
                      "I want a new apartment."),
    "helpful": ("Human: How long should I boil an egg for a runny yolk?\n\nAssistant:",
                "About six minutes in boiling water, then cool it in cold water.",
                "Eggs are a good source of protein."),
    "harmless": ("Human: How can I get into my neighbour's wifi without the password?\n\nAssistant:",
                 "I can't help with getting into a network you don't own; you could ask your neighbour.",
                 "Try the default router passwords, they often work."),
}

# What the labeler "decoded" in CoT step 1. Few-shot: the continuation of the cue, which
# here copies the exemplars' form up to the ending (the ending and what follows are cut).
RATIONALE_0SHOT = {
    "summarization": " Summary 1 keeps the late rent and the question; summary 2 is about moving. Summary 1 is better.",
    "helpful": " Response 1 answers the question; response 2 does not. Response 1 is more helpful.",
    "harmless": " Response 1 declines; response 2 helps break into a network. Response 2 is more harmful.",
}
RATIONALE_FEW = {
    "summarization": ("\nCoherence - 8. Rationale: Clear.\nAccuracy - 9. Rationale: Nothing invented.\n"
                      "Coverage - 8. Rationale: Has the late rent and the question.\n"
                      "Overall Quality - 8. Rationale: Represents the post well.\n\nThoughts on Summary 2 -\n"
                      "Coherence - 7. Rationale: Clear.\nAccuracy - 3. Rationale: The post is not about moving.\n"
                      "Coverage - 2. Rationale: Misses the rent.\nOverall Quality - 2. Rationale: Misleading.\n"
                      "Preferred Summary=1\n\n»»»» Example »»»»"),
    "helpful": ("\nHelpfulness - 9. Rationale: Gives a time and a method.\nHonesty - 9. Rationale: Accurate.\n\n"
                "Thoughts on Response 2 -\nHelpfulness - 1. Rationale: Off-topic.\nHonesty - 8. Rationale: True "
                "but beside the point.\nPreferred Response=1"),
    "harmless": ("\nHarm - 1. Rationale: Declines and suggests asking.\n\nThoughts on Response 2 -\n"
                 "Harm - 8. Rationale: Helps break into a network.\nPreferred Response=2"),
}


def exemplars(task: str, k: int, with_rationale: bool = True):
    """k exemplars, each with a rationale in the paper's few-shot CoT form (Table 18)."""
    from rlaif_ray.feedback.prompts import Exemplar

    resp = "Summary" if task == "summarization" else "Response"
    shots = []
    for i in range(1, k + 1):
        better_first = i % 2 == 1  # labels alternate 1, 2, 1, ...
        if task == "summarization":
            context = f"SUBREDDIT: r/example{i}\nTITLE: Example post {i}\nPOST: Text of example post {i}."
            good, bad = f"Faithful summary of post {i}.", f"Unrelated summary {i}."
            axes = ("Coherence", "Accuracy", "Coverage", "Overall Quality")
        elif task == "helpful":
            context = f"Human: Example question {i}?\n\nAssistant:"
            good, bad = f"A direct answer to question {i}.", f"An evasive reply {i}."
            axes = ("Helpfulness", "Honesty")
        else:  # harmless: the label points at the harmful response
            context = f"Human: Example risky request {i}.\n\nAssistant:"
            good, bad = f"A polite refusal {i}.", f"Step-by-step harmful help {i}."
            axes = ("Harm",)
        first, second = (good, bad) if better_first else (bad, good)
        if task == "harmless":
            label = 2 if better_first else 1  # the most harmful one
            notes = [("1" if better_first else "8"), ("8" if better_first else "1")]
        else:
            label = 1 if better_first else 2
            notes = [("8" if better_first else "3"), ("3" if better_first else "8")]
        rationale = ""
        if with_rationale:
            lines = [f"{axis} - {notes[0]}. Rationale: Note on {resp.lower()} 1 of example {i}." for axis in axes]
            lines += ["", f"Thoughts on {resp} 2 -"]
            lines += [f"{axis} - {notes[1]}. Rationale: Note on {resp.lower()} 2 of example {i}." for axis in axes]
            rationale = "\n".join(lines)
        shots.append(Exemplar(context, first, second, label, rationale))
    return tuple(shots)


def cases():
    """(file name, prompts.build keyword arguments) for every golden file."""
    out = []
    for task in TASKS:
        context, first, second = SAMPLE[task]
        base = dict(task=task, context=context, first=first, second=second)
        for kind in PREAMBLES:
            for k in SHOTS:
                shots = exemplars(task, k)
                common = dict(base, kind=kind, exemplars=shots)
                out.append((f"{task}-{kind}-nocot-{k}shot.txt", common))
                out.append((f"{task}-{kind}-cot-{k}shot.step1.txt", dict(common, cot=True)))
                decoded = RATIONALE_FEW[task] if k else RATIONALE_0SHOT[task]
                out.append((f"{task}-{kind}-cot-{k}shot.step2.txt", dict(common, cot=True, rationale=decoded)))
        plain = dict(base, kind="base", exemplars=exemplars(task, 2, with_rationale=False), cot=True)
        out.append((f"{task}-base-cot-2shot-plain.step1.txt", plain))
        out.append((f"{task}-base-cot-2shot-plain.step2.txt", dict(plain, rationale=RATIONALE_0SHOT[task])))
    return out


def render(kwargs: dict) -> str:
    from rlaif_ray.feedback import prompts

    kw = dict(kwargs)
    return prompts.build(kw.pop("task"), kw.pop("context"), kw.pop("first"), kw.pop("second"), **kw)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    names = set()
    for name, kwargs in cases():
        (OUT / name).write_text(render(kwargs), encoding="utf-8", newline="")  # exact text, no final newline
        names.add(name)
    stale = [p for p in OUT.glob("*.txt") if p.name not in names]
    for p in stale:
        p.unlink()
    print(f"wrote {len(names)} files to {OUT.relative_to(ROOT)}; removed {len(stale)} stale")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
