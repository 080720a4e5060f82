"""Your own prompts, rubrics and rewards, without Ray: the generic task from every source
(JSONL, CSV, Parquet, a `datasets` folder) with a column mapping, templates and chat
messages, bad rows counted; user rubrics as judge prompts (fields, any score range, chat
pairwise with CoT) read by a real tiny model; Python rewards from a module or a file; the
HTTP reward schema against the example reward server on loopback."""
import csv
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlaif_ray.config import ConfigError, RubricConfig, TaskConfig, config_from_dict, load_config
from rlaif_ray.data.files import DataError
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.feedback import prompts, scoring
from rlaif_ray.feedback.rewards import HttpReward, PythonReward, RewardError, RewardSources, load_function

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"question": f"What is {k} plus {k}?", "answer": f"{2 * k}", "level": k % 3} for k in range(1, 13)]


def _write_all(tmp: Path) -> dict[str, str]:
    """The same rows as JSONL.gz, CSV, Parquet and a `datasets` save_to_disk folder."""
    import gzip

    import datasets

    out = {"jsonl": tmp / "q.jsonl.gz", "csv": tmp / "q.csv", "parquet": tmp / "q.parquet", "saved": tmp / "saved"}
    with gzip.open(out["jsonl"], "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    with open(out["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(out["saved"]))
    return {k: str(v) for k, v in out.items()}


def test_generic_task_reads_every_source_alike_with_a_column_mapping(tmp_path, tokenizer):
    paths = _write_all(tmp_path)
    sets = {}
    for kind, path in paths.items():
        task = TaskConfig(name="generic", data_path=path, columns={"prompt": "question", "reference": "answer"},
                          heldout_size=2, system_prompt="Be brief.")
        sets[kind] = task_prompts(task, tokenizer)
    ref = sets["jsonl"]
    assert len(ref.train) == 10 and len(ref.heldout) == 2 and ref.skipped_long == 0
    first = ref.train[0]
    assert first["context"] == "What is 1 plus 1?" and first["reference"] == "2"
    # the prompt in the chat template, the system message first
    assert first["prompt_text"].count("Be brief.") == 1 and first["prompt_text"].index("Be brief.") < \
        first["prompt_text"].index("What is 1 plus 1?")
    # the original columns stay as fields a rubric or a reward may name
    assert first["fields"]["question"] == "What is 1 plus 1?" and first["fields"]["level"] == 1
    for kind in ("parquet", "saved"):
        assert [it["prompt_text"] for it in sets[kind].train] == [it["prompt_text"] for it in ref.train], kind
        assert [it["fields"] for it in sets[kind].train] == [it["fields"] for it in ref.train], kind
    # CSV has no types: the same prompts, every field text
    assert [it["prompt_text"] for it in sets["csv"].train] == [it["prompt_text"] for it in ref.train]
    assert sets["csv"].train[0]["fields"]["level"] == "1"
    # a DatasetDict's split by task.split; one it lacks is named
    test = task_prompts(TaskConfig(name="generic", data_path=paths["saved"], split="test",
                                   columns={"prompt": "question"}, heldout_size=1), tokenizer)
    assert len(test.train) == 1 and len(test.heldout) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(task.split\); the data set has train, test"):
        task_prompts(TaskConfig(name="generic", data_path=paths["saved"], split="validation",
                                columns={"prompt": "question"}), tokenizer)
    with pytest.raises(DataError, match=r"q.csv: no column 'query' \(task.columns.prompt\); its columns are "
                                        r"answer, level, question"):
        task_prompts(TaskConfig(name="generic", data_path=paths["csv"], columns={"prompt": "query"}), tokenizer)


