import gzip
import json

import pytest

from rlaif_ray.config import TaskConfig
from rlaif_ray.data import files
from rlaif_ray.data import tasks as data


def test_bundled_tldr_loads():
    rows = data.load_tldr()
    assert len(rows) == 1400 and all(r["post"] for r in rows[:10])
    assert data.post_block(rows[0]).startswith("SUBREDDIT: r/")


@pytest.mark.parametrize("content, words", [
    (b'{"subreddit": "a", "title": "t"}\n', "row 1 has no field 'post'"),
    (b'{"subreddit": "a", "title": "t", "post": "x"}\n{"subreddit": "a", "title": "t", "post": "  "}\n',
     "row 2 field 'post' is empty"),
    (b'{"subreddit": "a", "title": "t", "post": 3}\n', "row 1 field 'post' must be text"),
    (b'{"subreddit": "a", "title": "t", "post": "x"}\n{not json\n', "row 2 is not valid JSON"),
    (b'{"subreddit": "a", "title": "t", "post": "\xff\xfe"}\n', "row 1 is not valid UTF-8"),
    (b'[1, 2]\n', "row 1 must be a JSON object"),
    (b'\n', "no rows"),
])
def test_bad_data_files_name_the_row(tmp_path, content, words):
    path = tmp_path / "posts.jsonl"
    path.write_bytes(content)
    with pytest.raises(files.DataError) as e:
        data.load_tldr(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_parquet(tmp_path):
    with pytest.raises(files.DataError, match="not found"):
        data.load_tldr(tmp_path / "missing.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"subreddit": "a", "title": "t", "post": "p", "summary": "s"}]),
                   tmp_path / "p.parquet")
    assert data.load_tldr(tmp_path / "p.parquet")[0]["summary"] == "s"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(files.DataError, match="not a readable Parquet"):
        data.load_tldr(tmp_path / "bad.parquet")
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"subreddit": "a", "title": "t", "post": "p"}) + "\n")
    assert len(data.load_tldr(gz)) == 1


def test_long_prompt_policies_are_counted(tokenizer):
    rows = [{"subreddit": "a", "title": "t", "post": "word " * n} for n in (5, 400, 6, 7, 500)]
    skip = data.build_prompts(rows, tokenizer, TaskConfig(max_prompt_tokens=100, heldout_size=1))
    assert skip.skipped_long == 2 and len(skip.train) == 2 and len(skip.heldout) == 1
    trunc = data.build_prompts(rows, tokenizer, TaskConfig(max_prompt_tokens=100, heldout_size=1,
                                                           on_long_prompt="truncate"))
    assert trunc.truncated == 2 and all(len(p["prompt_token_ids"]) <= 100 for p in trunc.train + trunc.heldout)
    assert trunc.train[1]["prompt_text"].endswith("<|im_start|>assistant\n")  # the cue is kept
    with pytest.raises(files.DataError, match="row 2: prompt has .* tokens > task.max_prompt_tokens=100"):
        data.build_prompts(rows, tokenizer, TaskConfig(max_prompt_tokens=100, on_long_prompt="error", heldout_size=1))
    with pytest.raises(files.DataError, match="usable prompts"):
        data.build_prompts(rows, tokenizer, TaskConfig(max_prompt_tokens=100, heldout_size=5))


def test_sampler_is_deterministic_and_resumable():
    items = [{"i": i} for i in range(7)]
    a = data.PromptSampler(items, seed=3)
    first = [x["i"] for x in a.next(5)]
    state = a.state()
    rest = [x["i"] for x in a.next(6)]  # crosses an epoch boundary
    b = data.PromptSampler(items, seed=3)
    b.load_state(state)
    assert [x["i"] for x in b.next(6)] == rest
    assert sorted(first + rest[:2]) == list(range(7))  # an epoch is a permutation


# --- issue 20 item 4: file types, gzip, surrogates and the row cap ---

ROW = {"subreddit": "a", "title": "t", "post": "p"}


