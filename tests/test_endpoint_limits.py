"""`serve-labeler`'s limits (issue 20, item 1): the request checks as pure functions, the
engine's bounded logit memory and its stop check, the config's validators, the warning for a
non-loopback host without a key, the client honouring Retry-After, and one real endpoint on
loopback (Ray Serve, tiny model) refusing each kind of excess while still answering valid
requests."""
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlaif_ray.config import ConfigError, ServeConfig, load_config
from rlaif_ray.feedback.openai_api import (
    EndpointLimits,
    OpenAIEngine,
    RequestError,
    check_body_size,
    check_headers,
    check_tokens,
    exposure_warning,
    parse_request,
    queue_full,
    retry_after_s,
)

SMALL = EndpointLimits(max_tokens=32, max_prompts=4, max_body_bytes=1000, max_prompt_tokens=50, max_total_tokens=120,
                       timeout_s=5.0, max_queued=2, batch_size=2)


def _refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


def test_limits_defaults_are_the_config_defaults():
    assert EndpointLimits.of(ServeConfig()) == EndpointLimits()
    cfg = load_config(None, ["serve.max_prompts_per_request=3", "serve.request_timeout_s=2.5",
                             "serve.max_queued_requests=0"])
    lim = EndpointLimits.of(cfg.serve)
    assert (lim.max_prompts, lim.timeout_s, lim.max_queued) == (3, 2.5, 0)


@pytest.mark.parametrize("override, words", [
    ("serve.max_total_tokens=100", "serve.max_total_tokens (100) must be at least 4097"),
    ("serve.request_timeout_s=.inf", "serve.request_timeout_s"),
    ("serve.max_body_bytes=0", "serve.max_body_bytes"),
    ("serve.max_queued_requests=-1", "serve.max_queued_requests"),
    ("serve.max_prompts_per_request=0", "serve.max_prompts_per_request"),
])
def test_config_refuses_unsafe_limits(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, [override])


def test_content_type_must_be_json_and_size_is_checked_from_the_headers():
    check_headers("application/json", "10", SMALL)
    check_headers("Application/JSON; charset=utf-8", None, SMALL)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        e = _refused(check_headers, ctype, "10", SMALL)
        assert e.status == 415 and "application/json" in str(e)
        assert e.body()["error"]["code"] == "unsupported_media_type"
    e = _refused(check_headers, "application/json", "1001", SMALL)
    assert e.status == 413 and "serve.max_body_bytes" in str(e) and e.body()["error"]["code"] == "max_body_bytes"
    assert _refused(check_headers, "application/json", "lots", SMALL).status == 400
    check_body_size(1000, SMALL)
    assert _refused(check_body_size, 1001, SMALL).status == 413


def test_too_many_prompts_is_refused_naming_the_limit():
    """The old endpoint accepted 100,000 prompts in one request."""
    e = _refused(parse_request, {"prompt": ["x"] * 100_000, "max_tokens": 1}, EndpointLimits())
    assert e.status == 400 and "100000" in str(e) and "serve.max_prompts_per_request" in str(e)
    assert e.body() == {"error": {"message": str(e), "type": "invalid_request_error", "param": "prompt",
                                  "code": "max_prompts_per_request"}}
    assert len(parse_request({"prompt": ["x"] * 4}, SMALL)["prompts"]) == 4
    assert _refused(parse_request, {"prompt": ["x"] * 5}, SMALL).code == "max_prompts_per_request"
    e = _refused(parse_request, {"prompt": "x", "max_tokens": 33}, SMALL)
    assert "serve.max_tokens_limit" in str(e) and e.param == "max_tokens"
    assert _refused(parse_request, {"prompt": "x", "temperature": float("nan")}, SMALL).status == 400


def test_token_limits_per_prompt_per_request_and_the_context():
    check_tokens([50, 20], 10, SMALL, context=2048)  # 70 + 20 = 90 <= 120
    e = _refused(check_tokens, [10, 51], 1, SMALL, 2048)
    assert "prompt 1 has 51 tokens" in str(e) and "serve.max_prompt_tokens" in str(e) and e.status == 400
    e = _refused(check_tokens, [50, 50], 11, SMALL, 2048)  # 100 + 22 = 122 > 120
    assert "needs 122 tokens" in str(e) and "serve.max_total_tokens" in str(e)
    e = _refused(check_tokens, [40], 30, SMALL, 64)
    assert "exceeds the model's context of 64" in str(e) and e.code == "context_length_exceeded"