def test_generic_task_templates_messages_and_bad_rows_counted(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Hi {k}"}], "topic": "greetings"} for k in range(6)]
    rows += [{"messages": "not a chat"}, {"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = task_prompts(TaskConfig(name="generic", data_path=str(path), heldout_size=1), tokenizer)
    assert len(ps.train) + len(ps.heldout) == 6
    assert ps.notes and ps.notes[0].startswith("2 rows skipped as unusable (row 7: 'messages' is not a list")
    assert "does not end with a user turn" in ps.notes[0]
    assert ps.train[0]["context"] == "Human: Hi 0"  # the judge reads a chat as an HH transcript

    templ = tmp_path / "t.jsonl"
    templ.write_text("".join(json.dumps({"q": f"question {k}", "style": "briefly" if k else ""}) + "\n"
                             for k in range(5)))
    task = TaskConfig(name="generic", data_path=str(templ), prompt_template="Answer {style}: {q}", heldout_size=1)
    ps = task_prompts(task, tokenizer)
    assert ps.train[0]["context"] == "Answer briefly: question 1" and "row 1: no value for style" in ps.notes[0]
    raw = task_prompts(task.model_copy(update={"prompt_format": "raw"}), tokenizer)
    assert raw.train[0]["prompt_text"] == "Answer briefly: question 1"
    with pytest.raises(DataError, match=r"task.prompt_template uses \{topic\}, which .*t.jsonl has no column of"):
        task_prompts(task.model_copy(update={"prompt_template": "{topic}: {q}"}), tokenizer)


def test_rubrics_validate_their_fields():
    with pytest.raises(ValueError, match=r"a pairwise rubric must name \{response_2\}"):
        RubricConfig(kind="pairwise", template="{prompt} {response_1}")
    with pytest.raises(ValueError, match=r"a yesno rubric has no field \{response_1\}"):
        RubricConfig(kind="yesno", template="{response} {response_1}")
    with pytest.raises(ValueError, match=r"min < max <= min \+ 100"):
        RubricConfig(kind="score", template="{response}", min=5, max=5)
    with pytest.raises(ValueError, match="one of them"):
        RubricConfig(kind="yesno")
    with pytest.raises(ConfigError, match=r"reward.scorer: 'pair' is a pairwise rubric"):
        config_from_dict({"reward": {"scorer": "pair", "rubrics": {"pair": {
            "kind": "pairwise", "template": "{response_1} {response_2}"}}}})


def test_a_score_rubric_reads_any_range_through_a_real_model(tiny_model, tokenizer):
    """A 0..12 score (two-token numbers on this tokenizer) with a data field: the expected
    score from the judge's distribution over exactly those answers, which sums to the label mass."""
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.labeling import Judge, LocalLabels, user_rubrics

    reward = config_from_dict({"reward": {"scorer": "grade", "rubrics": {"grade": {
        "kind": "score", "min": 0, "max": 12, "template": "Grade {student}'s answer to {prompt}: {response}"}}}}).reward
    scorers, _ = user_rubrics(reward)
    judge = Judge(LocalLabels(HFEngine(tiny_model, tokenizer), tokenizer), "grade", 4, scorers)
    rewards, raws, metas = judge.score(["2+2?", "3+3?"], ["4", "7"], fields=[{"student": "Ann"}, {"student": "Bo"}])
    text = scoring.scorer_prompt(scorers["grade"], "2+2?", "4", tokenizer, {"student": "Ann"})
    assert "Grade Ann's answer to 2+2?: 4" in text and text.endswith("assistant\n")
    for r, raw, meta in zip(rewards, raws, metas):
        m = json.loads(meta)
        assert len(m["p"]) == 13 and math.isclose(sum(m["p"]), 1, abs_tol=1e-3) and 0 < m["label_mass"] <= 1
        assert math.isclose(raw, sum(k * p for k, p in enumerate(m["p"])), abs_tol=2e-3)
        assert math.isclose(r, 2 * raw / 12 - 1, abs_tol=1e-5)


def test_a_chat_pairwise_rubric_composes_with_exemplars_and_cot():
    rubric = prompts.PairwiseRubric("Q: {prompt} ({level})\nA1: {response_1}\nA2: {response_2}\nReply 1 or 2.",
                                    preamble="Judge answers.", chat=True)
    shot = prompts.Exemplar("Q0", "good", "bad", 1)
    msgs = prompts.build(rubric, "Q1", "x", "y", exemplars=(shot,), fields={"level": "easy"})
    assert isinstance(msgs, list) and len(msgs) == 1 and msgs[0]["role"] == "user"
    body = msgs[0]["content"]
    assert body.startswith("Judge answers.") and prompts.EXAMPLE_OPEN in body and "Q: Q1 (easy)" in body
    step1 = prompts.build(rubric, "Q1", "x", "y", cot=True, fields={"level": "easy"})
    assert step1[-1]["content"].endswith("Explain which response is better.")
    step2 = prompts.build(rubric, "Q1", "x", "y", cot=True, rationale=" A1 is right. ", fields={"level": "easy"})
    assert [m["role"] for m in step2] == ["user", "assistant", "user"]
    assert step2[1]["content"] == "A1 is right." and step2[2]["content"] == prompts.CHAT_COT_ANSWER
    raw = prompts.PairwiseRubric("{prompt}|{response_1}|{response_2}", ending="Better=")
    assert prompts.build(raw, "p", "a", "b") == "p|a|b\nBetter="


def test_text_answers_are_parsed_never_guessed():
    assert [scoring.parse_yes_no(a) for a in ("Yes.", " no, because", "Maybe", "")] == [0, 1, None, None]
    assert [scoring.parse_choice(a) for a in ("1", "Preferred Response=2", "Response 12", "neither")] == \
        [0, 1, None, None]
    assert [scoring.parse_integer(a, 1, 10) for a in ("7", "Score: 10/10", "11", "7.5", "-3", "none")] == \
        [6, 9, None, None, None, None]


def test_python_rewards_from_a_module_or_a_file(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    by_module = PythonReward("examples.rewards:within_word_budget")
    by_file = PythonReward("examples/rewards.py:within_word_budget")
    fields = [{"max_words": 2}, {"max_words": 2}, {"max_words": 2}, {}]
    for fn in (by_module, by_file):
        assert fn(["q"] * 4, ["one two", "one two three", "", "w " * 80], [None] * 4, fields) == \
            [1.0, 0.5, -1.0, 0.0]
    overlap = load_function("examples/rewards.py:reference_overlap")
    assert overlap(prompts=["q"], responses=["the cat sat"], references=["a cat sat"], fields=[{}]) == \
        pytest.approx([2 / 3])
    with pytest.raises(RewardError, match=r"reward.function: module 'examples.rewards' has no 'nope'"):
        load_function("examples.rewards:nope")
    with pytest.raises(RewardError, match=r"no file 'examples/none.py'"):
        load_function("examples/none.py:f")
    (tmp_path / "bad_rewards.py").write_text("def nan(**kw):\n    return [1.0, float('nan')]\n"
                                             "def short(**kw):\n    return [1.0]\n")
    with pytest.raises(RewardError, match=r"returned nan for response 1: every reward must be a finite number"):
        PythonReward(f"{tmp_path}/bad_rewards.py:nan")(["a", "b"], ["a", "b"], [None, None], [{}, {}])
    with pytest.raises(RewardError, match=r"returned 1 rewards for 2 responses"):
        PythonReward(f"{tmp_path}/bad_rewards.py:short")(["a", "b"], ["a", "b"], [None, None], [{}, {}])


def test_a_weighted_sum_keeps_each_part(monkeypatch):
    monkeypatch.chdir(ROOT)
    reward = load_config(None, [
        "reward.source=sum", "reward.parts=[{source: python, function: 'examples.rewards:within_word_budget', "
        "weight: 0.5}, {source: python, function: 'examples.rewards:reference_overlap', weight: 2, name: overlap}]"]
    ).reward
    sources = RewardSources(reward)
    contexts, responses = ["q", "q"], ["a cat", "dog dog dog dog dog"]
    fields = [{"reference": "a cat", "max_words": 2}, {"reference": "a cat", "max_words": 2}]
    judge_mass = {"within_word_budget": 1.0}

    def score_part(part):
        r = sources.call(part, contexts, responses, fields)
        return r, [json.dumps({"label_mass": judge_mass.get(part.name or "", 1.0)})] * len(r)

    totals, raws, metas, parts = sources.total(score_part)
    assert json.loads(parts[0]) == {"within_word_budget": 1.0, "overlap": 1.0}
    assert totals[0] == pytest.approx(0.5 * 1.0 + 2 * 1.0) and totals[1] == pytest.approx(0.5 * 0.0 + 2 * 0.0)
    assert json.loads(metas[0])["source"] == "sum" and raws == totals


class _Flaky(BaseHTTPRequestHandler):
    """The example server's schema, with a 503 + Retry-After first and a garbage path."""
    calls = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if self.path == "/garbage":
            return self._send(200, b"<html>oops</html>")
        if self.path == "/flaky" and type(self).calls == 1:
            self.send_response(503)
            self.send_header("Retry-After", "0.05")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(200, json.dumps({"rewards": [float(len(r)) for r in body["responses"]]}).encode())

    def _send(self, status, raw):
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def reward_server():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_reward_server", ROOT / "examples" / "reward_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (mod.RewardHandler, _Flaky)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()


def test_http_reward_schema_batches_retries_and_garbage(reward_server, monkeypatch):
    example, flaky = reward_server
    monkeypatch.chdir(ROOT)
    responses = [" ".join(["w"] * k) for k in range(1, 8)]
    fields = [{"max_words": 3}] * 7
    direct = PythonReward("examples.rewards:within_word_budget")([""] * 7, responses, [None] * 7, fields)
    server = HttpReward(example + "/", batch_size=3, max_concurrency=2)
    assert server([""] * 7, responses, [None] * 7, fields) == direct and server.requests == 3  # 3 + 3 + 1
    again = HttpReward(flaky + "/flaky", max_retries=2)
    assert again(["p"], ["abc"], [None], [{}]) == [3.0] and again.retries == 1
    with pytest.raises(RewardError, match="body that is not JSON"):
        HttpReward(flaky + "/garbage")(["p"], ["abc"], [None], [{}])
    with pytest.raises(RewardError, match=r"failed 2 time\(s\); last: cannot reach it"):
        HttpReward("http://127.0.0.1:9/reward", max_retries=1)(["p"], ["a"], [None], [{}])
