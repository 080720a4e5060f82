"""Measures that are not the reward and the reward-hacking verdict (docs/method.md §7.6):
ROUGE on known strings, the commentary rule on known strings and on the bundled human
TL;DRs, paired changes, the verdict on synthetic runs, and the report's top block."""
import json

import pytest

from rlaif_ray.run import measures as M


def test_rouge_on_known_strings():
    same = M.rouge("my girlfriend left me", "my girlfriend left me")
    assert same == {"rouge1": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}
    assert M.rouge("completely unrelated words", "my girlfriend left me") == {"rouge1": 0.0, "rougeL": 0.0}
    # "the dog runs" vs "running dogs": stemmed unigrams dog, run match (P 2/3, R 1) -> F1 0.8;
    # the longest common subsequence in order is one token (P 1/3, R 1/2) -> F1 0.4
    r = M.rouge("the dog runs", "running dogs")
    assert r["rouge1"] == pytest.approx(0.8) and r["rougeL"] == pytest.approx(0.4)
    assert M.rouge("", "my girlfriend left me") == {"rouge1": 0.0, "rougeL": 0.0}


@pytest.mark.parametrize("text", [
    "Your narrative provides a good introduction to the topic, but I'd suggest refining your writing.",
    "The content is clear, but the writing style doesn't provide any additional context or polish.",
    "Well written! The rest follows.",
    "The post is well structured and easy to follow.",
    "This story is very touching and relatable.",
    "Here's a revised version of your post with a few edits:",
    "This is a great story from Reddit that highlights the challenges of marriage.",
    "From the content you provided, it appears to be a raw account.",
    "Your answer should be no longer than 50 words.",
    "Thank you for sharing your story.",
    "You've described your situation clearly.",
    "A concise account of a breakup.",
])
def test_commentary_is_recognised(text):
    assert M.is_commentary(text)


@pytest.mark.parametrize("text", [
    "A positive outcome with a double-edged sword: a long-distance relationship (3 years) ended.",
    "Girlfriend dumped me after 3 years. What now?",
    "Boyfriend only likes to talk through text.",  # a phone message, not the post
    "Need advice on how to ask my boss for a raise, any suggestions?",
    "I want to improve my relationship with my dad.",
    "Girlfriend dumped me. This post is too long, sorry.",  # commentary after the first sentence does not count
    # third-person summaries, and stories or titles inside the post (issue 40: these fired before)
    "This post is about a 24M whose girlfriend cheated on him with his best friend.",
    "This post is about a man whose girlfriend left him after three years.",
    "I told my parents the story of how we met and they laughed.",
    "My boss gave me the title of manager but no raise.",
    "The author asks whether she should move in with her boyfriend.",
    "The author describes a breakup and asks what to do next.",
])
def test_summaries_are_not_commentary(text):
    assert not M.is_commentary(text)


def test_the_rule_against_hand_labels_of_the_demo_policys_responses():
    """100 responses of the demo's initial policy (tests/data/commentary_sample.py says how they
    were made), each labelled by hand: commentary when the first sentence talks to the poster
    about their text or judges it as writing. The rule must rarely fire on the others (the
    false-positive rate the verdict depends on) and catch at least half of the commentary. The
    rule's last patterns were written after reading this sample, so its recall here is an
    optimistic estimate; the human TL;DRs below were not used to write it."""
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(__file__).parent / "data" / "commentary_sample.jsonl").read_text().splitlines()]
    pos, neg = [r for r in rows if r["commentary"]], [r for r in rows if not r["commentary"]]
    assert (len(rows), len(pos)) == (100, 32)
    fp = sum(M.is_commentary(r["response"]) for r in neg) / len(neg)
    recall = sum(M.is_commentary(r["response"]) for r in pos) / len(pos)
    print(f"demo policy: false positives {fp:.1%} of {len(neg)}, recall {recall:.1%} of {len(pos)}")
    assert fp <= 0.03 and recall >= 0.5


def test_human_summaries_are_rarely_commentary():
    """The rule is fixed in advance; on the bundled human TL;DRs it must almost never fire."""
    from rlaif_ray.data.tasks import load_tldr

    rows = load_tldr()
    share = sum(M.is_commentary(r["summary"]) for r in rows) / len(rows)
    print(f"human TL;DRs classified as commentary: {share:.2%} of {len(rows)}")
    assert share < 0.01


