"""The `openai` labeler backend and `serve-labeler`, over real HTTP on loopback: label
spellings, the protocol checks, misbehaving endpoints (no log-probs, HTTP 500, timeouts,
a wrong key), and the project's own endpoint against the local model."""
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from judged_runs import ROOT, check_judged_run, endpoint, own_data_cfg

from rlaif_ray.engines import lm
from rlaif_ray.feedback import prompts, scoring
from rlaif_ray.feedback.openai_api import EndpointError, OpenAIEngine, RequestError, parse_request, read_labels


def test_label_spellings_on_the_real_tokenizer(tokenizer):
    """SmolLM2 has "1" and "2" as tokens but never " 1": that spelling is " " then "1"."""
    one, two = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")
    assert scoring.label_token_ids(tokenizer, scoring.ONE) == [one]
    assert scoring.label_token_ids(tokenizer, scoring.TWO) == [two]
    prefix, digits = scoring.split_spellings(tokenizer, " 1", " 2")
    assert tokenizer.decode([prefix]) == " " and digits == [one, two]


def test_judge_reads_both_spellings_in_one_pass(tiny_model, tokenizer):
    """P("1") = P("1" | prompt) + P(" " | prompt) * P("1" | prompt + " "), checked against
    two separate forward passes."""
    from rlaif_ray.feedback.labeling import Judge

    judge = Judge.of_model(tiny_model, tokenizer, "yesno_about_chat")
    texts = [prompts.build("helpful", "Human: hi", "Hello! How can I help?", "Go away."),
             prompts.build("summarization", "A long post.", "Short.", "Other.")]
    got = judge.labels.pair(texts)
    pad = tokenizer.pad_token_id
    for b, text in enumerate(texts):
        seq = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = lm.next_token_logprobs(tiny_model, [seq], pad, 1)[0, -1]
        spaced = lm.next_token_logprobs(tiny_model, [seq + [judge.labels.label_prefix]], pad, 1)[0, -1]
        for j, digit in enumerate(judge.labels.prefixed):
            want = torch.logaddexp(first[digit], first[judge.labels.label_prefix] + spaced[digit])
            assert got[b, j].item() == pytest.approx(want.item(), abs=1e-4)


def test_read_labels_from_top_logprobs():
    groups = [scoring.ONE, scoring.TWO]
    row, missing = read_labels({"1": -0.5, " 1": -2.0, "2": -1.0, "a": -3.0}, groups)
    assert row[0] == pytest.approx(math.log(math.exp(-0.5) + math.exp(-2.0))) and row[1] == -1.0 and missing == 0
    row, missing = read_labels({"1": -0.5, "x": -4.0}, groups)  # "2" outside the top-k: bounded
    assert row == [-0.5, -4.0] and missing == 1
    row, missing = read_labels({"x": -1.0}, groups)  # no label at all: unusable
    assert row == [-math.inf, -math.inf]


