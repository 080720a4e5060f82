"""Every check that needs files, models or the command being run, in one place, before Ray
or any actor starts (rules on the config alone are pydantic validators in config.py).

`preflight(cfg, command, out=...)` re-validates the config (a config edited in code after
loading is checked again), checks the output (never overwritten: see `check_output`) or the
run folder to resume (`runlog.check_resume`), then what that command needs, and returns what
it loaded on the way (`train`: the task's prompts; `eval`: the two policies; `eval-labeler`:
the user's pair files, read and checked whole). `train` also logs a warning when the
pipeline's torch threads oversubscribe the cores (layout.thread_warnings; a slower run, not
a wrong one, so not an error). With `overwrite=True` an existing output is moved aside to
OUT.replaced-TIMESTAMP, the last thing it does, once every check has passed (nothing is
deleted)."""
from __future__ import annotations

from pathlib import Path

from rlaif_ray.config import Config, ConfigError, config_from_dict
from rlaif_ray.cpu.threads import thread_warnings
from rlaif_ray.data.files import DataError
from rlaif_ray.data.tasks import BUNDLED, task_prompts
from rlaif_ray.engines.models import is_checkpoint, load_tokenizer, model_context, model_path_problem
from rlaif_ray.feedback.pairs import load_exemplars, looks_like_file, read_pair_file
from rlaif_ray.remote_folder import StorageFolder, is_uri
from rlaif_ray.run.folder import check_resume
from rlaif_ray.run.reward_checks import check_reward
from rlaif_ray.run.trackers import missing_package
from rlaif_ray.storage import move_aside

COMMANDS = ("train", "eval", "sft", "train-rm", "sample-pairs", "label", "eval-labeler", "serve-labeler", "signal",
            "run")
# the output is one file (eval-labeler's --out; its --report is a folder); every other command's is a folder
FILE_OUTPUTS = ("sample-pairs", "eval-labeler")


def preflight(cfg: Config, command: str, out: str | Path | None = None, *, overwrite: bool = False,
              resume: str | Path | None = None, log=print, report: str | Path | None = None,
              pair_data: list[str] | None = None, shots: int = 0):
    """`report` (eval-labeler): the report folder, checked like `out` (a folder);
    `pair_data` (eval-labeler --data): bundled names and pair files, each file read and
    checked whole (returned as {entry: PairFile}) with `shots` exemplars taken from its end."""
    if command not in COMMANDS:
        raise ValueError(f"preflight: unknown command {command!r}")
    config_from_dict(cfg.model_dump(), "(as given)")  # validators again: raises ConfigError naming the field
    if resume is not None:
        if overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces one: give one of them")
        if out is not None and (str(out).rstrip("/") != str(resume).rstrip("/") if is_uri(out) or is_uri(resume)
                                else Path(out).resolve() != Path(resume).resolve()):
            raise ConfigError(f"--resume {resume} writes into that run folder: drop --out {out}")
        check_resume(resume, cfg)  # the folder, its config, a complete checkpoint, readable records
        out = None
    replace = [check_output(out, command, overwrite) if out is not None else None,
               check_output(report, command, overwrite, folder=True, flag="--report") if report is not None else None]
    result = _checks(cfg, command)
    if command == "eval-labeler":
        result = pair_sources(pair_data or [], shots)
    if command == "train":
        for line in thread_warnings(cfg) + rl_warnings(cfg):
            log(f"warning: {line}")
    for old in replace:  # every check passed: only now is an old output moved aside
        if old is not None:
            log(f"--overwrite: moved the existing {old} to {move_aside(old)} (delete it when no longer needed)")
    return result


def pair_sources(entries: list[str], shots: int = 0) -> dict:
    """eval-labeler --data: each entry a bundled pair set or a file of human-labelled pairs
    (pair_data.read_pair_file: a missing file, an unknown format or a row missing a field
    stops here, naming the file, row and field); {entry: PairFile} for the files."""
    out = {}
    for entry in entries:
        if entry in BUNDLED:
            continue
        if not looks_like_file(entry):
            raise ConfigError(f"eval-labeler --data: unknown pair set {entry!r}; known: {', '.join(sorted(BUNDLED))}, "
                              "or a JSONL/Parquet file of human-labelled pairs (a path: .jsonl, .jsonl.gz, .parquet)")
        if not Path(entry).is_file():
            raise ConfigError(f"eval-labeler --data {entry}: no such file")
        pf = read_pair_file(entry)
        if len(pf.rows) <= shots:
            raise DataError(f"{entry}: {len(pf.rows)} usable pairs; a {shots}-shot prompt variant takes its exemplars "
                            "from the last usable rows and needs at least one more to evaluate")
        out[entry] = pf
    return out


