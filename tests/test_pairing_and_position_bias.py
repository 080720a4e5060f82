"""Issue 19, items 6 and 7: position bias is counted on the labeler's raw answer (before a
harmless prompt's inversion), and pairwise rewards pair samples by rollout, so a prompt that
repeats in one batch (an epoch boundary) gives two separate pairs instead of a crash."""
from __future__ import annotations

import json

import pytest


def test_a_repeated_prompt_gets_its_own_rollout_ids_and_its_own_pairs(tiny_model_path):
    from actors.generator import RolloutGenerator
    from actors.labeler import Labeler
    from rlaif_ray.data import schemas
    from rlaif_ray.data.tasks import prompt_batch

    item = {"prompt_id": "p7", "prompt_text": "Summarize: a post", "prompt_token_ids": [1, 2, 3, 4],
            "reference": None, "context": "a post about a cat"}
    other = {**item, "prompt_id": "p8", "context": "a post about a dog", "prompt_token_ids": [5, 6, 7]}
    gen = RolloutGenerator("generator-0", tiny_model_path, "float32",
                           {"backend": "hf", "temperature": 0.9, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4,
                            "strip_trailing": False}, 1)
    rollouts = gen.generate(prompt_batch([item, other, item]), 0, 2, seed=3)  # p7 twice in one batch
    ids = rollouts.column("rollout_id").to_pylist()
    assert len(set(ids)) == 6 and ids[:2] == ["b0:p7:0", "b0:p7:1"] and ids[4:] == ["b0:p7~1:0", "b0:p7~1:1"]

    labeler = Labeler("labeler-0", {"source": "pairwise", "min_label_mass": 0.0, "batch_size": 4}, tiny_model_path)
    scored = labeler.score(rollouts, "pairwise")  # crashed before: the second p7 overwrote the first
    schemas.check(scored, schemas.SCORED, "test")
    partner = [json.loads(m)["vs"] for m in scored.column("reward_meta").to_pylist()]
    assert partner == [1, 0, 3, 2, 5, 4]  # each sample against its own occurrence's partner
    rewards = scored.column("reward").to_pylist()
    for i in (0, 2, 4):
        assert rewards[i] == pytest.approx(-rewards[i + 1], abs=1e-6)


def test_position_bias_is_read_on_the_raw_answer_for_the_harmless_task(tiny_model, tokenizer):
    """The harmless prompt asks which response is *more harmful*: P(slot 1 better) is 1 - P("1").
    Which slot the labeler favours is a property of its answers, so it is counted on P("1")."""
    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.feedback.labeler_eval import evaluate_labeler
    from rlaif_ray.feedback.labeling import Judge
    from rlaif_ray.feedback.pairs import load_pairs
    from rlaif_ray.feedback.stats import position_bias

    judge = Judge.of_model(tiny_model, tokenizer, "yesno_about_chat", batch_size=4)
    rows, task = load_pairs("hh_harmless", 8, 0)
    pref = judge.prefer([r["context"] for r in rows], [r["response_a"] for r in rows],
                        [r["response_b"] for r in rows], PairwiseConfig(task=task))
    assert task == "harmless"
    assert pref.answer1_ab == pytest.approx([1 - p for p in pref.p_ab], abs=1e-6)
    assert pref.answer1_ba == pytest.approx([1 - p for p in pref.p_ba], abs=1e-6)
    raw = position_bias(pref.answer1_ab, pref.answer1_ba)
    inverted = position_bias(pref.p_ab, pref.p_ba)
    assert raw["same_position_share"] == inverted["same_position_share"]
    if raw["same_position_share"] > 0:  # the same pairs, the slot read the other way round
        assert inverted["of_which_first_slot"] == pytest.approx(1 - raw["of_which_first_slot"])
    row = evaluate_labeler(judge, "hh_harmless", "base", 8, 0, 16)
    assert row["same_position_share"] == raw["same_position_share"]
    assert row["of_which_first_slot"] == raw["of_which_first_slot"] or \
        (row["of_which_first_slot"] != row["of_which_first_slot"] and raw["of_which_first_slot"] != raw["of_which_first_slot"])
