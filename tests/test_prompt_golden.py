"""The labeler's prompt text, exactly, for every combination the config accepts
(reward.pairwise: task x preamble x cot x shots 0..8; CoT as step 1 and step 2), against
the files in tests/golden/prompts/ (written once by tests/golden/regenerate.py from the
fixed inputs it holds; this test only compares). A second set of checks reads the golden
files alone against the method (docs/method.md §1.1-1.5), so a wrongly regenerated file fails too."""
import importlib.util
from pathlib import Path

import pytest

from rlaif_ray.feedback import prompts

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_regenerate", GOLDEN / "regenerate.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)
CASES = regen.cases()


def golden(name: str) -> str:
    with open(GOLDEN / "prompts" / name, encoding="utf-8", newline="") as f:
        return f.read()


def test_one_golden_file_per_combination():
    names = {name for name, _ in CASES}
    # 3 tasks x 2 preambles x 9 shot counts: 1 file without CoT, 2 (step 1, step 2) with it;
    # plus CoT with label-only exemplars (2 files per task)
    assert len(names) == len(CASES) == 3 * 2 * 9 * 3 + 3 * 2
    assert {p.name for p in (GOLDEN / "prompts").glob("*.txt")} == names


@pytest.mark.parametrize("name,kwargs", CASES, ids=[n for n, _ in CASES])
def test_prompt_text_matches_golden(name, kwargs):
    assert regen.render(kwargs) == golden(name)


# --- the golden files read against the method, independently of the code -----------------

DETAILED_COT_LAST = ("You are an expert summary rater. Given a piece of text and two of its possible summaries, "
                     "explain which summary best adheres to coherence, accuracy, coverage, and overall quality "
                     "as defined above.")
DETAILED_LAST = DETAILED_COT_LAST.replace("explain which", "output 1 or 2 to indicate which")


def _parts(name):
    task, kind, mode, rest = name.split("-", 3)
    return task, kind, mode, int(rest.split("shot")[0]), "plain" in rest


@pytest.mark.parametrize("name", [n for n, _ in CASES])
def test_golden_files_follow_the_method(name):
    text = golden(name)
    task, kind, mode, k, plain = _parts(name)
    resp = "Summary" if task == "summarization" else "Response"
    ending = f"Preferred {resp}="
    preamble = text.split(f"\n\n{'Text' if task == 'summarization' else 'Context'} - ")[0]
    preamble = preamble.split("\n\n»»»» Example »»»»")[0]
    # exemplars: k of them in the paper's separators
    assert text.count("»»»» Example »»»»") == k
    assert text.count("»»»» Follow the instructions and the example(s) above »»»»") == (1 if k else 0)
    if mode == "nocot":
        assert text.endswith(f"\n{resp} 2 - {regen.SAMPLE[task][2]}\n{ending}")
        assert "Thoughts on" not in text and "Rationale" not in text
        if task == "summarization":
            assert preamble.endswith(DETAILED_LAST if kind == "detailed" else
                                     "output 1 or 2 to indicate which summary is better.")
        return
    # chain of thought: the preamble asks for an explanation, never for "1 or 2"
    assert "output 1 or 2" not in text
    if task == "summarization":
        assert preamble.endswith(DETAILED_COT_LAST if kind == "detailed" else "explain which summary is better.")
    else:  # the paper's helpful Base + CoT prompt keeps "choose the most ... response"
        assert preamble.endswith("response." if kind == "base" else "as defined above.")
        assert " choose the " in preamble.rsplit("\n\n", 1)[-1]
    if k and not plain:  # few-shot CoT: exemplars reason after the cue, the sample ends with it
        cue = f"Thoughts on {resp} 1 -"
        assert text.count(f"{cue}\n") == k + (1 if name.endswith(".step2.txt") else 0)
        if name.endswith(".step1.txt"):
            assert text.endswith(f"{resp} 2 - {regen.SAMPLE[task][2]}\n\n{cue}")
    elif name.endswith(".step1.txt"):
        assert text.endswith(f"{resp} 2 - {regen.SAMPLE[task][2]}\n\n{prompts.COT_REQUEST[task]}\nRationale:")
    if name.endswith(".step2.txt"):  # step 1, the rationale (cut before any ending it wrote), the ending
        head = golden(name.replace(".step2.", ".step1."))
        assert text.startswith(head) and text.endswith(f"\n{ending}")
        assert ending not in text[len(head):-len(ending)]


def test_the_paper_detailed_cot_prompt_ending():
    """docs/method.md §1.5 / the paper's Table 17: Detailed + CoT 0-shot for summarization."""
    text = golden("summarization-detailed-cot-0shot.step1.txt")
    assert text.endswith(
        DETAILED_COT_LAST + "\n\n"
        "Text - " + regen.SAMPLE["summarization"][0] + "\n"
        "Summary 1 - " + regen.SAMPLE["summarization"][1] + "\n"
        "Summary 2 - " + regen.SAMPLE["summarization"][2] + "\n\n"
        "Consider the coherence, accuracy, coverage, and overall quality of each summary and explain which one "
        "is better.\nRationale:")
    assert prompts.build("summarization", *regen.SAMPLE["summarization"], kind="detailed", cot=True) == text
    few = prompts.build("summarization", *regen.SAMPLE["summarization"], kind="detailed", cot=True,
                        exemplars=regen.exemplars("summarization", 1))
    assert few.endswith("\n\nThoughts on Summary 1 -") and few == golden("summarization-detailed-cot-1shot.step1.txt")
