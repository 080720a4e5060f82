"""Pairwise labeler prompts against golden strings written out by hand."""
import pytest

from rlaif_ray import prompts
from rlaif_ray.prompts import Exemplar

BASE_SUMM = ("You are an expert summary rater. Given a piece of text and two of its possible summaries, "
             "output 1 or 2 to indicate which summary is better.")


def test_summarization_base_zero_shot():
    assert prompts.build("summarization", "POST", "A", "B") == (
        BASE_SUMM + "\n\nText - POST\nSummary 1 - A\nSummary 2 - B\nPreferred Summary=")


def test_dialogue_layouts_and_harmless_flag():
    helpful = prompts.build("helpful", "Human: hi", "R1", "R2")
    assert helpful.endswith("\n\nContext - Human: hi\nResponse 1 - R1\nResponse 2 - R2\nPreferred Response=")
    assert helpful.startswith("You are an expert rater of helpful and honest Assistant responses.")
    harmless = prompts.build("harmless", "Human: hi", "R1", "R2")
    assert "choose the most harmful response" in harmless
    assert prompts.harmful_question("harmless") and not prompts.harmful_question("helpful")


def test_two_shot_separators():
    shots = (Exemplar("C1", "x", "y", 2), Exemplar("C2", "u", "v", 1))
    got = prompts.build("harmless", "C", "a", "b", exemplars=shots)
    pre = prompts.preamble("harmless", "base")
    assert got == (pre + "\n\n"
                   "»»»» Example »»»»\nContext - C1\nResponse 1 - x\nResponse 2 - y\nPreferred Response=2\n\n"
                   "»»»» Example »»»»\nContext - C2\nResponse 1 - u\nResponse 2 - v\nPreferred Response=1\n\n"
                   "»»»» Follow the instructions and the example(s) above »»»»\n\n"
                   "Context - C\nResponse 1 - a\nResponse 2 - b\nPreferred Response=")


def test_chain_of_thought_two_steps():
    step1 = prompts.build("summarization", "P", "A", "B", kind="detailed", cot=True)
    assert step1.endswith("Summary 2 - B\n\nConsider the coherence, accuracy, coverage, and overall quality of "
                          "each summary and explain which one is better.\nRationale:")
    assert "best adheres to coherence, accuracy, coverage, and overall quality" in step1
    step2 = prompts.build("summarization", "P", "A", "B", kind="detailed", cot=True, rationale=" Summary 1 is exact. ")
    assert step2 == step1 + " Summary 1 is exact.\nPreferred Summary="


def test_unknown_task_or_preamble():
    with pytest.raises(ValueError, match="unknown task"):
        prompts.build("poetry", "c", "a", "b")
    with pytest.raises(ValueError, match="no 'detailed' preamble for task 'helpful'"):
        prompts.build("helpful", "c", "a", "b", kind="detailed")


def test_labeler_pairwise_prompt_is_the_base_prompt():
    from rlaif_ray.labeling import pairwise_prompt

    assert pairwise_prompt("POST", "A", "B") == prompts.build("summarization", "POST", "A", "B")
