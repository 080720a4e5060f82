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


def test_sft_loss_in_chunks_of_the_lm_head_equals_the_full_logits(tiny_model_path, tokenizer):
    """sft_loss_sum runs the LM head on the response positions only, 3 at a time here (no
    [tokens, vocabulary] tensor beyond a chunk): the same loss and gradient as the model's own
    logits at every position (chunk 0)."""
    from rlaif_ray.engines.models import load_model

    batch = [rm.sft_example([1, 2, 3, 11], [4, 5, 6, 12, 13], eos=9), rm.sft_example([7], [8], 9)]
    out = []
    for chunk in (0, 3):
        model = load_model(tiny_model_path)
        loss, n = rm.sft_loss_sum(model, batch, tokenizer.pad_token_id, chunk=chunk)
        loss.backward()
        out.append((loss.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (whole, n0, g0), (chunked, n1, g1) = out
    assert n0 == n1 == 6 + 2 and chunked == pytest.approx(whole, rel=1e-6)
    assert g0.keys() == g1.keys() and "model.embed_tokens.weight" in g0  # the tied head's gradient too
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_sft_and_rm_micro_batches_add_up_to_one_pass(kind, tiny_model_path, tokenizer):
    """trainer.micro_batch_tokens: a worker's share of a batch in micro-batches (split by
    tokens: SFT an example's, RM both responses') whose gradients add up to the one-pass
    gradient of the same loss (the Ray Train loop; its DDP no_sync path runs in test_chain)."""
    from contextlib import nullcontext

    from actors import ray_train

    if kind == "sft":
        train = [rm.sft_example([1, 2, 3][:k + 1], [4 + k] * (k + 2), eos=9) for k in range(4)]
    else:
        rows = [{"id": str(k), "context": "word " * (k + 1), "response_a": "yes " * (k + 1), "response_b": "no",
                 "p_a": 0.2 + 0.2 * k, "error": None} for k in range(4)]
        train, _ = rm.encode_pairs(rows, tokenizer, "soft", max_tokens=64)
    c = {"kind": kind, "init": tiny_model_path, "pad": tokenizer.pad_token_id, "train": train, "eval": [],
         "batch_size": 4}
    grads, passes = [], []
    for budget in (0, 1):
        torch.manual_seed(0)  # the RM's score head starts the same
        model = ray_train._load(c)
        parts_of = ray_train._sft_parts if kind == "sft" else ray_train._rm_parts
        part_loss, size, _ = parts_of(c, model, "cpu", 0, 1, nullcontext)
        parts = ray_train._micro_batches([0, 1, 2, 3], size, budget, "cpu")
        for part in parts:
            part_loss([0, 1, 2, 3], part).backward()
        passes.append(len(parts))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert passes == [1, 4]  # budget 1: every example over it, one each
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)
