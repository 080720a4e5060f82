"""`eval-labeler --data FILE`: the user's own human-labelled pairs (issue 21 item 6), in
either the chosen/rejected form of the bundled HH files or context/response_1/response_2/
label, read and checked before the labeler loads, evaluated with the same table, intervals
and report as the bundled sets; and its outputs never overwritten without --overwrite.
(The one-line errors for bad files are cases of the bad-input corpus, tests/bad_inputs/pairs_*.)"""
from __future__ import annotations

import gzip
import json

import pytest

from rlaif_ray.data.files import DataError
from rlaif_ray.feedback import pairs as pair_data

HH = [  # chosen/rejected transcripts as in the bundled HH files
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Nine minutes in boiling water.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Figure it out yourself."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke?\n\nAssistant: Why did the "
               "chicken cross the road? To get to the other side.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke?\n\nAssistant: No."},
    # no shared dialogue: skipped, with its reason
    {"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.", "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Pear."},
    {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.", "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5."},
    {"chosen": "\n\nHuman: Capital of Italy?\n\nAssistant: Rome.", "rejected": "\n\nHuman: Capital of Italy?\n\nAssistant: Milan."},
]
PAIRS = [  # context/response_1/response_2/label (label: the response the human preferred)
    {"context": "Human: What is the capital of France?\n\nAssistant:", "response_1": "Paris.", "response_2": "Lyon.",
     "label": 1},
    {"context": "Human: Name a prime number.\n\nAssistant:", "response_1": "Eight.", "response_2": "Seven.", "label": "2"},
    {"context": "Human: Say hi.\n\nAssistant:", "response_1": "Hi!", "response_2": "Hi!", "label": 1},  # skipped
    {"context": "Human: Is the sea salty?\n\nAssistant:", "response_1": "Yes.", "response_2": "No.", "label": 1.0},
    {"context": "Human: Spell cat.\n\nAssistant:", "response_1": "k-a-t", "response_2": "c-a-t", "label": 2, "id": 7},
]


def write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # labels as floats: what a Parquet export of a numeric column with gaps holds
    cols = {k: [float(r[k]) if k == "label" else r[k] for r in rows] for k in ("context", "response_1",
                                                                                "response_2", "label")}
    pq.write_table(pa.table(cols), path)
    return path


def test_both_forms_read_with_skipped_rows_counted(tmp_path):
    hh = pair_data.read_pair_file(write_jsonl_gz(tmp_path / "hh.JSONL.GZ", HH))
    assert hh.total == 5 and len(hh.rows) == 4 and len(hh.skipped) == 1 and hh.skipped[0].startswith("row 3:")
    assert hh.rows[0] == ("row-1", "Human: How do I boil an egg?\n\nAssistant:", "Nine minutes in boiling water.",
                          "Figure it out yourself.")
    assert hh.rows[1][1].endswith("Human: A joke?\n\nAssistant:") and hh.rows[1][3] == "No."  # the last turn only
    for path in (tmp_path / "p.jsonl", tmp_path / "p.parquet"):
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
        else:
            write_parquet(path, PAIRS)
        pf = pair_data.read_pair_file(path)
        assert (pf.total, len(pf.rows), len(pf.skipped)) == (5, 4, 1)
        assert "row 3: the two responses are the same text" in pf.skipped[0]
        # the preferred response first, whatever the label's spelling (1, "2", 1.0)
        assert [(r[2], r[3]) for r in pf.rows] == [("Paris.", "Lyon."), ("Seven.", "Eight."), ("Yes.", "No."),
                                                   ("c-a-t", "k-a-t")]
        assert pf.rows[-1][0] == ("7" if path.suffix == ".jsonl" else "row-5")


@pytest.mark.parametrize("row, words", [
    ({"context": "c", "response_1": "a", "label": 1}, "row 1 has no field 'response_2'"),
    ({"context": "c", "response_1": "a", "response_2": "b"}, "row 1 has no field 'label'"),
    ({"context": "c", "response_1": "a", "response_2": "b", "label": True}, "row 1 field 'label' must be 1 or 2"),
    ({"context": "c", "response_1": "a", "response_2": "b", "label": 0}, "row 1 field 'label' must be 1 or 2"),
    ({"context": "c", "response_1": 3, "response_2": "b", "label": 1}, "row 1 field 'response_1' must be text, got int"),
    ({"context": "c", "response_1": " ", "response_2": "b", "label": 1}, "row 1 field 'response_1' is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: y"}, "row 1 has no field 'rejected' (chosen/rejected form)"),
    ({"prompt": "x", "answer": "y"}, "row 1 is not a pair: it needs either 'chosen'/'rejected'"),
])
def test_a_row_missing_a_field_names_file_row_and_field(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=None) as err:
        pair_data.read_pair_file(path)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value)