# the adaptive controller's horizon should span about 10 batches or more; fewer than 8 is warned
# (the quickstart's 64 completions are 8 of its batches, measured in BENCHMARKS.md)
KL_HORIZON_STEPS = 8


def rl_warnings(cfg: Config) -> list[str]:
    """Settings that run but steer badly (not errors): an adaptive KL horizon of fewer than
    8 batches moves beta by more than 2.5% a step on one batch's noisy KL."""
    rl = cfg.rl
    n = rl.prompts_per_step * rl.samples_per_prompt
    if rl.kl_control == "adaptive" and rl.kl_horizon < KL_HORIZON_STEPS * n:
        return [f"rl.kl_horizon={rl.kl_horizon} spans {rl.kl_horizon / n:.3g} batches of {n} completions: beta moves "
                f"up to {20 * n / rl.kl_horizon:.3g}% a step on one batch's KL; {KL_HORIZON_STEPS * n} or more "
                f"({KL_HORIZON_STEPS} batches) steers on an average (TRL's default is 10000)"]
    return []


def check_output(out: str | Path, command: str, overwrite: bool = False, folder: bool | None = None,
                 flag: str = "--out") -> Path | None:
    """A run is never overwritten: an existing non-empty output folder (or an existing output
    file) is refused, unless `overwrite`, in which case it is returned (preflight moves it
    aside once every other check has passed). An empty folder is used as it is. `folder`:
    whether this output is a folder (default: every command's but FILE_OUTPUTS'); `flag`:
    the option that names it, in the message. An output on shared storage (a URI) is refused
    when it holds anything, --overwrite or not (an object store cannot move it aside)."""
    if is_uri(out):
        if StorageFolder(out).files():
            raise ConfigError(f"{command}: output {out} exists and is not empty (outputs are never overwritten, and "
                              f"one on shared storage cannot be moved aside): choose another {flag}"
                              + (f", or --resume {out} to continue it" if command == "train" else ""))
        return None
    out = Path(out)
    is_file_output = command in FILE_OUTPUTS if folder is None else not folder
    if not (out.exists() or out.is_symlink()):
        return None
    if not is_file_output and out.is_dir() and not any(out.iterdir()):
        return None
    if overwrite:
        return out
    kind = ("is a folder, not a file" if out.is_dir() else "exists") if is_file_output else (
        "exists and is not empty" if out.is_dir() else "exists and is a file, not a folder")
    hint = f", --resume {out} to continue it," if command == "train" and (out / "checkpoints").is_dir() else ""
    raise ConfigError(f"{command}: output {out} {kind} (outputs are never overwritten): choose another {flag}"
                      f"{hint} or pass --overwrite to move the old one aside to {out.name}.replaced-TIMESTAMP")


def check_model_paths(cfg: Config, command: str) -> None:
    """Every model the command loads that is named by a local path is a model folder: a
    missing one stops here, naming its field, before anything loads (a hub id is left to
    transformers). eval's policies are `_policy`'s."""
    labeler = ("reward.model", cfg.reward.model) if cfg.reward.model else ("model.name", cfg.model.name)
    policy = ("model.name", cfg.model.name)
    fields = {"train": [policy, labeler], "run": [policy, labeler], "sft": [policy],
              "train-rm": [("rm.init", cfg.rm.init) if cfg.rm.init else policy],
              "sample-pairs": [("sample_pairs.policy", cfg.sample_pairs.policy) if cfg.sample_pairs.policy else policy],
              }.get(command, [labeler])
    if cfg.eval.judge_model and command in ("train", "run", "eval"):
        fields.append(("eval.judge_model", cfg.eval.judge_model))
    for field, name in fields:
        problem = model_path_problem(name)
        if problem:
            raise ConfigError(f"{field}: {problem}")


def check_trackers(cfg: Config) -> None:
    """Every tracker in run.trackers is installed, but tensorboard (the default: without it a
    run notes it once and writes metrics.jsonl alone, as it always has)."""
    for name in cfg.run.trackers:
        install = missing_package(name) if name != "tensorboard" else None
        if install:
            raise ConfigError(f"run.trackers: {name} is not installed: {install}, or remove it from run.trackers")


def check_lora_targets(cfg: Config) -> None:
    """model.lora.target_modules against the policy's module names, from its config built on
    the meta device (no weights read): a name no module has stops here, naming it."""
    if cfg.model.lora is None or cfg.model.lora.target_modules == "all-linear":
        return
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif_ray.engines.adapters import target_problem
    from rlaif_ray.engines.models import model_config, quiet_transformers

    quiet_transformers()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(cfg.model.name))
    problem = target_problem((n for n, _ in model.named_modules()), cfg.model.lora.target_modules)
    if problem:
        raise ConfigError(f"model.lora.target_modules: {problem}")


