"""The OpenAI-compatible /v1/completions protocol, both sides, without Ray:

- `OpenAIEngine`, the `openai` labeler backend: a client for any completions endpoint that
  returns top log-probabilities (vLLM's server, a hosted API, or `rlaif-ray serve-labeler`).
  The key comes from an environment variable and never appears in messages or logs.
- `parse_request` / `completion_response`: what `serve-labeler` accepts and answers, and
  its limits (`EndpointLimits`, `check_headers`, `check_tokens`; the `serve.*` config keys).

Reading a label from an endpoint: the endpoint only returns the top-k next tokens, so
P("1") and P("2") are summed over the spellings found there ("1", " 1", ...). A label that is
not among the top k gets, as its log-prob, the smallest log-prob returned (an upper bound,
which keeps the preference away from 0/1 rather than inventing certainty); when neither
label is among them the answer is unusable and the label mass is 0 (counted by the caller).
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass


class EndpointError(RuntimeError):
    """The endpoint could not give a usable answer; the message says why (never the key)."""


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5, top_logprobs: int = 5):
        import requests

        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.timeout, self.max_retries, self.backoff = model, timeout_s, max_retries, backoff_s
        self.top_logprobs = top_logprobs
        self.session = requests.Session()
        key = os.environ.get(api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.retries = 0  # failed tries that were retried (reported by the actor)
        self.labels_outside_top_k = 0  # one label missing from the top-k: bounded, counted

    def _post(self, body: dict) -> dict:
        import requests

        last, wait = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(max(self.backoff * 2 ** (attempt - 1), wait))
            wait = 0.0
            try:
                r = self.session.post(self.url, json=body, timeout=self.timeout)
            except requests.Timeout:
                last = f"no answer within {self.timeout:g} s (openai.timeout_s)"
                continue
            except requests.ConnectionError as e:
                last = f"cannot connect ({type(e).__name__})"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                wait = retry_after_s(r.headers.get("Retry-After"), self.timeout)  # a busy server's own estimate
                continue
            if r.status_code != 200:  # 400/401/404...: retrying cannot help
                raise EndpointError(f"{self.url} answered HTTP {r.status_code}: {r.text[:300]}")
            try:
                return r.json()
            except ValueError:
                raise EndpointError(f"{self.url} answered HTTP 200 with a body that is not JSON: {r.text[:200]!r}") from None
        raise EndpointError(f"{self.url} failed {self.max_retries + 1} time(s); last: {last}")

    def _choices(self, texts: list[str], **params) -> list[dict]:
        out = self._post({"model": self.model, "prompt": texts, **params})
        choices = out.get("choices") if isinstance(out, dict) else None
        if not isinstance(choices, list) or len(choices) != len(texts):
            raise EndpointError(f"{self.url}: expected {len(texts)} choices, got {str(out)[:200]}")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def label_text_logprobs(self, texts: list[str], groups: list[list[str]]):
        """[B, len(groups)] log-probs of each label (summed over its spellings) as the next token."""
        import torch

        choices = self._choices(texts, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
        out = torch.empty(len(texts), len(groups), device="cpu")
        for b, c in enumerate(choices):
            top = top_logprobs_of(c, self.url)
            row, missing = read_labels(top, groups)
            self.labels_outside_top_k += missing
            out[b] = torch.tensor(row, device="cpu")
        return out

    def complete_text(self, texts: list[str], max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if temperature > 0 and top_k:
            params["top_k"] = top_k  # vLLM and serve-labeler accept it; others ignore it
        return [c.get("text") or "" for c in self._choices(texts, **params)]


def retry_after_s(value: str | None, cap: float) -> float:
    """A Retry-After header in seconds (0 if absent or an HTTP date), at most `cap`."""
    try:
        s = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return min(max(s, 0.0), cap) if not math.isnan(s) else 0.0


def top_logprobs_of(choice: dict, url: str = "the endpoint") -> dict[str, float]:
    lp = choice.get("logprobs")
    tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not tops or not isinstance(tops[0], dict):
        raise EndpointError(f"{url} returned no log-probabilities (choices[].logprobs.top_logprobs is "
                            f"{'missing' if lp is None else 'empty'}): the labeler needs an endpoint that "
                            "honours the 'logprobs' parameter of /v1/completions")
    return tops[0]


def read_labels(top: dict[str, float], groups: list[list[str]]) -> tuple[list[float], int]:
    """Label log-probs from one position's top-k: logsumexp over each label's spellings; a
    label absent from the top-k gets the smallest log-prob returned (an upper bound); both
    absent -> all -inf (label mass 0). Returns (log-probs, number of labels bounded)."""
    found = [[v for k, v in top.items() if k in g] for g in groups]
    if not any(found):
        return [-math.inf] * len(groups), 0
    floor = min(top.values())
    row = [_logsumexp(f) if f else floor for f in found]
    return row, sum(1 for f in found if not f)


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


# ---- the server side (used by actors/labeler_server.py) ----
#
# What one request may ask of a `serve-labeler` replica. Every limit is a `serve.*` config key
# (config.ServeConfig) and every refusal is an OpenAI-shaped error naming the limit and the key:
#   Content-Type not application/json -> 415 (a web page's text/plain cross-origin POST, which a
#       browser sends without asking, is refused; application/json needs a CORS preflight,
#       which this server does not grant)
#   body over serve.max_body_bytes -> 413, from Content-Length before anything is read, and
#       from the bytes actually read (a body without Content-Length is read only up to the cap)
#   more than serve.max_prompts_per_request prompts, max_tokens over serve.max_tokens_limit, a
#       prompt over serve.max_prompt_tokens tokens or the model's context, prompt + max_tokens
#       summed over the prompts over serve.max_total_tokens -> 400
#   more than serve.max_queued_requests requests already waiting on the replica -> 429 with
#       Retry-After (seconds)
#   not answered within serve.request_timeout_s of its arrival (waiting included) -> 504; a
#       running request is stopped at its next decoding step (engines: `should_stop`)

class RequestError(ValueError):
    """A bad request; the message names the field or the limit and its config key. `status` is
    the HTTP status (400 unless said), `code` OpenAI's error code, `headers` extra headers."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.kind, self.param, self.headers = status, code, kind, param, headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class EndpointLimits:
    """A replica's limits (ServeConfig's fields of the same meaning; the defaults are its)."""
    max_tokens: int = 1024  # serve.max_tokens_limit
    max_prompts: int = 64  # serve.max_prompts_per_request
    max_body_bytes: int = 1 << 20  # serve.max_body_bytes
    max_prompt_tokens: int = 4096  # serve.max_prompt_tokens
    max_total_tokens: int = 32768  # serve.max_total_tokens
    timeout_s: float = 60.0  # serve.request_timeout_s
    max_queued: int = 8  # serve.max_queued_requests
    batch_size: int = 8  # serve.batch_size

    @classmethod
    def of(cls, serve) -> "EndpointLimits":
        """From a config.ServeConfig."""
        return cls(max_tokens=serve.max_tokens_limit, max_prompts=serve.max_prompts_per_request,
                   max_body_bytes=serve.max_body_bytes, max_prompt_tokens=serve.max_prompt_tokens,
                   max_total_tokens=serve.max_total_tokens, timeout_s=serve.request_timeout_s,
                   max_queued=serve.max_queued_requests, batch_size=serve.batch_size)