def test_queue_full_is_429_with_retry_after():
    e = queue_full(2, None, SMALL)  # nothing has run yet: the time limit
    assert e.status == 429 and e.headers == {"Retry-After": "5"} and "serve.max_queued_requests" in str(e)
    assert queue_full(2, 0.2, SMALL).headers["Retry-After"] == "1"  # at least 1 s
    assert queue_full(2, 2.3, SMALL).headers["Retry-After"] == "3"
    assert queue_full(2, 99.0, SMALL).headers["Retry-After"] == "5"  # at most the time limit
    assert retry_after_s("3", 60) == 3.0 and retry_after_s("999", 60) == 60 and retry_after_s(None, 60) == 0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 60) == 0 and retry_after_s("nan", 60) == 0


def test_warning_for_a_non_loopback_host_without_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert exposure_warning(host, 8000, "K", key_set=False) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "myhost.example"):
        w = exposure_warning(host, 8123, "RLAIF_RAY_SERVE_API_KEY", key_set=False)
        assert w and "anyone who can reach port 8123 can use the model" in w and "CPU/GPU" in w
        assert "RLAIF_RAY_SERVE_API_KEY" in w
        assert exposure_warning(host, 8123, "K", key_set=True) is None


def test_sample_with_logprobs_keeps_no_full_logits_and_runs_in_batches(tiny_model_path, monkeypatch):
    """Equal to the full-logits computation (the old one), but generate is never asked for
    the logits of every step, the prompts run in batches, and a stop request ends it."""
    import torch

    from rlaif_ray.engines import lm
    from rlaif_ray.engines.hf import HFEngine

    eng = HFEngine(tiny_model_path)
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10], [11, 12]]
    calls = []
    real = lm.generate

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(lm, "generate", spy)
    got = eng.sample_with_logprobs(seqs, 6, 0.0, 1.0, 0, 3, 0, batch_size=2)
    assert [kw["input_ids"].shape[0] for kw in calls] == [2, 2, 1]
    assert not any(kw.get("output_logits") or kw.get("output_scores") for kw in calls)

    ids, mask, _ = lm.left_pad(seqs[:2], eng.pad, eng.device)  # the reference: every step's logits
    ref = real(eng.model, input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=eng.pad,
               output_logits=True, return_dict_in_generate=True, do_sample=False, temperature=None, top_p=None,
               top_k=None)
    logp = torch.stack(ref.logits, 1).float().log_softmax(-1)
    for b in range(2):
        toks = ref.sequences[b, ids.shape[1]:].tolist()
        assert got[b]["ids"] == toks
        want = logp[b].gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got[b]["token_logprobs"]), want, atol=1e-5, rtol=0)
        top = logp[b].topk(3, -1)
        assert [[t for t, _ in step] for step in got[b]["top"]] == top.indices.tolist()

    plain = eng.sample_with_logprobs(seqs[:1], 3, 0.0, 1.0, 0, 0, 0)[0]  # logprobs 0: no top-k
    assert plain["top"] is None and plain["ids"] == got[0]["ids"][:3] and len(plain["token_logprobs"]) == 3

    asked = []
    with pytest.raises(TimeoutError):
        eng.sample_with_logprobs(seqs, 500, 0.0, 1.0, 0, 3, 0, batch_size=8,
                                 should_stop=lambda: asked.append(1) or len(asked) > 5)
    assert len(asked) <= 8  # stopped within a step or two of being asked, not after 500


MEMORY_PROBE = """
import resource, sys, torch
from rlaif_ray.engines.hf import HFEngine
eng = HFEngine(sys.argv[1])
eng.sample_with_logprobs([[1, 2, 3]], 4, 0.0, 1.0, 0, 5, 0)  # warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
eng.sample_with_logprobs([[i + 1, i + 2] for i in range(8)], 200, 0.9, 1.0, 0, 5, 0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_logit_memory_per_request_is_bounded(tiny_model_path):
    """8 prompts x 200 steps: the old code kept [8, 200, 49152] float32 logits (315 MB) and
    two copies of them (stacked, log-softmax): about 0.9 GB of peak. Now: the top-k per step."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, tiny_model_path], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 150, f"peak RSS grew {grew_mb} MB"


class _Busy(BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls == 1:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        data = json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)


