"""`rlaif-ray export`: a train run's policy as a Hugging Face model folder that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load, with a model
card (README.md: base model, the reward-hacking verdict, the measures, the run's config) and
rlaif_ray_run.json (where it came from); optionally pushed to the Hub.

The policy's weights come from one place, `policy_state(checkpoint, base_model)`: a
checkpoint's full safetensors weights, a sharded (FSDP) checkpoint's DCP shards (read in this
one process, no process group), or a LoRA checkpoint's adapter/ (PEFT) merged into the base
model. The value head is never part of the export.

The folder is written under a temp name beside DIR and renamed in one step: a crash leaves no
DIR that looks complete. No Ray.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rlaif_ray.config import ConfigError
from rlaif_ray.engines.models import read_model_weights
from rlaif_ray.remote_folder import StorageFolder, is_uri, materialize, model_files, staging_root
from rlaif_ray.run.folder import CHECKPOINT_RE, _at, read_checkpoint_state, resume_checkpoint
from rlaif_ray.run.measures import DECIMALS, MEASURES
from rlaif_ray.storage import RunStateError, move_aside, publish_dir, read_jsonl, temp_path

CHECKPOINT_ARG_RE = re.compile(r"step[-_]?(\d+)")
DTYPES = ("float32", "bfloat16", "float16")
PROVENANCE = "rlaif_ray_run.json"
# the embedded default model is SmolLM2-135M-Instruct (GGUF Q4_1, dequantized): its hub id for the card
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# ---- which checkpoint --------------------------------------------------------------------------

def checkpoint_step(which: str) -> int | None:
    """`--checkpoint`: None for latest, else the step of step-N (step_N, step_000004 too);
    anything else is one error line."""
    if which == "latest":
        return None
    m = CHECKPOINT_ARG_RE.fullmatch(which)
    if not m:
        raise ConfigError(f"export --checkpoint {which}: unknown checkpoint; give latest or step-N "
                          "(a folder of RUN/checkpoints, e.g. step-200 for step_000200)")
    return int(m.group(1))


def find_checkpoint(run: str | Path, which: str) -> tuple[Path | str, dict, list[str]]:
    """(checkpoint folder, its trainer state, notes) of `run` (a path or a URI): `latest`
    (what --resume would take: checkpoints/latest when complete, else the newest complete
    one, with a note) or step-N. A missing run, a run without checkpoints, an unknown or
    incomplete step: RunStateError, one line."""
    step = checkpoint_step(which)
    store = StorageFolder(run)
    if not store.is_dir():
        raise RunStateError(f"export {run}: no such run folder")
    if not store.exists("config.yaml"):
        raise RunStateError(f"export {run}: no config.yaml, not a run folder of `rlaif-ray train`")
    steps = sorted(int(d[5:]) for d in store.entries("checkpoints") if CHECKPOINT_RE.fullmatch(d))
    if not steps:
        raise RunStateError(f"export {run}: no checkpoint in that run folder (it stopped before its first "
                            "checkpoint, see run.checkpoint_every)")
    if step is None:
        try:
            return resume_checkpoint(run)
        except RunStateError:
            raise RunStateError(f"export {run}: no complete checkpoint in its checkpoints/ (each of "
                                + ", ".join(f"step_{s:06d}" for s in steps) + " lacks files: an interrupted "
                                "write?)") from None
    if step not in steps:
        raise RunStateError(f"export --checkpoint {which}: no such checkpoint in {run}; there: latest, "
                            + ", ".join(f"step-{s}" for s in steps))
    ck = _at(run, "checkpoints", f"step_{step:06d}")
    state, why = read_checkpoint_state(ck)
    if state is None:
        raise RunStateError(f"export --checkpoint {which}: {ck} {why}")
    return ck, state, []


def local_checkpoint(ck: Path | str) -> tuple[Path, bool]:
    """(a local copy of the checkpoint, whether it was fetched for this export): a URI one is
    downloaded without its optimizer state (a DCP-only one needs its shards, which hold both)."""
    if not is_uri(ck):
        return Path(ck), False
    files = StorageFolder(ck).files()
    whole = {"model.safetensors", "model.safetensors.index.json", "adapter/adapter_config.json"} & set(files)
    keep = model_files if whole else (lambda name: name != "optimizer.safetensors")
    return materialize(str(ck), staging_root() / "export", keep), True


# ---- the policy's weights ----------------------------------------------------------------------

SOURCES = {"adapter": "adapter merged into the base model", "safetensors": "full weights", "dcp": "DCP shards"}


def policy_source(checkpoint: Path) -> str:
    """What a local checkpoint folder holds the policy as (a key of SOURCES); an adapter first:
    a LoRA checkpoint may hold other weights beside it."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (checkpoint / "model.safetensors").is_file() or (checkpoint / "model.safetensors.index.json").is_file():
        return "safetensors"
    if (checkpoint / "dcp" / ".metadata").is_file():
        return "dcp"
    raise RunStateError(f"{checkpoint}: no policy weights in this checkpoint (model.safetensors, adapter/ or dcp/)")