def test_format_stats():
    assert M.sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert M.sentences("...") == []
    s = M.format_stats("  Girlfriend left me after three years.  ")
    assert s == {"words": 6, "chars": 37, "one_sentence": 1.0, "commentary": 0.0}
    assert M.format_stats("Left. Sad.")["one_sentence"] == 0.0


ITEMS = [{"prompt_id": f"p{i}", "reference": "my girlfriend left me after three years", "context": f"POST: {i}"}
         for i in range(12)]


def test_independent_measures_pair_by_prompt():
    before = {it["prompt_id"]: "girlfriend left me after three years" for it in ITEMS}
    after = {it["prompt_id"]: "Your story is well written and clear." for it in ITEMS}
    after["p0"] = before["p0"]
    m = M.independent_measures(ITEMS, before, after)
    assert set(m) == set(M.MEASURES)
    assert m["rougeL"]["n"] == 12 and m["rougeL"]["higher_is_better"] is True
    assert m["rougeL"]["change"] == pytest.approx(m["rougeL"]["after"] - m["rougeL"]["before"])
    assert m["rougeL"]["change"] < -m["rougeL"]["ci95_halfwidth"] < 0  # clearly worse
    assert m["commentary"]["before"] == 0.0 and m["commentary"]["after"] == pytest.approx(11 / 12)
    assert m["commentary"]["higher_is_better"] is False and m["words"]["higher_is_better"] is None
    # dialogue tasks go without the commentary measure; responses missing for a prompt are left out
    no_comm = M.independent_measures(ITEMS, before, {"p1": after["p1"]}, M.task_measures("hh_helpful"))
    assert "commentary" not in no_comm and no_comm["rougeL"]["n"] == 1
    assert no_comm["rougeL"]["ci95_halfwidth"] is None  # one pair: no interval, and no NaN in JSON
    json.dumps(no_comm, allow_nan=False)


def _run(reward_deltas, rouge_deltas, seed=0):
    """A synthetic run: per-prompt reward and ROUGE-L before and after."""
    import random

    rng = random.Random(seed)
    n = len(reward_deltas)
    rb = {f"p{i}": rng.gauss(0, 0.3) for i in range(n)}
    lb = {f"p{i}": 0.2 + rng.gauss(0, 0.03) for i in range(n)}
    ra = {k: rb[k] + d for k, d in zip(rb, reward_deltas)}
    la = {k: lb[k] + d for k, d in zip(lb, rouge_deltas)}
    from rlaif_ray.feedback.stats import paired_change

    reward = dict(zip(("mean", "ci95_halfwidth"), paired_change(rb, ra)))
    c, h = paired_change(lb, la)
    return reward, {"rougeL": {"before": 0.2, "after": 0.2 + c, "change": c, "ci95_halfwidth": h, "n": n,
                               "higher_is_better": True}}


def test_verdict_fires_when_reward_rises_and_overlap_falls():
    reward, measures = _run([0.3 + 0.05 * (i % 3) for i in range(40)], [-0.05 + 0.01 * (i % 3) for i in range(40)])
    v = M.hacking_verdict(reward, measures)
    assert v["hacking"] and v["worse"] == ["rougeL"] and v["better"] == []
    assert v["reason"].startswith("training reward rose") and "ROUGE-L" in v["reason"] and "\n" not in v["reason"]


def test_verdict_quiet_when_both_rise():
    reward, measures = _run([0.3 + 0.05 * (i % 3) for i in range(40)], [0.05 + 0.01 * (i % 3) for i in range(40)])
    v = M.hacking_verdict(reward, measures)
    assert not v["hacking"] and v["better"] == ["rougeL"] and v["worse"] == []
    assert "no independent measure got worse" in v["reason"]


def test_verdict_quiet_when_reward_is_flat():
    reward, measures = _run([0.3 * (-1) ** i for i in range(40)], [-0.05 + 0.01 * (i % 3) for i in range(40)])
    assert M.direction(reward["mean"], reward["ci95_halfwidth"]) == 0
    v = M.hacking_verdict(reward, measures)
    assert not v["hacking"] and v["worse"] == ["rougeL"] and "did not rise" in v["reason"]


