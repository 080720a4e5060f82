"""Rewards beyond an AI judge: your own Python function (reward.source python) and your own
reward server over HTTP (reward.source http); and the weighted sum of several sources
(reward.source sum), each part kept and logged. Batched: one call scores many responses.

A Python reward is a callable named "module:callable" (the module found on the Python path,
the run's working directory first) or "path/to/file.py:callable", called with keyword arguments

    fn(prompts=[...], responses=[...], references=[...], fields=[...]) -> [float, ...]

one entry per response: the prompt as the judge sees it, the response, the data's reference
(or None) and the row's other columns (a dict). It returns one finite number per response.

A reward server answers POST URL with the JSON body {"prompts", "responses", "references",
"fields"} (lists as above) with {"rewards": [float, ...]} in the same order (HTTP 200); 429
and 5xx are retried with backoff, honouring Retry-After.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class RewardError(ValueError):
    """A reward source that cannot be loaded or gave an unusable answer; the message names it."""


def load_function(spec: str, where: str = "reward.function") -> Callable:
    """The callable `module:callable` names (the working directory first on the path) or
    `path/to/file.py:callable` names (a path relative to the working directory)."""
    module, _, name = spec.rpartition(":")
    try:
        mod = _load_file(module, where) if module.endswith(".py") else _import(module)
    except RewardError:
        raise
    except ImportError as e:
        raise RewardError(f"{where}: cannot import module {module!r} ({e})") from None
    except SyntaxError as e:
        raise RewardError(f"{where}: {e.filename} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the module's own code failed at import
        raise RewardError(f"{where}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise RewardError(f"{where}: module {module!r} has no {name!r}")
    if not callable(fn):
        raise RewardError(f"{where}: {spec} is not callable")
    return fn


def _import(module: str):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module)


def _load_file(path: str, where: str):
    import importlib.util

    if not os.path.isfile(path):
        raise RewardError(f"{where}: no file {path!r} (relative paths are from {os.getcwd()})")
    name = "rlaif_reward_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # so pickled objects and dataclasses of the module resolve
    spec.loader.exec_module(mod)
    return mod


def check_rewards(values, n: int, who: str) -> list[float]:
    """One finite number per response, or a RewardError naming the source and the first bad one."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(f"{who} returned {type(values).__name__} {str(values)[:80]}, not a list of numbers") from None
    if len(out) != n:
        raise RewardError(f"{who} returned {len(out)} rewards for {n} responses")
    bad = next((i for i, v in enumerate(out) if not math.isfinite(v)), None)
    if bad is not None:
        raise RewardError(f"{who} returned {out[bad]} for response {bad}: every reward must be a finite number")
    return out


class PythonReward:
    def __init__(self, spec: str, where: str = "reward.function"):
        self.spec, self.fn = spec, load_function(spec, where)

    def __call__(self, prompts: list[str], responses: list[str], references: list, fields: list[dict]) -> list[float]:
        out = self.fn(prompts=prompts, responses=responses, references=references, fields=fields)
        return check_rewards(out, len(responses), f"reward function {self.spec}")


class HttpReward:
    """A reward server (module docstring), `batch_size` responses a request, up to
    `max_concurrency` requests at once; the key (a Bearer token) from `api_key_env`, never logged."""
    RETRY = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, url: str, api_key_env: str | None = None, timeout_s: float = 60.0, max_retries: int = 3,
                 batch_size: int = 32, max_concurrency: int = 4):
        import requests

        self.url, self.timeout, self.max_retries, self.batch_size = url, timeout_s, max_retries, batch_size
        self.session = requests.Session()
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="reward-http")
        self.requests = self.retries = 0

    def __call__(self, prompts: list[str], responses: list[str], references: list, fields: list[dict]) -> list[float]:
        cuts = range(0, len(responses), self.batch_size)
        bodies = [{"prompts": prompts[i:i + self.batch_size], "responses": responses[i:i + self.batch_size],
                   "references": references[i:i + self.batch_size], "fields": fields[i:i + self.batch_size]}
                  for i in cuts]
        return [r for part in self.pool.map(self._post, bodies) for r in part]

    def _post(self, body: dict) -> list[float]:
        import requests

        last = ""
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            if attempt:
                self.retries += 1
            try:
                r = self.session.post(self.url, json=body, timeout=self.timeout)
            except requests.RequestException as e:
                last, wait = f"cannot reach it ({type(e).__name__})", 0.5 * 2 ** attempt
            else:
                if r.status_code == 200:
                    return self._rewards(r, len(body["responses"]))
                if r.status_code not in self.RETRY:
                    raise RewardError(f"reward server {self.url} answered HTTP {r.status_code}: {r.text[:200]}")
                last = f"HTTP {r.status_code}"
                wait = _retry_after(r.headers.get("Retry-After")) or 0.5 * 2 ** attempt
            if attempt < self.max_retries:
                time.sleep(min(wait, self.timeout))
        raise RewardError(f"reward server {self.url} failed {self.max_retries + 1} time(s); last: {last}")

    def _rewards(self, r, n: int) -> list[float]:
        try:
            data = r.json()
        except ValueError:
            raise RewardError(f"reward server {self.url} answered HTTP 200 with a body that is not JSON: "
                              f"{r.text[:120]!r}") from None
        if not isinstance(data, dict) or "rewards" not in data:
            raise RewardError(f"reward server {self.url} answered without 'rewards' (expected {{\"rewards\": [...]}})")
        return check_rewards(data["rewards"], n, f"reward server {self.url}")