def check_headers(content_type: str | None, content_length: str | None, limits: EndpointLimits) -> None:
    """Before the body is read: a JSON content type (415) and a declared size within the cap (413)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {content_type or 'none'!r}", 415,
                           "unsupported_media_type")
    if content_length is not None:
        try:
            n = int(content_length)
        except ValueError:
            raise RequestError(f"Content-Length is not a number: {content_length[:40]!r}") from None
        check_body_size(n, limits)


def check_body_size(n: int, limits: EndpointLimits) -> None:
    """`n` bytes declared or read so far."""
    if n > limits.max_body_bytes:
        raise RequestError(f"the request body has more than {limits.max_body_bytes} bytes ({n}); the limit is "
                           f"serve.max_body_bytes", 413, "max_body_bytes")


def queue_full(waiting: int, mean_run_s: float | None, limits: EndpointLimits) -> RequestError:
    """429 for a replica with `waiting` requests already waiting; Retry-After estimates when one
    slot frees: the mean time a request held the replica (the time limit before any ran),
    between 1 s and the time limit."""
    per = limits.timeout_s if mean_run_s is None else mean_run_s
    after = int(min(max(1.0, math.ceil(per)), max(1.0, math.ceil(limits.timeout_s))))
    return RequestError(f"the replica is busy: {waiting} request(s) already waiting, the limit is "
                        f"{limits.max_queued} (serve.max_queued_requests); retry after {after} s", 429,
                        "max_queued_requests", "rate_limit_error", headers={"Retry-After": str(after)})


def time_limit(limits: EndpointLimits, where: str) -> RequestError:
    return RequestError(f"the request was not answered within its time limit of {limits.timeout_s:g} s "
                        f"(serve.request_timeout_s): {where}", 504, "request_timeout_s", "timeout_error")


def parse_request(body, limits: "EndpointLimits | int") -> dict:
    """Validate a /v1/completions body; returns prompts and sampling settings. `limits`: the
    replica's EndpointLimits (an int: the max_tokens limit, the other limits at their defaults)."""
    if isinstance(limits, int):
        limits = EndpointLimits(max_tokens=limits)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(prompts, list) and len(prompts) > limits.max_prompts:
        raise RequestError(f"too many prompts: {len(prompts)} in one request, the limit is {limits.max_prompts} "
                           "(serve.max_prompts_per_request)", code="max_prompts_per_request", param="prompt")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise RequestError("'n' and 'best_of' must be 1 (one completion per prompt)", param="n")
    if body.get("echo"):
        raise RequestError("'echo' is not supported", param="echo")
    if body.get("stream"):
        raise RequestError("'stream' is not supported", param="stream")
    fields = {"max_tokens": (int, 16), "temperature": ((int, float), 1.0), "top_p": ((int, float), 1.0),
              "top_k": (int, 0), "logprobs": ((int, type(None)), None), "seed": ((int, type(None)), None)}
    out = {"prompts": prompts}
    for name, (kind, default) in fields.items():
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RequestError(f"'{name}' must be a number, got {value!r}", param=name)
        out[name] = value
    if not 1 <= out["max_tokens"] <= limits.max_tokens:
        raise RequestError(f"'max_tokens' must be in 1..{limits.max_tokens} (serve.max_tokens_limit), got "
                           f"{out['max_tokens']}", code="max_tokens_limit", param="max_tokens")
    if not (math.isfinite(out["temperature"]) and math.isfinite(out["top_p"])) or out["temperature"] < 0 \
            or not 0 < out["top_p"] <= 1 or out["top_k"] < 0:
        raise RequestError("'temperature' must be >= 0, 'top_p' in (0, 1], 'top_k' >= 0")
    if out["logprobs"] is not None and not 0 <= out["logprobs"] <= 20:
        raise RequestError(f"'logprobs' must be in 0..20, got {out['logprobs']}", param="logprobs")
    return out