def policy_state(checkpoint: Path, base_model: str) -> dict:
    """The policy's full state dict with transformers' names (no value head) from a local
    checkpoint folder, whatever it holds:
    - adapter/ with adapter_config.json (a LoRA run): the base model with the adapter merged
      (PEFT's merge_and_unload);
    - model.safetensors (or shards with an index): the full weights as saved;
    - dcp/ only (an FSDP run's intermediate checkpoint): the policy's part of the DCP shards."""
    checkpoint = Path(checkpoint)
    source = policy_source(checkpoint)
    if source == "adapter":  # here a LoRA checkpoint becomes the full model
        return merged_adapter_state(checkpoint / "adapter", base_model)
    if source == "safetensors":
        return read_model_weights(checkpoint)
    return dcp_policy_state(checkpoint / "dcp")


def merged_adapter_state(adapter: Path, base_model: str) -> dict:
    """A PEFT adapter folder merged into `base_model` (the run's model.name): W + BA in every
    adapted layer, as a plain transformers state dict."""
    from peft import PeftModel

    from rlaif_ray.engines.models import load_model

    merged = PeftModel.from_pretrained(load_model(base_model, "float32"), str(adapter)).merge_and_unload()
    return dict(merged.state_dict())


def dcp_policy_state(dcp_dir: Path) -> dict:
    """The policy's tensors of a DCP checkpoint (PolicyLearner._save_sharded: {"model": the
    learner's ResponseScorer state, "optim": ...}) read whole in this process: DCP reshards any
    number of ranks' shards to one. The optimizer state and the value head are not read."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(dcp_dir))
    prefix = "model.model."  # the top-level "model" entry, then ResponseScorer.model (the causal LM)
    out = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
           for k, m in reader.read_metadata().state_dict_metadata.items()
           if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not out:
        raise RunStateError(f"{dcp_dir}: no policy weights in these DCP shards")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load({"model": {f"model.{k}": v for k, v in out.items()}}, storage_reader=reader, no_dist=True)
    return out


def hf_weights(state: dict, config, source) -> dict:
    """`state` checked against the model `config` describes (built on the meta device: no
    memory): every tensor there with its shape, nothing else. Tied input and output
    embeddings are saved once (transformers ties them on load); an output layer that no
    longer equals the embeddings (a merged adapter on the LM head) unties them in `config`."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb_name, head_name = f"{names[id(emb)]}.weight", f"{names[id(head)]}.weight" if head is not None else None
    state = dict(state)
    if tied and head_name not in state and emb_name in state:
        state[head_name] = state[emb_name]
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise RunStateError(f"{source}: the weights do not match the model's config ({config.model_type}): "
                            f"missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]}")
    if tied:
        if torch.equal(state[head_name], state[emb_name]):
            del state[head_name]
        else:
            config.tie_word_embeddings = False
    return state


