"""`rlaif-ray eval` end to end on a real local Ray with tiny models, and its summary math."""
import json
import math

import pyarrow.parquet as pq
import pytest

from rlaif_ray.config import EvalConfig, config_from_dict, dump_config
from rlaif_ray.data.files import DataError
from rlaif_ray.data.tasks import dialogue_messages
from rlaif_ray.feedback.judgements import summarize_judgements as summarize


def _row(p_a, ca=100, cb=100, mass=0.9, p_ab=0.6, p_ba=0.4, ha=None, hb=None, hmass=0.9):
    return {"p_a": p_a, "chars_a": ca, "chars_b": cb, "label_mass": mass, "p_ab": p_ab, "p_ba": p_ba,
            "harmless_a": ha, "harmless_b": hb, "harmless_mass_a": hmass, "harmless_mass_b": hmass}


def test_summary_counts_unusable_labels_and_reports_every_number():
    rows = [_row(0.8), _row(0.7), _row(0.2), _row(0.5), _row(0.9, mass=0.001), _row(float("nan"))]
    s = summarize(rows, EvalConfig(bootstrap=50), min_label_mass=0.01)
    assert s["pairs"] == 6 and s["unusable_labels"] == 2  # low mass and NaN: left out, counted
    w = s["win_rate"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4) and w["win_rate"] == pytest.approx(2.5 / 4)
    assert w["ci95"][0] < w["win_rate"] < w["ci95"][1]
    assert s["soft_win_rate"]["mean"] == pytest.approx((0.8 + 0.7 + 0.2 + 0.5) / 4)
    # equal lengths everywhere: the length-controlled value is the raw win rate
    assert s["length_controlled"]["value"] == pytest.approx(w["win_rate"], abs=1e-3)
    assert s["same_slot_share"] == 0.0  # p_ab 0.6 / p_ba 0.4: a different slot won in each order
    assert "harmless" not in s


def test_summary_harmless_rate_per_policy_with_threshold():
    rows = [_row(0.6, ha=0.9, hb=0.2), _row(0.6, ha=0.7, hb=0.6), _row(0.4, ha=0.3, hb=0.1),
            _row(0.5, ha=0.99, hb=0.99, hmass=0.001)]  # Yes/No held too little mass: left out, counted
    s = summarize(rows, EvalConfig(bootstrap=0, harmless_threshold=0.5), min_label_mass=0.01)
    assert s["harmless"]["a"]["unusable_labels"] == 1 and s["harmless"]["a"]["n"] == 3
    h = s["harmless"]
    assert h["threshold"] == 0.5 and "harmless" in h["question"] and h["scorer"] == "yesno_harmless_chat"
    assert (h["a"]["harmless"], h["b"]["harmless"]) == (2, 1) and h["a"]["rate"] == pytest.approx(2 / 3)
    assert h["reference_chars"] == 100  # B's mean length is the reference (App. J)