def test_unknown_format_empty_file_and_nothing_usable(tmp_path):
    (tmp_path / "p.csv").write_text("context,response_1\n")
    with pytest.raises(DataError, match="unknown file format"):
        pair_data.read_pair_file(tmp_path / "p.csv")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        pair_data.read_pair_file(tmp_path / "e.jsonl")
    (tmp_path / "s.jsonl").write_text(json.dumps(PAIRS[2]) + "\n")
    with pytest.raises(DataError, match="no usable pairs: all 1 rows skipped"):
        pair_data.read_pair_file(tmp_path / "s.jsonl")


def test_file_pairs_and_exemplars_as_for_bundled_sets(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 8))
    pf = pair_data.read_pair_file(path)
    rows = pair_data.file_pairs(pf, n=20, seed=3, skip_last=2)
    assert len(rows) == 20 and 3 < sum(r["human"] == "a" for r in rows) < 17  # the human's choice in both slots
    for r, (_, context, good, bad) in zip(rows, pf.rows):
        assert r["context"] == context and r["response_" + r["human"]] == good
        assert {r["response_a"], r["response_b"]} == {good, bad}
    assert pair_data.file_pairs(pf, n=20, seed=3, skip_last=2) == rows  # seeded
    assert len(pair_data.file_pairs(pf, skip_last=2)) == len(pf.rows) - 2
    helpful, harmless = pair_data.file_exemplars(pf, "helpful", 2), pair_data.file_exemplars(pf, "harmless", 2)
    good = [pf.rows[-2][2], pf.rows[-1][2]]
    assert [s.label for s in helpful] == [1, 2] and [getattr(s, f"response_{s.label}") for s in helpful] == good
    assert [s.label for s in harmless] == [2, 1]  # the harmless prompt asks for the more harmful response


def test_eval_labeler_on_a_users_files_on_tiny_model(tiny_model_path, tmp_path, capsys):
    from rlaif_ray.commands.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_path}\nreward:\n  batch_size: 4\nrun:\n  out_dir: {tmp_path}\n")
    hh = str(write_jsonl_gz(tmp_path / "hh.jsonl.gz", HH))
    pq = str(write_parquet(tmp_path / "mine.parquet", PAIRS))
    out, report = tmp_path / "table.json", tmp_path / "report"
    args = ["eval-labeler", str(cfg), "--data", f"{hh},{pq},hh_helpful", "--prompts", "base,base:1", "--n", "3",
            "--task", "helpful", "--out", str(out), "--report", str(report)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{hh}: 5 rows, 4 usable pairs, 1 skipped; labeler task helpful (from --task); skipped: row 3:" in printed
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert [(r["data"], r["variant"]) for r in rows] == [(d, v) for d in (hh, pq, "hh_helpful") for v in ("base", "base:1")]
    # n: the first 3 usable pairs; base:1 keeps the last usable row as its exemplar (4 usable -> 3 left)
    assert [r["n"] for r in rows] == [3, 3, 3, 3, 3, 3]
    assert all(0 <= r["alignment"] <= 1 and r["ci95"][0] <= r["alignment"] <= r["ci95"][1] for r in rows)
    assert [r["skipped_rows"] for r in rows] == [1, 1, 1, 1, 0, 0] and {r["task"] for r in rows} == {"helpful"}
    assert table["files"][pq]["skipped_rows"] == ["row 3: the two responses are the same text (no preference to "
                                                  "agree with)"]
    assert json.loads((report / "table.json").read_text()) == table
    html = (report / "report.html").read_text()
    assert "4 of 5 rows usable, 1 skipped" in html and "data:image/png" in html

    # the outputs exist now: refused, untouched, unless --overwrite (then moved aside, nothing deleted)
    before = out.read_text()
    assert main(args) == 2
    assert "outputs are never overwritten" in capsys.readouterr().err and out.read_text() == before
    assert main(args[:-4] + ["--out", str(tmp_path / "other.json"), "--report", str(report)]) == 2
    assert "choose another --report" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    moved = sorted(p.name for p in tmp_path.iterdir() if ".replaced-" in p.name)
    assert [m.split(".replaced-")[0] for m in moved] == ["report", "table.json"]
