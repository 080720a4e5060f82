import pytest

from rlaif_ray.data import tasks as data
from rlaif_ray.data.files import DataError
from rlaif_ray.feedback import labeler_eval, stats
from rlaif_ray.feedback import pairs as pair_data


def test_split_transcript_and_loading():
    ctx, good, bad = data.split_transcript("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away", "x")
    assert (ctx, good, bad) == ("Human: hi\n\nAssistant:", "hello", "go away")
    with pytest.raises(DataError, match="row 3"):
        data.split_transcript("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: other\n\nAssistant: c", "f.jsonl row 3")
    for name in data.BUNDLED:
        rows, task = pair_data.load_pairs(name, n=40, seed=1)
        humans = [r["human"] for r in rows]
        assert len(rows) == 40 and 5 < humans.count("a") < 35  # the reference is not always in one slot
        if name == "tldr_ai_judged":  # GPT-4's choice between the reference TL;DR and a PPO sample
            assert task == "summarization" and rows[0]["context"].startswith("SUBREDDIT: r/")
            continue
        assert task in ("harmless", "helpful")
        assert all(r["context"].endswith("Assistant:") and r["response_a"] != r["response_b"] for r in rows[:5])
    shots = pair_data.exemplar_pairs("hh_harmless", 2)
    assert [s.label for s in shots] == [2, 1]  # harmless exemplars point at the harmful (rejected) reply
    shots = pair_data.exemplar_pairs("tldr_ai_judged", 2)
    assert len(shots) == 2 and shots[0].context.startswith("SUBREDDIT: r/") and {s.label for s in shots} <= {1, 2}


def test_alignment_and_position_bias_math():
    a = stats.alignment([0.9, 0.2, 0.5, 0.7], ["a", "a", "b", "b"])
    assert a["alignment"] == pytest.approx((1 + 0 + 0.5 + 0) / 4) and a["n"] == 4
    b = stats.position_bias([0.9, 0.8, 0.2, 0.6], [0.7, 0.3, 0.1, 0.4])
    assert b["same_position_share"] == pytest.approx(0.5) and b["of_which_first_slot"] == pytest.approx(0.5)


def test_eval_labeler_command_on_tiny_model(tiny_model_path, tmp_path, capsys):
    import json

    from rlaif_ray.commands.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_path}\nreward:\n  batch_size: 4\n")
    out = tmp_path / "table.json"
    assert main(["eval-labeler", str(cfg), "--data", "hh_harmless,pandalm", "--prompts", "base,base:1,base+cot",
                 "--n", "6", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["data"], r["variant"]) for r in rows] == [(d, v) for d in ("hh_harmless", "pandalm")
                                                         for v in ("base", "base:1", "base+cot")]
    assert all(r["n"] == 6 and 0 <= r["alignment"] <= 1 and 0 <= r["same_position_share"] <= 1 for r in rows)
    assert "alignment" in capsys.readouterr().out
    with pytest.raises(ValueError, match="PREAMBLE"):
        labeler_eval.parse_variant("fancy")
