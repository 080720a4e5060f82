"""The OpenAI-compatible protocol, both sides, without Ray:

- `OpenAIEngine`: the client of a judge endpoint (`reward.backend: openai`): vLLM's server,
  `rlaif-ray serve-labeler` or a hosted API, through the openai SDK (its retries with
  backoff honour Retry-After), /v1/chat/completions or /v1/completions, many requests in
  flight, the tokens sent and received counted. The key comes from an environment variable
  and never appears in messages or logs.
- `parse_request`, `parse_chat_request`, `completion_response`, `chat_response`: what
  `serve-labeler` accepts and answers, and its limits (`EndpointLimits`, `check_headers`,
  `check_tokens`; the `serve.*` config keys).

Reading a label from an endpoint's log-probs: the endpoint only returns the top-k tokens at
each position, so a label's probability is summed over the spellings found there ("1", " 1",
...). A label that is not among the top k gets, as its log-prob, the smallest log-prob
returned (an upper bound, which keeps the preference away from 0/1 rather than inventing
certainty); when no label is among them the answer is unusable and the label mass is 0
(counted by the caller). Without log-probs (labels: text), answers are sampled and parsed.
"""
from __future__ import annotations

import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class EndpointError(RuntimeError):
    """The endpoint could not give a usable answer; the message says why (never the key)."""