def _checks(cfg: Config, command: str):
    check_model_paths(cfg, command)
    if command in ("train", "run"):
        check_trackers(cfg)
        check_lora_targets(cfg)
    if command == "run" and cfg.model.lora is not None:
        raise ConfigError("model.lora: `rlaif-ray run` evaluates the trained checkpoint as full weights, and a LoRA "
                          "checkpoint holds the adapter alone: run `rlaif-ray train`, then `rlaif-ray export RUN --to "
                          "DIR` and `rlaif-ray eval` on DIR")
    if cfg.reward.pairwise.shots and command in ("train", "eval", "label", "serve-labeler"):
        load_exemplars(cfg.reward.pairwise.exemplars_path, cfg.reward.pairwise.shots)  # a bad file stops here
    if command == "train":
        prompts = _train(cfg)
        check_reward(cfg, command, data_columns(prompts.train + prompts.heldout), _source(cfg))
        return prompts
    if command == "eval":
        policies = _policy(cfg.eval.policy_a, cfg), _policy(cfg.eval.policy_b, cfg)
        prompts = task_prompts(cfg.task, load_tokenizer(cfg.model.name)) if cfg.eval.prompts == "heldout" else None
        check_reward(cfg, command, data_columns(prompts.heldout) if prompts else set(), _source(cfg))
        return policies
    if command in ("label", "eval-labeler", "serve-labeler"):
        check_reward(cfg, command, None)
    if command == "train-rm" and cfg.rm.labels:
        _label_output(cfg.rm.labels)
    return None


def _label_output(labels: str) -> None:
    """rm.labels as a folder: every Parquet file whole, and a `label` output (its LABELS
    columns) finished (its _summary.json is written last): a partial one stops here with the
    fix, not as an ArrowInvalid traceback from inside train-rm."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(labels)
    if not folder.is_dir():
        return
    fix = (f"rerun `rlaif-ray label CONFIG --output NEW_FOLDER` (or --output {folder} --overwrite) "
           "and point rm.labels at its output")
    files = sorted(f for f in folder.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in f.relative_to(folder).parts))
    if not files:
        raise ConfigError(f"rm.labels: {folder} holds no Parquet files; {fix}")
    from_label = False
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"rm.labels: {folder} is a partial or damaged label output ({f.name}: "
                              f"{str(err).splitlines()[0][:100]}); {fix}") from None
        from_label = from_label or "prompt_config" in names
    if from_label and not (folder / "_summary.json").is_file():
        raise ConfigError(f"rm.labels: {folder} is an unfinished `label` output (no _summary.json: that label "
                          f"run stopped before its end); {fix}")


def data_columns(items: list[dict]) -> set[str]:
    """The columns of a task's rows that rubrics and rewards may name (each prompt's `fields`)."""
    return {k for it in items for k in (it.get("fields") or {})}


def _source(cfg: Config) -> str:
    return cfg.task.data_path or f"the bundled {cfg.task.name} data"


def _train(cfg: Config):
    context = model_context(cfg.model.name)
    if cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens > context:
        raise ConfigError(f"task.max_prompt_tokens={cfg.task.max_prompt_tokens} + generation.max_new_tokens="
                          f"{cfg.generation.max_new_tokens} exceeds the model's context of {context} tokens")
    if cfg.reward.source == "rm" and not is_checkpoint(cfg.reward.rm_path):
        raise ConfigError(f"reward.rm_path={cfg.reward.rm_path}: no model.safetensors (train one with `rlaif-ray train-rm`)")
    prompts = task_prompts(cfg.task, load_tokenizer(cfg.model.name))
    if cfg.rl.prompts_per_step > len(prompts.train):
        raise ConfigError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} exceeds the {len(prompts.train)} train prompts")
    return prompts


def _policy(name: str | None, cfg: Config) -> str:
    """A checkpoint folder (what `train` writes) or a model name; a path that is not a
    checkpoint stops here, before any actor starts."""
    name = name or cfg.model.name
    if is_uri(name):
        if not is_checkpoint(name):
            raise ConfigError(f"eval policy {name}: not a checkpoint folder (no model.safetensors)")
        return name
    p = Path(name)
    if p.is_dir() and not is_checkpoint(p) and (p / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"eval policy {name}: a LoRA checkpoint (adapter/ alone, model.lora): merge it into full "
                          f"weights first (`rlaif-ray export RUN --to DIR`) and evaluate DIR")
    if p.is_dir() and not is_checkpoint(p):
        raise ConfigError(f"eval policy {name}: not a checkpoint folder (no model.safetensors)")
    if not p.exists() and (p.is_absolute() or name.startswith((".", "~"))):
        raise ConfigError(f"eval policy {name}: no such checkpoint folder")
    return name

