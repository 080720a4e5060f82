import gzip
import json

import pytest

from rlaif_ray import data
from rlaif_ray.config import TaskConfig


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
    with pytest.raises(data.DataError) as e:
        data.load_tldr(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_parquet(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_tldr(tmp_path / "missing.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"subreddit": "a", "title": "t", "post": "p", "summary": "s"}]),
                   tmp_path / "p.parquet")
    assert data.load_tldr(tmp_path / "p.parquet")[0]["summary"] == "s"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DataError, match="not a readable Parquet"):
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
    with pytest.raises(data.DataError, match="row 2: prompt has .* tokens > task.max_prompt_tokens=100"):
        data.build_prompts(rows, tokenizer, TaskConfig(max_prompt_tokens=100, on_long_prompt="error", heldout_size=1))
    with pytest.raises(data.DataError, match="usable prompts"):
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
