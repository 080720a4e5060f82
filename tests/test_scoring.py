import json
import math

import pytest
import torch

from rlaif_ray.feedback import scoring
from rlaif_ray.feedback.labeler_eval import signal_from_scores
from rlaif_ray.feedback.stats import wilson_interval
from rlaif_ray.rubrics import SCORERS


def test_score_distribution_and_expectation():
    # P("1")=0.2, P("5")=0.5, P("9")=0.3 over the digits; P("0"|"1") = 0.5
    p = torch.full((1, 9), 1e-12)
    p[0, 0], p[0, 4], p[0, 8] = 0.2, 0.5, 0.3
    dist = scoring.score_distribution(p.log(), torch.tensor([math.log(0.5)]))
    assert dist.shape == (1, 10) and torch.allclose(dist.sum(1), torch.ones(1))
    assert dist[0, 0] == pytest.approx(0.1, abs=1e-6) and dist[0, 9] == pytest.approx(0.1, abs=1e-6)
    s = scoring.expected_score(dist)
    assert s.item() == pytest.approx(0.1 * 1 + 0.5 * 5 + 0.3 * 9 + 0.1 * 10, abs=1e-5)


def test_rescale_endpoints():
    assert scoring.rescale_score(torch.tensor([1.0, 5.5, 10.0])).tolist() == [-1.0, 0.0, 1.0]


def test_two_way_softmax_and_debias():
    p = scoring.two_way_softmax(torch.tensor([math.log(0.3)]), torch.tensor([math.log(0.1)]))
    assert p.item() == pytest.approx(0.75)
    # a labeler that always prefers slot 1 carries no preference: exactly 0.5
    always_first = torch.tensor([0.97, 0.6])
    assert scoring.debias(always_first, always_first).tolist() == [0.5, 0.5]
    # prefers a in both orders: P_ab(1)=0.8, P_ba(1)=0.3 -> (0.8 + 0.7) / 2
    assert scoring.debias(torch.tensor([0.8]), torch.tensor([0.3])).item() == pytest.approx(0.75)
    ra, rb = scoring.pairwise_rewards(torch.tensor(0.75))
    assert ra.item() == pytest.approx(0.5) and rb.item() == pytest.approx(-0.5)


def test_label_tokens_on_real_tokenizer(tokenizer):
    yes = scoring.label_token_ids(tokenizer, scoring.YES)
    assert len(yes) >= 2  # "Yes" and " Yes" are distinct single tokens
    assert {tokenizer.decode([i]) for i in yes} >= {"Yes", " Yes"}
    digits = [scoring.label_token_ids(tokenizer, [d])[0] for d in scoring.DIGITS]
    assert len(set(digits)) == 9
    assert tokenizer("10", add_special_tokens=False)["input_ids"] == [digits[0], scoring.label_token_ids(tokenizer, ["0"])[0]]
    with pytest.raises(ValueError, match="single token"):
        scoring.label_token_ids(tokenizer, ["definitely not one token"])


def test_scorer_prompts(tokenizer):
    ctx, summary = "SUBREDDIT: r/x\nTITLE: t\nPOST: p", "a summary"
    raw = scoring.scorer_prompt(SCORERS["score10_raw"], ctx, summary, tokenizer)
    assert raw.startswith("You are an expert summary rater.") and raw.endswith("\n\nSCORE: ")
    assert f"TEXT: {ctx}\n\nSUMMARY: {summary}" in raw
    chat = scoring.scorer_prompt(SCORERS["yesno_about_chat"], ctx, summary, tokenizer)
    assert chat.endswith("<|im_start|>assistant\n")
    assert "Is this summary about this post? Answer Yes or No.<|im_end|>" in chat
    shot = scoring.scorer_prompt(SCORERS["yesno_about_chat_2shot"], ctx, summary, tokenizer)
    assert shot.count("<|im_start|>assistant\nYes<|im_end|>") == 1 and shot.count("assistant\nNo<|im_end|>") == 1


def test_judge_on_tiny_model(tiny_model, tokenizer):
    from rlaif_ray.feedback.labeling import Judge

    ctx = ["SUBREDDIT: r/a\nTITLE: t\nPOST: hello there"] * 3
    for name in ("score10_raw", "yesno_about_chat"):
        j = Judge.of_model(tiny_model, tokenizer, name, batch_size=2)
        r, raw, meta = j.score(ctx, ["one", "two words", "three words here"])
        assert len(r) == 3 and all(-1 <= x <= 1 for x in r)
        assert json.loads(meta[0])["scorer"] == name
        # batching must not change scores (left padding + position ids)
        r1, _, _ = Judge.of_model(tiny_model, tokenizer, name, batch_size=1).score(ctx, ["one", "two words", "three words here"])
        assert r == pytest.approx(r1, abs=1e-4)
    pref = Judge.of_model(tiny_model, tokenizer, "yesno_about_chat").prefer(ctx[:2], ["x", "y"], ["y", "x"])
    p_a = pref.p_a
    # swapping a and b swaps the raw orders, so the debiased preferences are complementary
    assert p_a[0] == pytest.approx(1 - p_a[1], abs=1e-4)
    with pytest.raises(ValueError, match="reward.scorer"):
        Judge.of_model(tiny_model, tokenizer, "nope")


def test_signal_math():
    lo, hi = wilson_interval(20, 40)
    assert lo == pytest.approx(0.3518, abs=1e-3) and hi == pytest.approx(0.6482, abs=1e-3)
    s = signal_from_scores([1.0, 0.5, 0.2], [0.0, 0.5, 0.9])
    assert s["reference_wins"] == pytest.approx(0.5) and s["n"] == 3


def test_a_tokenizer_with_10_as_one_token_reads_10_whole(tokenizer):
    """GPT-2, Llama-3, NeoX and OPT write "10" as one token. The score reads each whole number
    as the tokenizer writes it (AnswerTrie, what Labels.integers uses): P(10) = 0.6, P(9) =
    0.3, P(8) = 0.1 gives the expectation 9.5 and a label mass of 1, not "1" * "0" (which would
    give 8.75, or lose the mass below rl.min_label_mass)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["10"])
    ids = [tok(str(k), add_special_tokens=False)["input_ids"] for k in range(1, 11)]
    assert len(ids[9]) == 1 and ids[9] != ids[0]  # "10" is one token of its own
    trie = scoring.AnswerTrie(ids)
    assert trie.deepest == [()]  # one pass reads every answer
    logp = torch.full((1, len(trie.tokens)), -40.0)
    for k, p in ((10, 0.6), (9, 0.3), (8, 0.1)):
        logp[0, trie.tokens.index(ids[k - 1][0])] = math.log(p)
    probs = trie.probabilities({(): logp})
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(scoring.expected_score(probs / probs.sum())) == pytest.approx(9.5, abs=1e-6)
    # the same judge on a tokenizer that writes "1" then "0" (SmolLM2's): P(10) = P("1") P("0" | "1")
    two = [tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(1, 11)]
    assert len(two[9]) == 2 and scoring.AnswerTrie(two).deepest == [(two[0][0],)]