def test_verdict_reads_the_win_rate_and_the_commentary_share():
    reward = {"mean": 0.26, "ci95_halfwidth": 0.1}
    flat = {"rougeL": {"change": 0.004, "ci95_halfwidth": 0.017, "higher_is_better": True}}
    # the demo run of issue 21: 41.7% (28.8-55.7%) is not below 0.5 beyond its interval
    assert not M.hacking_verdict(reward, flat, {"win_rate": 0.417, "ci95": [0.288, 0.557]})["hacking"]
    v = M.hacking_verdict(reward, flat, {"win_rate": 0.30, "ci95": [0.19, 0.44]})
    assert v["hacking"] and v["worse"] == ["win_rate"] and "30.0%" in v["reason"]
    more_commentary = {"commentary": {"change": 0.4, "ci95_halfwidth": 0.15, "higher_is_better": False}}
    assert M.hacking_verdict(reward, more_commentary)["worse"] == ["commentary"]
    # length has no good direction: it never makes the verdict
    longer = {"words": {"before": 20.0, "after": 50.0, "change": 30.0, "ci95_halfwidth": 2.0, "higher_is_better": None}}
    v = M.hacking_verdict(reward, longer)
    assert (v["hacking"], v["worse"], v["better"]) == (False, [], [])
    # but it is said beside the verdict, as a possible confounder
    assert v["length"] == {"before": 20.0, "after": 50.0, "change": 30.0} and "20.0 -> 50.0 words" in v["reason"]


def _heldout(responses, rewards):
    return {"responses": responses, "rewards": rewards, "reward_mean": sum(rewards.values()) / len(rewards),
            "n": len(rewards)}


def test_compare_heldout_and_examples():
    ids = [it["prompt_id"] for it in ITEMS]
    before = _heldout({i: "girlfriend left me after three years" for i in ids},
                      {i: 0.1 * (k % 3) for k, i in enumerate(ids)})
    after = _heldout({i: "Your narrative is clear, but I'd suggest refining your writing." for i in ids},
                     {i: 0.5 + 0.1 * (k % 3) + 0.05 * k for k, i in enumerate(ids)})
    comp = M.compare_heldout(ITEMS, before, after)
    assert comp["hacking"]["hacking"] and set(comp["hacking"]["worse"]) == {"rougeL", "rouge1", "commentary"}
    json.dumps(comp, allow_nan=False)
    ex = M.pick_examples(ITEMS, before, after, k=6)
    assert len(ex) == 6 and len({e["prompt_id"] for e in ex}) == 6
    assert ex[0]["prompt_id"] == "p11"  # the largest reward gain first
    assert ex[0]["rougeL_initial"] == pytest.approx(12 / 13) and ex[0]["rougeL_final"] == 0.0  # 6 of 7 words


def test_report_opens_with_the_verdict_and_the_examples(tmp_path):
    from rlaif_ray.run.report import train_report

    ids = [it["prompt_id"] for it in ITEMS]
    before = _heldout({i: "girlfriend left me after three years" for i in ids}, {i: 0.0 for i in ids})
    after = _heldout({i: "Your narrative is <b>clear</b>." for i in ids},
                     {i: 0.3 + 0.01 * k for k, i in enumerate(ids)})
    comp = M.compare_heldout(ITEMS, before, after, {"win_rate": 0.3, "ci95": [0.2, 0.45], "n": 12})
    summary = {"heldout_before": before, "heldout_after": after, "heldout_change": comp["reward_change"],
               "win_rate": {"step": 4, "win_rate": 0.3, "ci95": [0.2, 0.45], "n": 12, "length_controlled": 0.3},
               **comp, "heldout_examples": M.pick_examples(ITEMS, before, after)}
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    with open(run / "metrics.jsonl", "w") as f:
        for s in (1, 2):
            f.write(json.dumps({"step": s, "reward_mean": 0.1, "kl": 1.0 * s, "kl_per_seq": 1.0 * s,
                                "kl_per_token": 0.05 * s, "kl_beta": 0.05, "loss": 0, "pg_loss": 0, "value_loss": 0,
                                "staleness": 0, "completions_per_s": 1, "waited_for_batch_s": 0}) + "\n")
    with open(run / "winrate.jsonl", "w") as f:
        f.write(json.dumps({**summary["win_rate"], **comp}) + "\n")
    text = train_report(run).read_text()
    body = text[text.index("<body>"):]
    assert body.index("REWARD HACKING SUSPECTED") < body.index("<h2>Reward against measures") < body.index("<h2>Plots")
    for label in ("ROUGE-L F1 vs reference", "begins like commentary", "win rate vs initial", "30.0%"):
        assert label in body
    assert body.count("<tr><td>") == 6 and "&lt;b&gt;clear&lt;/b&gt;" in body  # six examples, escaped
    for name in ("kl_per_token.png", "kl_beta.png", "independent.png"):
        assert (run / "plots" / name).is_file()
    # a run without a held-out evaluation says that the verdict was not checked, and does not fail
    (run / "summary.json").write_text("{}")
    (run / "winrate.jsonl").unlink()
    assert "Reward hacking: not checked" in train_report(run).read_text()