def _gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_type_is_recognised_case_insensitively(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ROW]), tmp_path / "p.PARQUET")
    (tmp_path / "p.JSONL").write_text(json.dumps(ROW) + "\n")
    _gz(tmp_path / "p.JSONL.GZ", [ROW, ROW])
    _gz(tmp_path / "p.Jsonl.Gz", [ROW])
    names = ("p.PARQUET", "p.JSONL", "p.JSONL.GZ", "p.Jsonl.Gz")
    assert [len(data.load_tldr(tmp_path / n)) for n in names] == [1, 1, 2, 1]
    kinds = [files.file_kind(n) for n in ("a.Parquet", "a.JSONL.GZ", "a.json", "a")]
    assert kinds == ["parquet", "jsonl.gz", "jsonl", "jsonl"]


def test_misnamed_files_say_what_they_are(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(ROW) + "\n")
    with pytest.raises(files.DataError, match=r"plain.jsonl.gz: not a gzip file although named .gz"):
        data.load_tldr(tmp_path / "plain.jsonl.gz")
    _gz(tmp_path / "packed.jsonl", [ROW])
    with pytest.raises(files.DataError, match="gzip-compressed data in a file not named .gz: name it .jsonl.gz"):
        data.load_tldr(tmp_path / "packed.jsonl")
    pq.write_table(pa.Table.from_pylist([ROW]), tmp_path / "table.jsonl")
    with pytest.raises(files.DataError, match="a Parquet file not named .parquet"):
        data.load_tldr(tmp_path / "table.jsonl")


def test_truncated_or_corrupt_gzip_names_the_file(tmp_path):
    whole = _gz(tmp_path / "whole.jsonl.gz", [dict(ROW, post=f"post {i} " * 30) for i in range(40)]).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(files.DataError, match=r"cut.jsonl.gz: the gzip file is truncated \(it ends inside row \d+"):
        data.load_tldr(tmp_path / "cut.jsonl.gz")
    (tmp_path / "noise.jsonl.gz").write_bytes(whole[:20] + b"\x00" * 50 + whole[70:])
    with pytest.raises(files.DataError, match="noise.jsonl.gz: corrupt gzip data"):
        data.load_tldr(tmp_path / "noise.jsonl.gz")


def test_a_lone_surrogate_names_row_and_field(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(ROW) + "\n" + '{"subreddit": "a", "title": "t", "post": "x \\udc00 y"}\n')
    with pytest.raises(files.DataError, match=r"s.jsonl: row 2 field 'post' holds a lone surrogate"):
        data.load_tldr(p)
    p.write_text('{"subreddit": "a", "title": "t", "post": "a pair is fine: \\ud83d\\ude00"}\n')
    assert data.load_tldr(p)[0]["post"].endswith("\U0001F600")


def test_a_row_over_the_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    big = dict(ROW, post="word " * 400_000)  # 2 MB
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps(ROW) + "\n" + json.dumps(big) + "\n")
    size = len(json.dumps(big)) + 1
    monkeypatch.setattr(files.json, "loads", lambda text, _real=json.loads: _real(text) if len(text) < 1000
                        else pytest.fail("an over-long row was parsed"))
    with pytest.raises(files.DataError, match=rf"big.jsonl: row 2 is {size:,} bytes, over the limit of 200,000"):
        data.load_tldr(p)
    with pytest.raises(files.DataError, match="row 2 is"):
        data.load_tldr(_gz(tmp_path / "big.jsonl.gz", [ROW, big]))
    monkeypatch.undo()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ROW, big]), tmp_path / "big.parquet")
    with pytest.raises(files.DataError, match="big.parquet: row 2 is 2,000,002 bytes"):
        data.load_tldr(tmp_path / "big.parquet")
    ok = dict(ROW, post="x" * (files.MAX_ROW_BYTES - len(json.dumps(dict(ROW, post="")))))  # exactly at the cap
    (tmp_path / "edge.jsonl").write_text(json.dumps(ok) + "\n")
    assert len(data.load_tldr(tmp_path / "edge.jsonl")) == 1


def test_bundled_files_are_under_the_row_cap():
    for name in ("tldr_posts_dev.jsonl.gz", *(f for f, _ in data.BUNDLED.values())):
        assert files.read_records(files.bundled_path(name))