def _retry_after(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value else 0.0
    except ValueError:
        return 0.0


def row_fields(batch) -> list[dict]:
    """Each row's columns a rubric or a reward may name: its reference and its other columns
    (the `fields` JSON of a PROMPT / ROLLOUT batch)."""
    from rlaif_ray.data.schemas import load_fields

    refs = batch.column("reference").to_pylist()
    extra = batch.column("fields").to_pylist() if "fields" in batch.schema.names else [None] * len(refs)
    return [{**load_fields(f), "reference": r} for f, r in zip(extra, refs)]


def item_fields(items: list[dict]) -> list[dict]:
    """The same from prompt items (rlaif_ray.data.tasks PromptSet items)."""
    return [{**(it.get("fields") or {}), "reference": it.get("reference")} for it in items]


class RewardSources:
    """The reward sources of a reward section that are not the AI judge (a Python function, a
    reward server), built once per labeler actor, and the weighted sum of a `sum` section's
    parts."""

    def __init__(self, reward):
        self.reward, self.parts = reward, list(reward.parts) if reward.source == "sum" else []
        self._made: dict = {}
        for key in ({reward.source} & {"python", "http"}) | {self._key(p) for p in self.parts if p.source in ("python", "http")}:
            self._get(key)  # a bad module or function stops the actor at its start, not mid-run

    def _key(self, part) -> tuple:
        r = self.reward
        if part.source == "python":
            return ("python", part.function or r.function)
        return ("http", part.url or r.http.url)

    def _get(self, key) -> Callable:
        if isinstance(key, str):
            key = ("python", self.reward.function) if key == "python" else ("http", self.reward.http.url)
        if key not in self._made:
            h = self.reward.http
            self._made[key] = PythonReward(key[1]) if key[0] == "python" else \
                HttpReward(key[1], h.api_key_env, h.timeout_s, h.max_retries, h.batch_size, h.max_concurrency)
        return self._made[key]

    def call(self, source, contexts: list[str], responses: list[str], fields: list[dict]) -> list[float]:
        """`source`: python or http (the section's own), or a part of the sum."""
        key = source if isinstance(source, str) else self._key(source)
        return self._get(key)(contexts, responses, [f.get("reference") for f in fields],
                              [{k: v for k, v in f.items() if k != "reference"} for f in fields])

    def total(self, score_part) -> tuple[list[float], list[float], list[str], list[str]]:
        """The weighted sum of the parts: `score_part(part)` gives (rewards, JSON metadata) of
        one part. Returns (rewards, raw values, metadata, each row's parts as JSON); a row's
        label mass is its smallest part's, so an unusable judge label makes the row unusable."""
        import json

        from rlaif_ray.config import part_name

        totals = parts = masses = None
        for part in self.parts:
            rewards, metas = score_part(part)
            if totals is None:
                totals, parts, masses = [0.0] * len(rewards), [{} for _ in rewards], [1.0] * len(rewards)
            for i, (r, m) in enumerate(zip(rewards, metas)):
                totals[i] += part.weight * r
                parts[i][part_name(part)] = r
                masses[i] = min(masses[i], json.loads(m).get("label_mass", 1.0))
        metas = [json.dumps({"source": "sum", "parts": p, "label_mass": round(m, 4)}) for p, m in zip(parts, masses)]
        return totals, totals, metas, [json.dumps(p) for p in parts]

    def counters(self) -> dict:
        http = [c for c in self._made.values() if isinstance(c, HttpReward)]
        return {"reward_http_requests": sum(c.requests for c in http), "reward_http_retries": sum(c.retries for c in http)} \
            if http else {}