def check_tokens(lengths: list[int], max_tokens: int, limits: EndpointLimits, context: int) -> None:
    """Token counts of a request's prompts: each within the model's context (with max_tokens)
    and serve.max_prompt_tokens; prompt + max_tokens summed over the prompts within
    serve.max_total_tokens."""
    for i, n in enumerate(lengths):
        if n + max_tokens > context:
            raise RequestError(f"prompt {i} has {n} tokens; with max_tokens={max_tokens} it exceeds the model's "
                               f"context of {context}", code="context_length_exceeded", param="prompt")
        if n > limits.max_prompt_tokens:
            raise RequestError(f"prompt {i} has {n} tokens, the limit is {limits.max_prompt_tokens} "
                               "(serve.max_prompt_tokens)", code="max_prompt_tokens", param="prompt")
    total = sum(lengths) + max_tokens * len(lengths)
    if total > limits.max_total_tokens:
        raise RequestError(f"the request needs {total} tokens ({sum(lengths)} prompt + max_tokens={max_tokens} x "
                           f"{len(lengths)} prompts), the limit is {limits.max_total_tokens} (serve.max_total_tokens)",
                           code="max_total_tokens", param="prompt")


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, key_env: str, key_set: bool) -> str | None:
    """The warning `serve-labeler` prints when it listens beyond loopback without a key."""
    if key_set or is_loopback(host):
        return None
    return (f"WARNING: serve.host={host} is not a loopback address and {key_env} (serve.api_key_env) is not set: "
            f"anyone who can reach port {port} can use the model and this machine's CPU/GPU without a key "
            f"(and keep the replica busy). Set {key_env} to require a Bearer key, or serve on 127.0.0.1.")


def completion_response(model: str, results: list[dict], want_logprobs: bool, prompt_tokens: int) -> dict:
    """OpenAI completions answer. Each result: text, tokens (strings), token_logprobs,
    top_logprobs (list of {token: logprob}), finish_reason."""
    choices = []
    for i, r in enumerate(results):
        lp = None
        if want_logprobs:
            offsets, pos = [], 0
            for t in r["tokens"]:
                offsets.append(pos)
                pos += len(t)
            lp = {"tokens": r["tokens"], "token_logprobs": r["token_logprobs"],
                  "top_logprobs": r["top_logprobs"], "text_offset": offsets}
        choices.append({"index": i, "text": r["text"], "logprobs": lp, "finish_reason": r["finish_reason"]})
    completion = sum(len(r["tokens"]) for r in results)
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}