class OpenAIEngine:
    """A judge endpoint. `prompts` are texts or chat messages: the chat API takes both (a text
    is one user message); the completions API takes texts, and chat messages rendered with
    `tokenizer`'s chat template (a name for rlaif_ray's loader, or a loaded tokenizer).
    `wait_s`: how long to keep trying an endpoint that cannot be reached (restarted during a
    run) beyond the SDK's `max_retries`, backing off up to 10 s between tries."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5, top_logprobs: int = 5, api: str = "completions",
                 max_concurrency: int = 8, wait_s: float = 0.0, tokenizer=None, **_):
        import openai

        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")
        self.model, self.api, self.timeout, self.max_retries = model, api, timeout_s, max_retries
        self.backoff, self.wait_s, self.top_logprobs = backoff_s, wait_s, top_logprobs
        self._tokenizer = tokenizer
        self._sent = threading.local()
        self._lock = threading.Lock()
        # the SDK's own HTTP client (its defaults), with a hook that counts each try
        client_cls = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
        http = client_cls(event_hooks={"request": [self._on_request]})
        # the key from the environment only; an endpoint without keys gets a placeholder
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout_s, max_retries=max_retries, http_client=http)
        self.max_concurrency = max(1, max_concurrency)
        self.pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="judge-endpoint")
        self.retries = 0  # tries that were retried (reported by the actor)
        self.labels_outside_top_k = 0  # a label missing from the top-k: bounded, counted
        self.unparsable_answers = 0  # labels: text, an answer that named no label: counted, never guessed
        self.waited_s = 0.0  # time spent waiting for an endpoint that could not be reached
        self.unusable_answers = 0  # answers without log-probs, or not an OpenAI answer at all: counted
        self.problem = ""  # the first such problem, in words (the run's summary shows it)
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def _on_request(self, request) -> None:
        self._sent.n = getattr(self._sent, "n", 0) + 1

    # ---- one request, with the SDK's retries and the wait for an endpoint that is down ----

    def _create(self, prompts: list, **params):
        """One request for `prompts` (the completions API takes several, the chat API one)."""
        import openai

        started, pause, last = time.monotonic(), self.backoff, ""
        while True:
            self._sent.n = 0
            try:
                out = self._call(prompts, **params)
                self._count(out, self._sent.n - 1)
                return out
            except openai.APIStatusError as e:
                self._count(None, self._sent.n - 1)
                detail = f"HTTP {e.status_code}: {_message(e)}"
                if e.status_code not in (429, 502, 503, 504) and e.status_code < 500:
                    raise EndpointError(f"{self.url} answered {detail}") from None
                last = detail
            except openai.APITimeoutError:
                self._count(None, self._sent.n - 1)
                last = f"no answer within {self.timeout:g} s (reward.openai.timeout_s)"
            except openai.APIConnectionError as e:
                self._count(None, self._sent.n - 1)
                last = f"cannot connect ({type(e.__cause__ or e).__name__})"
            if time.monotonic() - started + pause > self.wait_s:
                raise EndpointError(f"{self.url} failed {self._sent.n} time(s) (waited {time.monotonic() - started:.0f} s, "
                                    f"reward.openai.wait_s={self.wait_s:g}); last: {last}")
            time.sleep(pause)  # down (restarting?): keep trying until reward.openai.wait_s
            with self._lock:
                self.waited_s += pause
            pause = min(pause * 2, 10.0)

    def _call(self, prompts: list, **params):
        if self.api == "chat":
            (prompt,) = prompts
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return self.client.chat.completions.create(model=self.model, messages=messages, **params)
        texts = [self._text(p) for p in prompts]
        return self.client.completions.create(model=self.model, prompt=texts, **params)

    def _text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self._tokenizer is None:
            raise EndpointError(f"{self.url}: a chat rubric on the completions API needs a tokenizer whose chat "
                                "template renders it (reward.openai.tokenizer), or reward.openai.api: chat")
        if isinstance(self._tokenizer, str):
            from rlaif_ray.engines.models import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def _count(self, out, retried: int) -> None:
        usage = getattr(out, "usage", None)
        with self._lock:
            self.retries += max(retried, 0)
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.usage["completion_tokens"] += int(getattr(usage, "completion_tokens", 0) or 0)

    def _each(self, prompts: list, **params) -> list:
        """One answer per prompt (its list of choices), the requests in flight at once. A
        request answered with something that is not an OpenAI answer (garbage, the wrong number
        of choices) gives its prompts no choices: their labels are unusable, counted, and the
        first such problem kept for the run's summary (`problem`)."""
        per = 1 if self.api == "chat" else 8  # prompts per request: the chat API takes one
        n = params.get("n", 1)
        batches = [prompts[i:i + per] for i in range(0, len(prompts), per)]
        outs = list(self.pool.map(lambda b: self._create(b, **params), batches))
        per_prompt = []
        for b, o in zip(batches, outs):
            choices = getattr(o, "choices", None)
            if not isinstance(choices, list) or not choices or (self.api != "chat" and len(choices) != len(b) * n):
                got = f"{len(choices)} choices for {len(b) * n}" if isinstance(choices, list) else \
                    f"a {type(o).__name__} that is not an OpenAI answer ({str(o)[:80]!r})"
                self._unusable(len(b), f"{self.url} answered {got}")
                per_prompt += [[] for _ in b]
            elif self.api == "chat":
                per_prompt.append(choices)
            else:
                choices = sorted(choices, key=lambda c: c.index)
                per_prompt += [choices[k * n:(k + 1) * n] for k in range(len(b))]
        return per_prompt

    def _unusable(self, k: int, problem: str) -> None:
        with self._lock:
            self.unusable_answers += k
            self.problem = self.problem or problem

    # ---- what the labelers ask --------------------------------------------------------------

    def answer_logprobs(self, prompts: list, positions: int = 1) -> list[list[dict[str, float]]]:
        """Per prompt, the top-k log-probs {token: logprob} at each of the first `positions`
        tokens of the greedy answer (temperature 0)."""
        params = dict(max_tokens=positions, temperature=0.0)
        if self.api == "chat":
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            params["logprobs"] = self.top_logprobs
        out = []
        for choices in self._each(prompts, **params):
            try:
                out.append(top_logprobs_of(choices[0], self.url, positions) if choices else [])
            except EndpointError as e:  # no log-probs in this answer: unusable, counted, said once
                self._unusable(1, str(e))
                out.append([])
        return out

    def label_text_logprobs(self, prompts: list, groups: list[list[str]]):
        """[B, len(groups)] log-probs of each label (summed over its spellings) as the first token."""
        import torch

        out = torch.empty(len(prompts), len(groups), device="cpu")
        for b, tops in enumerate(self.answer_logprobs(prompts)):
            row, missing = read_labels(tops[0] if tops else {}, groups)
            self.labels_outside_top_k += missing
            out[b] = torch.tensor(row, device="cpu")
        return out

    def sample_answers(self, prompts: list, n: int, max_tokens: int, temperature: float, seed: int) -> list[list[str]]:
        """`n` sampled answers per prompt (the labels: text mode)."""
        choices = self._each(prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
        return [[_choice_text(c) for c in cs] for cs in choices]  # no choices: no answers, the label unusable

    def complete_text(self, prompts: list, max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if temperature > 0 and top_k:
            params["extra_body"] = {"top_k": top_k}  # vLLM and serve-labeler take it; others ignore it
        return [_choice_text(cs[0]) if cs else "" for cs in self._each(prompts, **params)]

    def counters(self) -> dict:
        return {"endpoint_retries": self.retries, "endpoint_waited_s": round(self.waited_s, 1),
                "labels_outside_top_k": self.labels_outside_top_k,
                "unparsable_answers": self.unparsable_answers, "unusable_answers": self.unusable_answers,
                "endpoint_problem": self.problem, "endpoint_requests": self.usage["requests"],
                "judge_prompt_tokens": self.usage["prompt_tokens"],
                "judge_completion_tokens": self.usage["completion_tokens"]}


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg)[:300]
    return str(getattr(e, "message", e))[:300]


def _choice_text(choice) -> str:
    message = getattr(choice, "message", None)
    if message is not None:
        return message.content or ""
    return getattr(choice, "text", None) or ""


def retry_after_s(value: str | None, cap: float) -> float:
    """A Retry-After header in seconds (0 if absent or an HTTP date), at most `cap`."""
    try:
        s = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return min(max(s, 0.0), cap) if not math.isnan(s) else 0.0


def top_logprobs_of(choice, url: str = "the endpoint", positions: int = 1) -> list[dict[str, float]]:
    """The top-k log-probs {token: logprob} at the first `positions` tokens of a choice, from
    either API's answer (chat: logprobs.content[i].top_logprobs; completions:
    logprobs.top_logprobs[i]); an answer without them is an EndpointError saying so."""
    lp = getattr(choice, "logprobs", None) if not isinstance(choice, dict) else choice.get("logprobs")
    tops = []
    if lp is not None:
        content = getattr(lp, "content", None) if not isinstance(lp, dict) else lp.get("content")
        if content:  # chat
            tops = [{t.token: t.logprob for t in (c.top_logprobs or [])} for c in content]
        else:
            raw = getattr(lp, "top_logprobs", None) if not isinstance(lp, dict) else lp.get("top_logprobs")
            tops = [dict(t) for t in (raw or []) if t is not None]
    if not tops or not tops[0]:
        raise EndpointError(f"{url} returned no log-probabilities (the answer's logprobs are "
                            f"{'missing' if lp is None else 'empty'}): for soft labels the endpoint must honour the "
                            "'logprobs' parameter (vLLM's server, serve-labeler); else set reward.openai.labels: text")
    return tops[:positions]


def read_labels(top: dict[str, float], groups: list[list[str]]) -> tuple[list[float], int]:
    """Label log-probs from one position's top-k: logsumexp over each label's spellings; a
    label absent from the top-k gets the smallest log-prob returned (an upper bound); both
    absent, or no top-k at all -> all -inf (label mass 0). Returns (log-probs, number of
    labels bounded)."""
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
    if body.get("best_of", 1) != 1:
        raise RequestError("'best_of' must be 1", param="best_of")
    if body.get("echo"):
        raise RequestError("'echo' is not supported", param="echo")
    out = {"prompts": prompts, **_sampling(body, {"logprobs": ((int, type(None)), None)})}
    if out["logprobs"] is not None and not 0 <= out["logprobs"] <= 20:
        raise RequestError(f"'logprobs' must be in 0..20, got {out['logprobs']}", param="logprobs")
    _check_sampling(out, limits)
    return out


MAX_N = 16  # answers per prompt one request may ask for (`n`: the judge's text mode samples several)


def _sampling(body: dict, more: dict) -> dict:
    """The sampling settings both APIs share, type-checked (a boolean is not a number)."""
    if body.get("stream"):
        raise RequestError("'stream' is not supported", param="stream")
    fields = {"max_tokens": (int, 16), "temperature": ((int, float), 1.0), "top_p": ((int, float), 1.0),
              "top_k": (int, 0), "seed": ((int, type(None)), None), "n": (int, 1), **more}
    out = {}
    for name, (kind, default) in fields.items():
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RequestError(f"'{name}' must be a number, got {value!r}", param=name)
        out[name] = value
    if not 1 <= out["n"] <= MAX_N:
        raise RequestError(f"'n' must be in 1..{MAX_N} (answers per prompt), got {out['n']}", param="n")
    return out


def _check_sampling(out: dict, limits: "EndpointLimits") -> None:
    if not 1 <= out["max_tokens"] <= limits.max_tokens:
        raise RequestError(f"'max_tokens' must be in 1..{limits.max_tokens} (serve.max_tokens_limit), got "
                           f"{out['max_tokens']}", code="max_tokens_limit", param="max_tokens")
    if not (math.isfinite(out["temperature"]) and math.isfinite(out["top_p"])) or out["temperature"] < 0 \
            or not 0 < out["top_p"] <= 1 or out["top_k"] < 0:
        raise RequestError("'temperature' must be >= 0, 'top_p' in (0, 1], 'top_k' >= 0")


def parse_chat_request(body, limits: "EndpointLimits") -> dict:
    """Validate a /v1/chat/completions body: `messages` (system, user, assistant texts) and the
    sampling settings; `logprobs: true` with `top_logprobs` (0..20) asks for log-probs.
    Returns them with `logprobs` as the number of top log-probs (None: not asked)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages)):
        raise RequestError("'messages' must be a non-empty list of {role: system|user|assistant, content: text}",
                           param="messages")
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    out = {"messages": messages, **_sampling(body, {"top_logprobs": (int, 0)})}
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise RequestError(f"'logprobs' must be true or false, got {want!r}", param="logprobs")
    if not 0 <= out["top_logprobs"] <= 20:
        raise RequestError(f"'top_logprobs' must be in 0..20, got {out['top_logprobs']}", param="top_logprobs")
    out["logprobs"] = out.pop("top_logprobs") if want else None
    _check_sampling(out, limits)
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


def chat_response(model: str, results: list[dict], want_logprobs: bool, prompt_tokens: int) -> dict:
    """OpenAI chat completions answer, one choice per result (as completion_response's)."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    choices = []
    for i, r in enumerate(results):
        lp = None
        if want_logprobs:
            tops = r["top_logprobs"] or [{}] * len(r["tokens"])
            lp = {"content": [{**entry(t, l), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                              for t, l, top in zip(r["tokens"], r["token_logprobs"], tops)]}
        choices.append({"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": lp,
                        "finish_reason": r["finish_reason"]})
    completion = sum(len(r["tokens"]) for r in results)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


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
