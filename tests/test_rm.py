"""Reward-model loss against hand-computed values, label targets, encoding, SFT examples."""
import math

import pytest
import torch

from rlaif_ray.rl import supervised as rm


def test_soft_label_loss_matches_hand_computed_values():
    # r_a - r_b = 1, p_a = 0.7: -(0.7 log s(1) + 0.3 log s(-1))
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = -(0.7 * math.log(s(1.0)) + 0.3 * math.log(s(-1.0)))
    got = rm.rm_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.7]))
    assert float(got) == pytest.approx(want, abs=1e-6) and want == pytest.approx(0.6133, abs=1e-4)
    # p_a = 0.5: minimised at equal scores, where it is log 2
    assert float(rm.rm_loss(torch.tensor([0.3]), torch.tensor([0.3]), torch.tensor([0.5]))) == pytest.approx(math.log(2))


def test_hard_labels_give_bradley_terry():
    r_w, r_l = torch.tensor([1.5, -0.2]), torch.tensor([0.5, 0.3])
    bt = -torch.log(torch.sigmoid(r_w - r_l))
    torch.testing.assert_close(rm.rm_loss(r_w, r_l, torch.ones(2)), bt)
    torch.testing.assert_close(rm.rm_loss(r_l, r_w, torch.zeros(2)), bt)  # the same pair, other slot


def test_soft_loss_gradient_pushes_toward_the_label():
    r_a, r_b = torch.zeros(1, requires_grad=True), torch.zeros(1)
    rm.rm_loss(r_a, r_b, torch.tensor([0.9])).sum().backward()
    assert float(r_a.grad) == pytest.approx(-(0.9 - 0.5))  # d/dr_a = sigmoid(d) - p_a


def test_label_targets_by_kind():
    row = {"p_a": 0.8, "human": "b", "error": None}
    assert rm.label_target(row, "soft") == 0.8 and rm.label_target(row, "hard") == 1.0
    assert rm.label_target(row, "human") == 0.0
    assert rm.label_target({"p_a": None, "error": "unusable label"}, "soft") is None
    assert rm.label_target({"p_a": float("nan")}, "hard") is None
    assert rm.label_target({"human": None}, "human") is None


def test_encode_pairs_counts_skips_and_cuts(tokenizer):
    rows = [{"id": "1", "context": "word " * 300, "response_a": "yes", "response_b": "no", "p_a": 0.6, "error": None},
            {"id": "2", "context": "c", "response_a": "a", "response_b": "b", "p_a": None, "error": "x"}]
    ex, counts = rm.encode_pairs(rows, tokenizer, "soft", max_tokens=64)
    assert counts == {"pairs": 1, "skipped_no_label": 1, "truncated_texts": 2}
    assert len(ex[0]["ids_a"]) == 64 and tokenizer.decode(ex[0]["ids_a"]).endswith("RESPONSE: yes")


def test_sft_example_masks_the_prompt(tiny_model, tokenizer):
    ex = rm.sft_example([1, 2, 3], [4, 5], eos=9)
    assert ex["ids"] == [1, 2, 3, 4, 5, 9] and ex["labels"] == [-100, -100, -100, 4, 5, 9]
    loss, n = rm.sft_loss_sum(tiny_model, [ex, rm.sft_example([7], [8], 9)], tokenizer.pad_token_id)
    assert n == 3 + 2 and loss.item() > 0


def test_rm_scores_read_the_last_real_token(tiny_model_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        together = rm.scores(model, [short, long], tokenizer.pad_token_id)
        alone = rm.scores(model, [short], tokenizer.pad_token_id)
    assert float(together[0]) == pytest.approx(float(alone[0]), abs=1e-5)  # padding does not change a score
    assert rm.accuracy([1.0, 0.0, 2.0], [0.0, 1.0, 1.0], ["a", "a", None]) == 0.5