def test_parse_request_names_the_field():
    assert parse_request({"prompt": "hi", "max_tokens": 1, "logprobs": 5}, 64)["prompts"] == ["hi"]
    for body, field in [({"max_tokens": 1}, "'prompt'"), ({"prompt": "x", "max_tokens": 65}, "'max_tokens'"),
                        ({"prompt": "x", "logprobs": 21}, "'logprobs'"), ({"prompt": "x", "n": 17}, "'n'"),
                        ({"prompt": "x", "temperature": "hot"}, "'temperature'"), ([1], "JSON object")]:
        with pytest.raises(RequestError, match=field):
            parse_request(body, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Misbehaving(BaseHTTPRequestHandler):
    """A completions endpoint that fails in the way its path says."""
    calls: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        n = self.calls[mode] = self.calls.get(mode, 0) + 1
        if mode == "slow":
            time.sleep(1.0)
        if mode == "always500" or (mode == "flaky" and n <= 2):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal error")
            return
        if mode == "garbage":  # HTTP 200, a JSON body that is no OpenAI answer
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"result": "ok"}')
            return
        if mode == "badkey":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad key"}}')
            return
        prompts_ = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        with_lp = mode != "nologprobs"
        choices = [{"index": i, "text": "1", "finish_reason": "length",
                    "logprobs": {"tokens": ["1"], "token_logprobs": [-0.1], "top_logprobs": [{"1": -0.1, "2": -2.4}],
                                 "text_offset": [0]} if with_lp else None} for i in range(len(prompts_))]
        data = json.dumps({"object": "text_completion", "choices": choices}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up first (the timeout case)
            pass


@pytest.fixture(scope="module")
def misbehaving():
    server = ThreadingHTTPServer(("127.0.0.1", _free_port()), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_bad_endpoint_answers_give_clear_errors_and_retries(misbehaving, monkeypatch):
    monkeypatch.setenv("TEST_LABELER_KEY", "sk-test-secret-123")

    def engine(mode, **kw):
        args = dict(model="m", api_key_env="TEST_LABELER_KEY", max_retries=2, backoff_s=0.01, timeout_s=5.0)
        return OpenAIEngine(f"{misbehaving}/{mode}/v1", **{**args, **kw})

    ok = engine("fine")
    logp = ok.label_text_logprobs(["a", "b"], [scoring.ONE, scoring.TWO])
    assert logp.shape == (2, 2) and logp[0, 0].item() == pytest.approx(-0.1)

    # answers without log-probs, or no OpenAI answer at all: those labels are unusable (mass 0),
    # counted, and the first problem kept in words for the run's summary; the run goes on
    for mode, problem in (("nologprobs", "returned no log-probabilities"), ("garbage", "not an OpenAI answer")):
        bad = engine(mode)
        logp = bad.label_text_logprobs(["a", "b"], [scoring.ONE, scoring.TWO])
        assert torch.isinf(logp).all() and bad.counters()["unusable_answers"] == 2
        assert problem in bad.counters()["endpoint_problem"]

    flaky = engine("flaky")  # two HTTP 500s, then an answer: retried with backoff
    assert flaky.label_text_logprobs(["a"], [scoring.ONE, scoring.TWO]).shape == (1, 2) and flaky.retries == 2

    down = engine("always500")
    with pytest.raises(EndpointError, match=r"failed 3 time\(s\) \(waited \d+ s.*; last: HTTP 500") as err:
        down.label_text_logprobs(["a"], [scoring.ONE, scoring.TWO])
    assert down.retries == 2 and "sk-test-secret-123" not in str(err.value)

    slow = engine("slow", timeout_s=0.2, max_retries=1)
    with pytest.raises(EndpointError, match="no answer within 0.2 s"):
        slow.label_text_logprobs(["a"], [scoring.ONE, scoring.TWO])

    badkey = engine("badkey")  # a 4xx is not retried
    with pytest.raises(EndpointError, match="HTTP 401"):
        badkey.label_text_logprobs(["a"], [scoring.ONE, scoring.TWO])
    assert badkey.retries == 0

    nothing = OpenAIEngine(f"http://127.0.0.1:{_free_port()}/v1", "m", max_retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match="cannot connect"):
        nothing.complete_text(["a"], 4, 0.0, 0, 0)


@pytest.mark.slow
def test_openai_backend_against_serve_labeler(ray_local, tiny_model_path, monkeypatch, tmp_path):
    """serve-labeler (Ray Serve, real model) on loopback: only 127.0.0.1 listens; the
    endpoint's label log-probs and greedy text equal the local model's; a Judge over the
    `openai` backend labels pairs (debiased, CoT two-step); `rlaif-ray label` with a pool of
    2 openai-backend actors labels a file, and the row the endpoint refuses (too long) comes
    out with the endpoint's reason; `train` on your own data runs with it as its judge (chat
    API, labels from log-probs and from parsed text); then, with a key set, the key is enforced."""
    import psutil
    import pyarrow.parquet as pq
    from ray import serve

    from rlaif_ray.commands.label import label_file
    from rlaif_ray.commands.serve_labeler import serve_labeler
    from rlaif_ray.commands.train import train
    from rlaif_ray.config import PairwiseConfig, load_config
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.engines.models import DEFAULT_MODEL, load_model, load_tokenizer
    from rlaif_ray.feedback.labeling import EndpointLabels, Judge
    from rlaif_ray.feedback.pairs import load_pairs

    port = _free_port()
    serve_args = [f"serve.port={port}", "serve.num_cpus=0.5", "serve.api_key_env=TEST_SERVE_KEY"]
    monkeypatch.delenv("TEST_SERVE_KEY", raising=False)
    url = serve_labeler(load_config(None, serve_args))
    try:
        assert url == f"http://127.0.0.1:{port}/v1"
        listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}

        eng = OpenAIEngine(url, DEFAULT_MODEL, top_logprobs=20)
        rows, task = load_pairs("hh_helpful", 4)
        texts = [prompts.build(task, r["context"], r["response_a"], r["response_b"]) for r in rows]
        tok, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL)
        ids = [tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")]
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        local = lm.next_token_logprobs(model, seqs, tok.pad_token_id, 1)[:, -1, ids]
        remote = eng.label_text_logprobs(texts, [["1"], ["2"]])
        torch.testing.assert_close(remote, local, atol=2e-3, rtol=0)
        greedy = HFEngine(model, tok).complete(seqs[:2], 6, 0.0, 0, 0)
        assert eng.complete_text(texts[:2], 6, 0.0, 0, 0) == [tok.decode(g, skip_special_tokens=True) for g in greedy]

        judge = Judge(EndpointLabels(eng), "yesno_about_chat", batch_size=4)
        pref = judge.prefer([r["context"] for r in rows], [r["response_a"] for r in rows],
                            [r["response_b"] for r in rows], PairwiseConfig(task=task))
        p_a, p_ab, p_ba = pref.p_a, pref.p_ab, pref.p_ba
        assert all(0 < p < 1 for p in p_a + p_ab + p_ba) and min(pref.label_mass) > 0
        cot = judge.prefer([rows[0]["context"]], [rows[0]["response_a"]], [rows[0]["response_b"]],
                           PairwiseConfig(task=task, cot=True, cot_max_tokens=8))
        p_cot = cot.p_a
        assert len(cot.rationales[0]) == 1 and len(cot.rationales[0][0]) == 2 and 0 <= p_cot[0] <= 1

        too_long = {"id": "too-long", "context": "word " * 9000, "response_a": "a", "response_b": "b"}
        src = tmp_path / "pairs.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows + [too_long]))
        cfg = load_config(None, ["reward.backend=openai", f"reward.openai.base_url={url}", "reward.openai.top_logprobs=20",
                                 "reward.openai.backoff_s=0.01", "reward.pairwise.task=helpful", "reward.batch_size=2",
                                 "label.pool_size=2", "label.num_cpus=0.25", "label.batch_size=2",
                                 f"label.output={tmp_path / 'labels'}"])
        summary = label_file(cfg, str(src))
        assert summary["labelled"] == 4 and summary["errors"] == {"labeler error": 1}
        out = {r["id"]: r for r in pq.read_table(tmp_path / "labels").to_pylist()}
        for r, want in zip(rows, p_a):  # the same endpoint, the same preferences
            assert out[r["id"]]["p_a"] == pytest.approx(want, abs=2e-3)
        assert "HTTP 400" in out["too-long"]["error"] and "exceeds the model's context" in out["too-long"]["error"]

        # `train` on your own data judged by this endpoint over the chat API: labels from the top
        # log-probs, then from `n` sampled answers, parsed (tests/test_own_judge.py: vLLM's server)
        monkeypatch.chdir(ROOT)  # the shipped config's paths are relative to the repository
        for labels in ("logprobs", "text"):
            own = own_data_cfg(tiny_model_path, tmp_path, endpoint(url, labels, samples=2),  # one engine thread: few
                               eval={"num_prompts": 2, "signal_posts": 2, "batch_size": 2})
            check_judged_run(train(own, tmp_path / f"own-{labels}", log=lambda *_: None), 2, n=2)

        monkeypatch.setenv("TEST_SERVE_KEY", "sk-serve-secret")
        serve_labeler(load_config(None, serve_args))  # redeployed: now the key is required
        monkeypatch.setenv("WRONG_KEY", "nope")
        wrong = OpenAIEngine(url, DEFAULT_MODEL, api_key_env="WRONG_KEY", max_retries=2)
        with pytest.raises(EndpointError, match="HTTP 401") as err:
            wrong.label_text_logprobs(["x"], [scoring.ONE, scoring.TWO])
        assert wrong.retries == 0 and "nope" not in str(err.value)
        keyed = OpenAIEngine(url, DEFAULT_MODEL, api_key_env="TEST_SERVE_KEY", top_logprobs=20)
        torch.testing.assert_close(keyed.label_text_logprobs(texts[:1], [["1"], ["2"]]), local[:1], atol=2e-3, rtol=0)
        other = OpenAIEngine(url, "gpt-9", api_key_env="TEST_SERVE_KEY")
        with pytest.raises(EndpointError, match="HTTP 404.*not served here"):
            other.complete_text(["x"], 2, 0.0, 0, 0)
    finally:
        serve.shutdown()
