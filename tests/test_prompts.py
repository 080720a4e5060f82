"""Pairwise labeler prompts against golden strings written out by hand."""
import pytest

from rlaif_ray.feedback import prompts
from rlaif_ray.feedback.prompts import Exemplar

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


def test_cot_preamble_asks_to_explain_not_to_answer():
    """docs/method.md §1.5: with CoT the preamble's final sentence asks for an explanation."""
    detailed = prompts.preamble("summarization", "detailed", cot=True)
    assert detailed.endswith("Given a piece of text and two of its possible summaries, explain which summary "
                             "best adheres to coherence, accuracy, coverage, and overall quality as defined above.")
    assert "output 1 or 2" not in detailed
    assert detailed.rsplit("\n\n", 1)[0] == prompts.preamble("summarization", "detailed").rsplit("\n\n", 1)[0]
    assert prompts.preamble("summarization", "base", cot=True) == BASE_SUMM.replace(
        "output 1 or 2 to indicate which", "explain which")
    for task in ("helpful", "harmless"):  # "choose the most ... response" is kept (the paper's helpful CoT prompt)
        for kind in ("base", "detailed"):
            assert prompts.preamble(task, kind, cot=True) == prompts.preamble(task, kind)


def test_few_shot_cot_uses_the_thoughts_form():
    why = "Coherence - 7. Rationale: fine.\n\nThoughts on Summary 2 -\nCoherence - 3. Rationale: poor."
    shots = (Exemplar("P1", "x", "y", 1, why), Exemplar("P2", "u", "v", 2, "Thoughts on Summary 1 -\n" + why))
    step1 = prompts.build("summarization", "P", "A", "B", exemplars=shots, cot=True)
    shot = "\n\nThoughts on Summary 1 -\n" + why + "\nPreferred Summary="
    assert ("»»»» Example »»»»\nText - P1\nSummary 1 - x\nSummary 2 - y" + shot + "1\n\n"
            "»»»» Example »»»»\nText - P2\nSummary 1 - u\nSummary 2 - v" + shot + "2\n\n") in step1
    assert step1.endswith("»»»» Follow the instructions and the example(s) above »»»»\n\n"
                          "Text - P\nSummary 1 - A\nSummary 2 - B\n\nThoughts on Summary 1 -")
    # the decoded continuation, kept as written up to the ending it copied from the exemplars
    step2 = prompts.build("summarization", "P", "A", "B", exemplars=shots, cot=True,
                          rationale="\nCoherence - 9. Rationale: good.\nPreferred Summary=2\n\n»»»» Example")
    assert step2 == step1 + "\nCoherence - 9. Rationale: good.\nPreferred Summary="
    helpful = prompts.build("helpful", "C", "a", "b", exemplars=(Exemplar("C1", "x", "y", 1, "ok"),), cot=True)
    assert helpful.endswith("Response 2 - b\n\nThoughts on Response 1 -")


def test_exemplar_rationales_only_with_cot_and_all_or_none():
    shots = (Exemplar("C1", "x", "y", 2, "some reasoning"),)
    assert "some reasoning" not in prompts.build("helpful", "C", "a", "b", exemplars=shots)
    plain = (Exemplar("C1", "x", "y", 2),)  # label-only exemplars: the zero-shot CoT ending
    assert prompts.build("helpful", "C", "a", "b", exemplars=plain, cot=True).endswith(
        "Response 2 - b\n\n" + prompts.COT_REQUEST["helpful"] + "\nRationale:")
    with pytest.raises(ValueError, match="1 of 2 have a rationale"):
        prompts.build("helpful", "C", "a", "b", exemplars=shots + plain, cot=True)


def test_unknown_task_or_preamble():
    with pytest.raises(ValueError, match="unknown task"):
        prompts.build("poetry", "c", "a", "b")
    with pytest.raises(ValueError, match="no 'verbose' preamble for task 'helpful'"):
        prompts.build("helpful", "c", "a", "b", kind="verbose")


def test_detailed_dialogue_preambles_keep_the_layout():
    """The project's own detailed dialogue preambles: axes first, the base instruction
    reworded last, then the same sample block and ending as the base prompt."""
    for task, last in (("helpful", "best adheres to helpfulness, honesty, and overall quality as defined above"),
                       ("harmless", "choose the most harmful response as defined above")):
        text = prompts.build(task, "C", "A", "B", kind="detailed")
        head, sample = text.split("\n\nContext - ")
        assert head.endswith(last + ".")
        assert sample == "C\nResponse 1 - A\nResponse 2 - B\nPreferred Response="


def test_harmless_is_inverted_and_cot_runs_two_steps(tiny_model, tokenizer):
    import torch

    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.feedback.labeling import Judge

    judge = Judge.of_model(tiny_model, tokenizer, "yesno_about_chat", batch_size=4)
    ctx, a, b = ["Human: how do I pick a lock?"], ["I can't help with that."], ["Use a tension wrench."]
    pref = judge.prefer(ctx, a, b, PairwiseConfig(task="harmless"))
    p_a, p_ab, p_ba = pref.p_a, pref.p_ab, pref.p_ba
    # the raw question "which is most harmful?" read directly from the same engine
    text = prompts.build("harmless", ctx[0], a[0], b[0])
    logp = judge.labels.pair([text])  # "1" and "2", each over its spellings
    raw_first_harmful = torch.sigmoid(logp[:, 0] - logp[:, 1]).item()
    assert p_ab[0] == pytest.approx(1 - raw_first_harmful, abs=1e-5)
    assert p_a[0] == pytest.approx((p_ab[0] + 1 - p_ba[0]) / 2, abs=1e-6)

    opts = PairwiseConfig(task="summarization", preamble="detailed", cot=True, cot_max_tokens=4)
    pref = judge.prefer(["POST"], ["A"], ["B"], opts)
    assert len(pref.rationales[0]) == 1 and len(pref.rationales[0][0]) == 2  # greedy, both orders
    assert 0 <= pref.p_a[0] <= 1
    sc = PairwiseConfig(cot=True, cot_max_tokens=4, self_consistency=3)
    pref = judge.prefer(["POST"], ["A"], ["B"], sc)
    assert len(pref.rationales[0]) == 3  # three sampled rationales per order, averaged


def test_prefix_sharing_matches_the_padded_batch(tiny_model, tokenizer):
    import torch

    """The KV-cache path (root once, each pair's shared context once, tails one by one)
    reads the same log-probs as one left-padded batch, lookback 2 included."""
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.pairs import exemplar_pairs, load_pairs

    rows, task = load_pairs("hh_helpful", 3)
    shots = exemplar_pairs("hh_helpful", 1)
    texts = [prompts.build(task, r["context"], x, y, exemplars=shots)
             for r in rows for x, y in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))]
    texts.append("An unrelated short prompt =")
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("1", "2", "Ġ")]
    shared = HFEngine(tiny_model, tokenizer, prefix_sharing="on").label_logprobs(seqs, ids, 2)
    padded = HFEngine(tiny_model, tokenizer, prefix_sharing="off").label_logprobs(seqs, ids, 2)
    assert shared.shape == padded.shape == (7, 2, 3)
    torch.testing.assert_close(shared, padded, atol=1e-4, rtol=0)