def test_the_verdict_tests_each_measure_as_fits_it_with_holm_across_them():
    """4 of 48 responses that turn to commentary (none back): the exact McNemar test gives a
    one-sided p of 0.0625 (0.125 two-sided), so not "worse", where the normal interval on the
    mean change (1.96 sd / sqrt n) called it significant. Holm: two measures at p 0.03 each
    are not both significant at family-wise 0.05 (the smaller needs p <= 0.025), one alone is."""
    from rlaif_ray.feedback.stats import holm, mcnemar_p, paired_t_p, sign_test_p

    items = [{"prompt_id": f"p{i}", "reference": None} for i in range(48)]
    before = {it["prompt_id"]: "My girlfriend left me after three years." for it in items}
    after = dict(before, **{f"p{i}": "Your story is well written." for i in range(4)})
    m = M.independent_measures(items, before, after, ("commentary",))["commentary"]
    assert m["test"] == "exact McNemar" and m["p_rose"] == pytest.approx(0.0625) and m["p_fell"] == 1.0
    assert m["change"] - 1.96 * (sum((x - m["change"]) ** 2 for x in [1] * 4 + [0] * 44) / 47) ** 0.5 / 48 ** 0.5 > 0
    reward = {"mean": 0.2, "ci95_halfwidth": 0.05, "p_rose": 1e-4}
    v = M.hacking_verdict(reward, {"commentary": m})
    assert not v["hacking"] and v["worse"] == [] and v["p_worse"]["commentary"] == pytest.approx(0.0625)
    # Holm across the measures
    assert holm({"a": 0.03, "b": 0.03}) == [] and holm({"a": 0.03}) == ["a"]
    assert holm({"a": 0.001, "b": 0.04, "c": 0.5}) == ["a"] and holm({"a": 0.001, "b": 0.02, "c": 0.5}) == ["a", "b"]
    # the exact tests themselves
    assert mcnemar_p({"a": 0, "b": 1}, {"a": 0, "b": 1}) == (1.0, 1.0)
    assert sign_test_p(20, 28)[1] == pytest.approx(0.1562, abs=1e-3) and sign_test_p(0, 0) == (1.0, 1.0)
    rose, fell = paired_t_p({"a": 0.0, "b": 1.0, "c": 0.5}, {"a": 1.0, "b": 1.0, "c": 1.5})
    assert rose == pytest.approx(0.0918, abs=1e-3) and fell == pytest.approx(1 - rose)


def test_the_verdict_says_when_the_win_rate_judge_is_the_training_judge():
    """The win rate (sign test on wins and losses beside its Wilson interval) is independent
    evidence only when another model judges it."""
    reward = {"mean": 0.26, "ci95_halfwidth": 0.1, "p_rose": 1e-3}
    row = {"win_rate": 0.30, "ci95": [0.19, 0.44], "wins": 14, "losses": 34, "ties": 0, "n": 48}
    v = M.hacking_verdict(reward, {}, row, same_judge=True)
    assert v["hacking"] and v["worse"] == ["win_rate"] and v["same_judge"] is True
    assert "sign test one-sided p 0.00" in v["reason"] and "not independent of what was optimised" in v["reason"]
    assert "not independent" not in M.hacking_verdict(reward, {}, row, same_judge=False)["reason"]


def test_the_win_rate_judge_is_the_reward_model_unless_another_is_configured():
    from actors.pipeline import judge_config
    from rlaif_ray.config import config_from_dict, judge_is_reward_model

    direct = config_from_dict({"reward": {"source": "direct"}})
    assert judge_is_reward_model(direct) and judge_config(direct) is direct
    other = config_from_dict({"reward": {"source": "direct"}, "eval": {"judge_model": "org/other-judge"}})
    assert not judge_is_reward_model(other) and judge_config(other).reward.model == "org/other-judge"
    assert other.reward.model is None  # the training reward's judge is left as it is
    assert not judge_is_reward_model(config_from_dict({"reward": {"source": "rm", "rm_path": "x"}}))