def test_client_waits_as_long_as_retry_after_says():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        eng = OpenAIEngine(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", backoff_s=0.01, max_retries=2)
        t = time.monotonic()
        assert eng.complete_text(["a"], 2, 0.0, 0, 0) == ["ok"]
        assert time.monotonic() - t >= 0.95 and eng.retries == 1
    finally:
        server.shutdown()


def _post(url, body=None, data=None, ctype="application/json", timeout=60):
    import requests

    headers = {"Content-Type": ctype} if ctype else {}
    return requests.post(url, data=json.dumps(body) if data is None else data, headers=headers, timeout=timeout)


def test_endpoint_limits_on_loopback(ray_local, tiny_model_path, monkeypatch):
    """The real endpoint (Ray Serve, tiny model, small limits): each excess refused with its
    status, the limit and its config key; a request past the time limit stopped and answered
    504 in time; concurrent requests beyond the queue answered 429 with Retry-After; valid
    requests answered 200 before and after all that. On the old endpoint every refusal here
    was a 200 (or a request running for as long as it asked), and text/plain was served."""
    import requests
    from ray import serve

    from rlaif_ray.commands.serve_labeler import serve_labeler
    from rlaif_ray.feedback.openai_api import error_body

    port = _free_port()
    timeout_s = 2.0
    monkeypatch.delenv("TEST_LIMITS_KEY", raising=False)
    cfg = load_config(None, [f"model.name={tiny_model_path}", f"serve.port={port}", "serve.num_cpus=0.5",
                             "serve.api_key_env=TEST_LIMITS_KEY", "serve.max_body_bytes=20000",
                             "serve.max_prompts_per_request=8", "serve.max_prompt_tokens=200",
                             "serve.max_tokens_limit=1800", "serve.max_total_tokens=15000",
                             f"serve.request_timeout_s={timeout_s}", "serve.max_queued_requests=1",
                             "serve.batch_size=1"])
    url = serve_labeler(cfg) + "/completions"
    try:
        ok = {"prompt": ["Hello there", "Another one"], "max_tokens": 3, "temperature": 0.0, "logprobs": 2}
        r = _post(url, ok)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert isinstance(health["pid"], int)

        def refused(r, status, words):
            assert r.status_code == status, (r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == set(error_body("")["error"]) and words in err["message"], err
            return err

        # the body: declared too large (refused before reading), or sent chunked without a length
        refused(_post(url, {"prompt": "x" * 30000, "max_tokens": 1}), 413, "serve.max_body_bytes")
        chunks = (b'{"prompt": "' if i == 0 else b"y" * 1000 for i in range(40))
        refused(_post(url, data=chunks), 413, "serve.max_body_bytes")
        # the content type: a web page's text/plain POST, and none at all
        refused(_post(url, ok, ctype="text/plain"), 415, "application/json")
        refused(_post(url, ok, ctype=None), 415, "application/json")
        # prompts and tokens
        refused(_post(url, {"prompt": ["x"] * 9, "max_tokens": 1}), 400, "serve.max_prompts_per_request")
        refused(_post(url, {"prompt": "word " * 300, "max_tokens": 1}), 400, "serve.max_prompt_tokens")
        refused(_post(url, {"prompt": ["word " * 150] * 8, "max_tokens": 1800}), 400, "serve.max_total_tokens")

        # a request asking for far more than the time limit allows (8 prompts x 1800 steps, one
        # at a time) is stopped at the limit and answered 504 in time
        slow = {"prompt": [f"slow {i}" for i in range(8)], "max_tokens": 1800, "temperature": 0.0}
        t = time.monotonic()
        refused(_post(url, slow), 504, "serve.request_timeout_s")
        took = time.monotonic() - t
        assert timeout_s - 0.1 <= took < timeout_s + 3.0, took
        r = _post(url, ok)  # the replica is free again at once
        assert r.status_code == 200 and time.monotonic() - t < timeout_s + 5.0

        # the queue: 1 generating + 1 waiting admitted, the rest 429 with Retry-After
        results = [None] * 6

        def fire(i):
            results[i] = _post(url, slow)

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        codes = sorted(r.status_code for r in results)
        busy = [r for r in results if r.status_code == 429]
        assert len(busy) >= 3 and set(codes) <= {429, 504}, codes
        for r in busy:
            err = refused(r, 429, "serve.max_queued_requests")
            assert err["type"] == "rate_limit_error" and 1 <= int(r.headers["Retry-After"]) <= timeout_s

        r = _post(url, ok)  # and valid requests are answered afterwards
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["in_flight"] == 0 and health["running"] == 0 and health["refused"]["429"] >= 3
    finally:
        serve.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
