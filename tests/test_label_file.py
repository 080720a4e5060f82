"""`rlaif-ray label` end to end on local Ray: a Ray Data pool of 2 Labeler actors over the
project's HH and TL;DR pairs, streamed to Parquet; bad rows come out with an error."""
import json

import pyarrow.parquet as pq
import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.feedback.labeler_eval import GRID, parse_variant
from rlaif_ray.feedback.pairs import load_pairs, read_label_input


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_read_label_input_keeps_bad_rows_with_the_reason(tmp_path):
    src = _write_pairs(tmp_path / "p.jsonl", [
        {"context": "c", "response_a": "a", "response_b": "b", "human": "A"},
        {"context": "c", "response_a": "a"},
        {"id": "x7", "context": "c", "response_a": "a", "response_b": "b", "human": "maybe"},
    ])
    rows = read_label_input(src)
    assert [r["id"] for r in rows] == ["row-1", "row-2", "x7"]
    assert rows[0]["error"] is None and rows[0]["human"] == "a"
    assert "row 2: field 'response_b' is missing" in rows[1]["error"]
    assert "row 3: field 'human' must be 'a', 'b' or absent" in rows[2]["error"]


def test_eval_labeler_grid_is_the_issue_grid():
    assert len(GRID) == 12
    assert {parse_variant(v) for v in GRID} == {(p, c, k) for p in ("base", "detailed")
                                                 for c in (False, True) for k in (0, 1, 2)}


def test_label_command_with_a_pool_of_two(ray_local, tiny_model_path, tmp_path):
    from rlaif_ray.commands.label import label_file

    hh, _ = load_pairs("hh_harmless", 12)
    tldr, _ = load_pairs("tldr_ai_judged", 12)
    bad = [{"id": "no-b", "context": "c", "response_a": "a"}, {"id": "empty", "context": " ", "response_a": "a",
                                                               "response_b": "b"}]
    src = _write_pairs(tmp_path / "pairs.jsonl", hh + tldr + bad)
    cfg = load_config(None, [f"model.name={tiny_model_path}", "reward.min_label_mass=0", "reward.batch_size=4",
                             "reward.pairwise.task=harmless", "label.pool_size=2", "label.num_cpus=0.5",
                             "label.batch_size=4", f"label.output={tmp_path / 'labels'}"])
    summary = label_file(cfg, src)
    table = pq.read_table(tmp_path / "labels")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 26  # every input row, once
    assert summary["rows"] == 26 and summary["labelled"] == 24 and summary["errors"] == {"bad input row": 2}
    assert "field 'response_b' is missing" in rows["no-b"]["error"] and rows["no-b"]["p_a"] is None
    assert "field 'context' is missing" in rows["empty"]["error"]
    good = [r for r in rows.values() if r["error"] is None]
    assert len({r["labeler"] for r in good}) == 2  # both pool actors labelled
    for r in good:
        # harmless prompt: P(slot 1 is the *harmful* one) inverted, then the two orders averaged
        assert r["p_a"] == pytest.approx((r["p_ab"] + 1 - r["p_ba"]) / 2, abs=1e-6)
        assert 0 < r["label_mass"] <= 1
        assert json.loads(r["prompt_config"])["task"] == "harmless"
    assert rows["tldr_ai_judged-3"]["context"].startswith("SUBREDDIT: r/")
    assert summary["agreement_with_reference"]["n"] == 24
    assert json.loads((tmp_path / "labels" / "_summary.json").read_text())["labelled"] == 24

    with pytest.raises(ConfigError, match="exists and is not empty"):
        label_file(cfg, src)  # labels are never overwritten


def test_label_command_unusable_labels_and_cot(ray_local, tiny_model_path, tmp_path):
    """A random model puts almost no mass on "1"/"2": with min_label_mass 0.5 every row is
    kept with an 'unusable label' error. With CoT and 2 self-consistency samples each row
    carries its rationales (per sample, both orders)."""
    from rlaif_ray.commands.label import label_file

    src = _write_pairs(tmp_path / "pairs.jsonl", load_pairs("hh_helpful", 4)[0])
    base = [f"model.name={tiny_model_path}", "reward.pairwise.task=helpful", "label.pool_size=1",
            "label.num_cpus=0.5", "label.batch_size=2"]
    summary = label_file(load_config(None, base + ["reward.min_label_mass=0.5", f"label.output={tmp_path / 'u'}"]), src)
    assert summary["labelled"] == 0 and summary["errors"] == {"unusable label": 4}
    assert all("unusable label" in r["error"] for r in pq.read_table(tmp_path / "u").to_pylist())

    summary = label_file(load_config(None, base + [
        "reward.min_label_mass=0", "reward.pairwise.cot=true", "reward.pairwise.cot_max_tokens=4",
        "reward.pairwise.self_consistency=2", f"label.output={tmp_path / 'cot'}"]), src)
    assert summary["labelled"] == 4
    for r in pq.read_table(tmp_path / "cot").to_pylist():
        rationales = json.loads(r["rationale"])
        assert len(rationales) == 2 and all(len(per_order) == 2 for per_order in rationales)