def test_dialogue_messages_from_an_hh_transcript():
    msgs = dialogue_messages("Human: hi there\n\nAssistant: hello!\n\nHuman: how do I bake bread?\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                    {"role": "user", "content": "how do I bake bread?"}]
    with pytest.raises(DataError, match="Human turn"):
        dialogue_messages("Human: a\n\nAssistant: b")


def eval_cfg(model, out_dir, **ev):
    return config_from_dict({
        "model": {"name": model},
        "task": {"max_prompt_tokens": 320, "heldout_size": 8},
        "generation": {"max_new_tokens": 8},
        "reward": {"min_label_mass": 0.0, "batch_size": 8},  # a random model puts ~0 mass on "1"/"2"
        "pipeline": {"generators": {"num_cpus": 0.5}, "labelers": {"num_cpus": 0.5}},
        "eval": {"num_prompts": 6, "batch_size": 4, "bootstrap": 100, **ev},
        "run": {"out_dir": str(out_dir), "name": "ev"},
    })


def test_eval_of_a_policy_against_itself_is_all_ties(ray_local, tiny_model_path, tmp_path):
    """Same weights, same seed: the same responses, so every debiased label is exactly 0.5
    (both orders are the same prompt) and the win rate is 50% with every pair a tie."""
    from rlaif_ray.commands.evaluate import run_eval

    cfg = eval_cfg(tiny_model_path, tmp_path, policy_a=tiny_model_path, policy_b=tiny_model_path,
                   harmless_rate="on")
    folder = run_eval(cfg, tmp_path / "self", log=lambda *_: None)
    s = json.loads((folder / "summary.json").read_text())
    rows = pq.read_table(folder / "judgements.parquet").to_pylist()
    assert len(rows) == 6 and all(r["response_a"] == r["response_b"] for r in rows)
    assert all(r["p_a"] == pytest.approx(0.5, abs=1e-6) for r in rows)
    assert s["win_rate"]["win_rate"] == 0.5 and s["win_rate"]["ties"] == 6
    assert s["length_controlled"]["value"] == pytest.approx(0.5, abs=1e-6)
    h = s["harmless"]
    assert h["a"]["rate"] == h["b"]["rate"] and all(r["harmless_a"] == r["harmless_b"] for r in rows)
    assert (folder / "report.html").is_file() and (folder / "plots" / "winrate.png").is_file()


def test_eval_command_two_checkpoints_on_dialogue_prompts(ray_local, tiny_model_path, tmp_path):
    from rlaif_ray.commands.cli import main
    from rlaif_ray.engines.models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)  # a different random policy
    cfg = eval_cfg(tiny_model_path, tmp_path, prompts="hh_harmless")
    cfg.reward.pairwise.task = "harmless"  # auto: the harmless rate is measured too
    path = tmp_path / "eval.yaml"
    path.write_text(dump_config(cfg))
    assert main(["eval", str(path), "--a", other, "--b", tiny_model_path, "--out", str(tmp_path / "ab")]) == 0
    s = json.loads((tmp_path / "ab" / "summary.json").read_text())
    rows = pq.read_table(tmp_path / "ab" / "judgements.parquet").to_pylist()
    assert len(rows) == 6 and all(r["prompt_id"].startswith("hh_harmless-") for r in rows)
    assert any(r["response_a"] != r["response_b"] for r in rows)
    assert all(0 < r["p_a"] < 1 and r["p_ba"] == r["p_ba"] for r in rows)  # both orders judged
    w = s["win_rate"]
    assert w["n"] == 6 and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
    lc = s["length_controlled"]
    assert 0 <= lc["value"] <= 1 and math.isfinite(lc["slope"]) and len(lc["ci95"]) == 2
    assert s["policy_a"] == other and s["harmless"]["a"]["n"] == 6
    # a path that is not a checkpoint stops before any actor starts
    assert main(["eval", str(path), "--a", str(tmp_path), "--out", str(tmp_path / "bad")]) == 2


def test_scorer_judge_compares_two_separate_scores(ray_local, tiny_model_path, tmp_path):
    """eval.judge=scorer: P(A) = sigmoid(logit s_A - logit s_B) from each response's own score."""
    from rlaif_ray.commands.evaluate import run_eval
    from rlaif_ray.engines.models import make_tiny_model
    from rlaif_ray.feedback import winrate

    other = make_tiny_model(tmp_path / "other", seed=2)
    cfg = eval_cfg(tiny_model_path, tmp_path, policy_a=other, judge="scorer", num_prompts=4)
    folder = run_eval(cfg, tmp_path / "sc", log=lambda *_: None)
    rows = pq.read_table(folder / "judgements.parquet").to_pylist()
    assert len(rows) == 4
    # p_ab and p_ba hold A's and B's own scores; P(A) is their Bradley-Terry comparison
    for r in rows:
        assert 0 < r["p_ab"] < 1 and 0 < r["p_ba"] < 1
        assert r["p_a"] == pytest.approx(winrate.bradley_terry(r["p_ab"], r["p_ba"]), abs=1e-9)
    assert any(r["p_a"] != 0.5 for r in rows)
    assert winrate.bradley_terry(0.8, 0.5) == pytest.approx(0.8) and winrate.bradley_terry(0.5, 0.5) == 0.5
    assert winrate.bradley_terry(0.9, 0.1) == pytest.approx(1 / (1 + (1 / 81)))


def test_a_judgement_train_cannot_make_is_refused_before_training(tiny_model_path, tmp_path):
    """A judge every phase would ask but nobody answers (an endpoint that is not up), or a
    harmless scorer that does not exist: stopped before any actor starts, not after training."""
    from rlaif_ray.commands.train import train
    from rlaif_ray.config import ConfigError

    cfg = eval_cfg(tiny_model_path, tmp_path)
    cfg.reward.backend = "openai"
    cfg.reward.openai.base_url = "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"reward.openai.base_url: cannot reach http://127.0.0.1:9/v1"):
        train(cfg, tmp_path / "run", log=lambda *_: None)
    cfg.reward.backend = "hf"
    cfg.eval.harmless_scorer = "no_such_scorer"  # checked against reward.rubrics: by the whole config's validator
    with pytest.raises(ConfigError, match=r"eval.harmless_scorer: unknown scorer 'no_such_scorer'"):
        train(cfg, tmp_path / "run2", log=lambda *_: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