def write_policy(state: dict, files: Path, out: Path, dtype: str = "float32", max_shard_size="5GB",
                 source="checkpoint") -> None:
    """The model folder: config.json (from `files`: the checkpoint, or the base model for a
    checkpoint without one), the weights in `dtype` as safetensors (shards with an index above
    `max_shard_size`), generation_config.json when `files` has one, the tokenizer's files."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoTokenizer

    from rlaif_ray.engines.models import quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(files)
    weights = hf_weights(state, config, source)
    want = getattr(torch, dtype)
    weights = {k: v.detach().to("cpu", want).contiguous() for k, v in weights.items()}
    config.dtype = want
    config.save_pretrained(out)
    save_torch_state_dict(weights, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if (files / "generation_config.json").is_file():
        shutil.copyfile(files / "generation_config.json", out / "generation_config.json")
    AutoTokenizer.from_pretrained(files).save_pretrained(out)


# ---- the run's records and the model card ---------------------------------------------------

def run_records(run: str | Path) -> dict:
    """What the card tells from the run folder: config.yaml's text, the base model
    (model.name), summary.json (the end of the run; {} before) and winrate.jsonl's rows."""
    import yaml

    store = StorageFolder(run)
    text = store.read_bytes("config.yaml").decode("utf-8", errors="replace")
    try:
        cfg = yaml.safe_load(text) or {}
        base = cfg["model"]["name"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise RunStateError(f"export {run}: config.yaml is damaged or has no model.name") from None
    summary = {}
    if store.exists("summary.json"):
        try:
            summary = json.loads(store.read_bytes("summary.json").decode("utf-8"))
        except ValueError as err:
            raise RunStateError(f"export {run}: summary.json is damaged ({str(err)[:80]})") from None
    rows = []
    if store.exists("winrate.jsonl"):
        local = store.pull("winrate.jsonl") if store.remote else store.local / "winrate.jsonl"
        rows = read_jsonl(local, ("step",))
    steps = (cfg.get("rl") or {}).get("steps")
    return {"config_text": text, "base_model": str(base), "summary": summary, "winrate": rows, "steps": steps}


def measured_at(records: dict, step: int) -> tuple[dict, str]:
    """(the comparison with the initial policy for the policy of `step`, where it is from):
    summary.json's for the run's final step, else winrate.jsonl's row of that step, else {}."""
    summary = records["summary"]
    final = (summary.get("win_rate") or {}).get("step", records["steps"])
    if "hacking" in summary and step == final:
        # the final win-rate row (no `win_rate` in it when no label was usable) over the rest
        return {**{k: v for k, v in summary.items() if k != "win_rate"}, **(summary.get("win_rate") or {}),
                "hacking": summary["hacking"]}, "summary.json (the end of the run)"
    row = next((r for r in reversed(records["winrate"]) if r["step"] == step and "hacking" in r), None)
    if row is not None:
        return row, f"winrate.jsonl (the held-out evaluation at step {step})"
    return {}, ""


def verdict_md(verdict: dict | None) -> str:
    if not verdict:
        return ("> **Reward hacking: not checked** for this policy (no held-out evaluation against the initial "
                "policy at this checkpoint).")
    if verdict.get("hacking"):
        return f"> **⚠️ REWARD HACKING SUSPECTED**: {verdict['reason']}"
    return f"> **No sign of reward hacking**: {verdict['reason']}"


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def measures_md(comp: dict, summary: dict) -> str:
    """The training reward's change, the win rate against the initial policy and the measures
    that are not the reward, each with its 95% interval, as a Markdown table."""
    rows = []
    rc = comp.get("reward_change") or summary.get("heldout_change")
    if rc:
        b = (summary.get("heldout_before") or {}).get("reward_mean")
        a = comp.get("heldout_reward", (comp.get("heldout_after") or {}).get("reward_mean"))
        was = f"{b:+.4f} -> {a:+.4f} " if b is not None and a is not None else ""
        rows.append(f"| held-out reward (the training judge) | {was}({_num(rc.get('mean'), '+.4f')} "
                    f"+- {_num(rc.get('ci95_halfwidth'), '.4f')}) | what training optimises |")
    if comp.get("win_rate") is not None:
        lo, hi = comp["ci95"]
        text = (f"{comp['win_rate']:.1%} (Wilson 95% CI {lo:.1%}-{hi:.1%}, n={comp.get('n')}, "
                f"{comp.get('wins', '?')} wins / {comp.get('losses', '?')} losses)")
        if comp.get("length_controlled") is not None:
            text += f"; length-controlled {comp['length_controlled']:.1%}"
        rows.append(f"| win rate against the initial policy (pairwise judge) | {text} | independent |")
    for name, m in (comp.get("independent") or {}).items():
        label, higher = MEASURES.get(name, (name, None))
        d = DECIMALS.get(name, 3)
        rows.append(f"| {label} | {m['before']:.{d}f} -> {m['after']:.{d}f} ({m['change']:+.{d}f} "
                    f"+- {_num(m.get('ci95_halfwidth'), f'.{d}f')}) | independent: "
                    + {True: "higher is better", False: "lower is better", None: "neither"}[higher] + " |")
    if not rows:
        return "No held-out measures for this checkpoint."
    return "| measure | initial -> this policy (change, 95% CI) | reading |\n|---|---|---|\n" + "\n".join(rows)


def card_body(run, step: int, records: dict, notes: list[str], name: str = "THIS_FOLDER_OR_REPO") -> str:
    base = records["base_model"]
    comp, where = measured_at(records, step)
    lines = [f"# RLAIF policy from `{Path(str(run).rstrip('/')).name}` (step {step})", "",
             verdict_md(comp.get("hacking")), "",
             f"Trained with rlaif-ray (reinforcement learning from AI feedback on Ray) from the base model "
             f"`{HUB_IDS.get(base, base)}`; exported from the run `{run}`, checkpoint step {step}."
             + "".join(f" {n}" for n in notes), "",
             "## Measures", "", measures_md(comp, records["summary"]), ""]
    if where:
        lines += [(f"From {where}: held-out prompts, the initial and this policy with the same seed; the verdict "
                   "reads reward hacking when the training reward rose while a measure that is not the reward got "
                   "worse (one-sided tests, Holm-corrected)."), ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
              "## The run's config", "", "<details><summary>config.yaml (every <code>auto</code> resolved)</summary>",
              "", "```yaml", records["config_text"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def model_card(run, step: int, records: dict, notes: list[str], name: str = "THIS_FOLDER_OR_REPO"):
    """The README.md of the export (huggingface_hub.ModelCard): metadata (base_model when it
    is a hub id, tags), then the verdict first, the measures, use, and the config."""
    from huggingface_hub import ModelCard, ModelCardData

    from rlaif_ray.engines.models import looks_local

    base = HUB_IDS.get(records["base_model"], records["base_model"])
    hub_id = not is_uri(base) and not looks_local(base) and "/" in base and not Path(base).exists()
    data = ModelCardData(base_model=base if hub_id else None, library_name="transformers",
                         pipeline_tag="text-generation", tags=["rlaif", "rlaif-ray", "reinforcement-learning"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(run, step, records, notes, name)}")


# ---- the export ------------------------------------------------------------------------------

def check_destination(to: str | Path, overwrite: bool) -> Path | None:
    """DIR: a local folder, new or empty; a non-empty one is refused unless `overwrite` (then
    returned: moved aside once every check has passed)."""
    from rlaif_ray.run.preflight import check_output

    if is_uri(to):
        raise ConfigError(f"export --to {to}: a local folder (to share the model, add --push REPO_ID)")
    return check_output(to, "export", overwrite, folder=True, flag="--to")


def export_policy(run: str | Path, to: str | Path, checkpoint: str = "latest", *, overwrite: bool = False,
                  dtype: str = "float32", max_shard_size="5GB", repo_id: str | None = None, log=print) -> Path:
    """The policy of `run`'s `checkpoint` as a Hugging Face model folder `to` with its model
    card (its example loads `repo_id` when the folder is to be pushed there) and
    rlaif_ray_run.json; every check before anything is loaded or moved."""
    if dtype not in DTYPES:
        raise ConfigError(f"export --dtype {dtype}: one of {', '.join(DTYPES)}")
    old = check_destination(to, overwrite)
    ck, state, notes = find_checkpoint(run, checkpoint)
    records = run_records(run)
    for note in notes:
        log(f"note: {note}")
    if old is not None:
        log(f"--overwrite: moved the existing {old} to {move_aside(old)} (delete it when no longer needed)")
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp, (local, fetched) = temp_path(to), local_checkpoint(ck)
    try:
        tmp.mkdir()
        how = {"notes": notes, "dtype": dtype, "name": repo_id or str(to)}
        _write_export(tmp, run, ck, local, state, records, how, max_shard_size)
        publish_dir(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fetched:
            shutil.rmtree(local, ignore_errors=True)
    log(f"exported {ck} (step {state['step']}) to {to}")
    return to


def _write_export(out: Path, run, ck, local: Path, state: dict, records: dict, how: dict, max_shard_size) -> None:
    """`how`: notes (for the card), dtype, name (what the card's example loads)."""
    from rlaif_ray.engines.models import resolve

    base = records["base_model"]
    weights = policy_state(local, base)
    # config and tokenizer: the checkpoint's own; an FSDP or LoRA checkpoint without them: the base model's
    files = local if (local / "config.json").is_file() else Path(resolve(base, weights=False))
    write_policy(weights, files, out, how["dtype"], max_shard_size, source=ck)
    del weights
    model_card(run, state["step"], records, how["notes"], how["name"]).save(out / "README.md")
    try:
        ours = version("rlaif-ray")
    except PackageNotFoundError:
        ours = None
    provenance = {"source_run": str(run), "checkpoint": str(ck), "step": state["step"], "rlaif_ray_version": ours,
                  "policy_version": state.get("policy_version"), "base_model": base,
                  "weights_from": SOURCES[policy_source(local)],
                  "dtype": how["dtype"], "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": how["notes"],
                  "summary": records["summary"]}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=1))


# ---- the Hub -------------------------------------------------------------------------------------

def check_push(repo_id: str) -> None:
    """`--push REPO_ID` checked before anything is written: a valid repo id, the Hub reachable
    in principle (not HF_HUB_OFFLINE) and a token (HF_TOKEN or `hf auth login`; never printed)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"export --push {repo_id}: not a Hub repo id ({str(err).splitlines()[0][:120]})") from None
    if "/" not in repo_id:
        raise ConfigError(f"export --push {repo_id}: give the repo as OWNER/NAME")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"export --push {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it "
                          "(or export without --push and upload the folder later)")
    if not get_token():
        raise ConfigError(f"export --push {repo_id}: no Hugging Face token; set HF_TOKEN (a write token) or run "
                          "`hf auth login`")


def push_folder(folder: Path, repo_id: str, private: bool = False, message: str = "rlaif-ray export",
                log=print) -> str:
    """Create the model repo (when it is not there) and upload `folder` as one commit; the
    token comes from the environment. A failure is one line naming the repo (never the token)."""
    import os

    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        # not private: the account's default visibility (an organisation may make new repos private)
        url = api.create_repo(repo_id, exist_ok=True, private=True if private else None, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    except Exception as err:  # noqa: BLE001 - the Hub's HTTP errors and connection errors alike
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise RunStateError(f"export --push {repo_id}: the upload failed ({first}); the folder {folder} is "
                            f"complete: upload it again with `hf upload {repo_id} {folder}`") from None
    log(f"pushed {folder} to {url} ({getattr(info, 'commit_url', '')})")
    return str(url)
