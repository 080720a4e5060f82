"""The preflight's checks of the reward section, before Ray or any model starts: every rubric
readable and naming only fields the data has, every Python reward importable, every endpoint
(the judge's, a reward server) reachable with a cheap request. One ConfigError each, naming
the setting, the file and the field."""
from __future__ import annotations

from urllib.parse import urlparse

from rlaif_ray.config import RESPONSE_FIELDS, Config, ConfigError, check_rubric_fields, judge_sources, template_fields

# the fields every rubric may name whatever the data: the prompt as the judge sees it, the
# responses, the reference (None where the data has none)
ALWAYS = {"prompt", "reference"} | {f for fs in RESPONSE_FIELDS.values() for f in fs}


def check_reward(cfg: Config, command: str, columns: set[str] | None, source: str = "the task's data") -> None:
    """`columns`: the data's columns a rubric may name (None: not known for this command)."""
    from rlaif_ray.rubrics import rubric_text

    r = cfg.reward
    for name, rubric in r.rubrics.items():
        try:
            text = rubric_text(name, rubric)
            check_rubric_fields(rubric.kind, text, f"reward.rubrics.{name}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        unknown = [f for f in template_fields(text) if f not in ALWAYS and (columns is None or f not in columns)]
        if unknown:
            have = f"its columns are {', '.join(sorted(columns)) or 'none'}" if columns is not None else \
                "this command's data has only the prompt, the responses and the reference"
            raise ConfigError(f"reward.rubrics.{name} uses {{{unknown[0]}}}, which {source} has no column of; {have}")
    _check_functions(cfg)
    judging = command in ("eval", "label", "eval-labeler", "serve-labeler") or \
        (command == "train" and (judge_sources(r) or cfg.eval.win_rate or cfg.eval.signal_posts))
    if r.backend == "openai" and judging:
        probe_endpoint(r.openai)
        if r.openai.api == "completions" and _chat_scorers(cfg):
            _check_tokenizer(r.openai)
    if command == "train":
        for url in _http_urls(cfg):
            probe_http(url)


def _chat_scorers(cfg: Config) -> list[str]:
    """The judge questions a run may ask an endpoint that are chat prompts (reward.scorer, the
    harmless scorer, a pairwise rubric)."""
    from rlaif_ray.rubrics import SCORERS

    r = cfg.reward
    names = {r.scorer, cfg.eval.harmless_scorer}
    chat = [n for n in names if (r.rubrics[n].chat if n in r.rubrics else SCORERS[n].chat)]
    return chat + ([r.pairwise.rubric] if r.pairwise.rubric and r.rubrics[r.pairwise.rubric].chat else [])


def _check_tokenizer(o) -> None:
    from rlaif_ray.engines.models import load_tokenizer

    name = o.tokenizer or o.model
    try:
        load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - not found, offline, not a tokenizer
        raise ConfigError(f"reward.openai.tokenizer: a chat scorer on the completions API is rendered with the judge's "
                          f"chat template, and {name!r} does not load here ({type(e).__name__}); set "
                          "reward.openai.tokenizer to a local tokenizer, or reward.openai.api: chat") from None


def _check_functions(cfg: Config) -> None:
    from rlaif_ray.feedback.rewards import RewardError, load_function

    r = cfg.reward
    specs = [("reward.function", r.function)] if r.source == "python" else []
    specs += [(f"reward.parts[{i}].function", p.function or r.function) for i, p in enumerate(r.parts)
              if r.source == "sum" and p.source == "python"]
    for where, spec in specs:
        try:
            load_function(spec, where)
        except RewardError as e:
            raise ConfigError(str(e)) from None


def _http_urls(cfg: Config) -> list[str]:
    r = cfg.reward
    urls = [r.http.url] if r.source == "http" else []
    return urls + [p.url or r.http.url for p in r.parts if r.source == "sum" and p.source == "http"]


def probe_endpoint(o) -> None:
    """A cheap request to the judge endpoint (GET /v1/models): unreachable, or refusing the
    key, or not serving reward.openai.model, is one ConfigError before any actor starts."""
    import os

    import openai

    client = openai.OpenAI(base_url=o.base_url, api_key=os.environ.get(o.api_key_env) or "none",
                           timeout=min(o.timeout_s, 15.0), max_retries=0)
    try:
        served = [m.id for m in client.models.list().data]
    except openai.APIConnectionError as e:
        raise ConfigError(f"reward.openai.base_url: cannot reach {o.base_url} ({type(e.__cause__ or e).__name__}); "
                          "start the endpoint first, or fix the URL") from None
    except openai.APIStatusError as e:
        if e.status_code in (401, 403):
            raise ConfigError(f"reward.openai: {o.base_url} refused the key in ${o.api_key_env} "
                              f"(HTTP {e.status_code}; reward.openai.api_key_env)") from None
        if e.status_code != 404:  # no /models on this server: reachable is all it shows
            raise ConfigError(f"reward.openai.base_url: {o.base_url}/models answered HTTP {e.status_code}") from None
        served = []
    if served and o.model not in served:
        raise ConfigError(f"reward.openai.model: {o.base_url} does not serve {o.model!r}; it serves "
                          f"{', '.join(served[:5])}{' ...' if len(served) > 5 else ''}")


def probe_http(url: str) -> None:
    """A reward server must at least accept a connection (its own schema is checked on use)."""
    import socket

    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"reward.http.url: {url!r} is not an http(s) URL")
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"reward.http.url: cannot reach {url} ({e.strerror or type(e).__name__}); "
                          "start the reward server first, or fix the URL") from None
