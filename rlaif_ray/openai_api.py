"""The OpenAI-compatible /v1/completions protocol, both sides, without Ray:

- `OpenAIEngine`, the `openai` labeler backend: a client for any completions endpoint that
  returns top log-probabilities (vLLM's server, a hosted API, or `rlaif-ray serve-labeler`).
  The key comes from an environment variable and never appears in messages or logs.
- `parse_request` / `completion_response`: what `serve-labeler` accepts and answers.

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

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
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

class RequestError(ValueError):
    """A bad request; the message names the field (answered with HTTP 400)."""


def parse_request(body, max_tokens_limit: int) -> dict:
    """Validate a /v1/completions body; returns prompts and sampling settings."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise RequestError("'n' and 'best_of' must be 1 (one completion per prompt)")
    if body.get("echo"):
        raise RequestError("'echo' is not supported")
    if body.get("stream"):
        raise RequestError("'stream' is not supported")
    fields = {"max_tokens": (int, 16), "temperature": ((int, float), 1.0), "top_p": ((int, float), 1.0),
              "top_k": (int, 0), "logprobs": ((int, type(None)), None), "seed": ((int, type(None)), None)}
    out = {"prompts": prompts}
    for name, (kind, default) in fields.items():
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RequestError(f"'{name}' must be a number, got {value!r}")
        out[name] = value
    if not 1 <= out["max_tokens"] <= max_tokens_limit:
        raise RequestError(f"'max_tokens' must be in 1..{max_tokens_limit}, got {out['max_tokens']}")
    if out["temperature"] < 0 or not 0 < out["top_p"] <= 1 or out["top_k"] < 0:
        raise RequestError("'temperature' must be >= 0, 'top_p' in (0, 1], 'top_k' >= 0")
    if out["logprobs"] is not None and not 0 <= out["logprobs"] <= 20:
        raise RequestError(f"'logprobs' must be in 0..20, got {out['logprobs']}")
    return out


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
