"""The run folder: resolved config, metrics.jsonl, Parquet of every scored rollout,
checkpoints (safetensors) and a summary, every file written crash-safe (rlaif_ray.storage);
`checkpoints/latest` names a checkpoint only after its folder is complete. The run's trackers
(run.trackers, trackers.py) get its config, every metrics row and, at `close`, its summary and
files.

`check_resume` is everything `--resume` needs to hold before Ray starts (the folder, its
config, a complete checkpoint, readable records); a problem is a `RunStateError` (a
ConfigError: the CLI prints one `error:` line, exit 2).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlaif_ray.config import Config, ConfigError, dump_config
from rlaif_ray.data.schemas import JUDGEMENTS
from rlaif_ray.remote_folder import StorageFolder, as_location, is_uri, join
from rlaif_ray.run.trackers import Trackers, default_mlflow_uri
from rlaif_ray.storage import (
    RunStateError,
    append_line,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    remove_partials,
)

CHECKPOINT_RE = re.compile(r"step_(\d{6,})")
# what the trackers get as artifacts at the end, those that exist: the record and the report
TRACKED_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "winrate.jsonl", "report.html", "plots")




# ---- checkpoints ---------------------------------------------------------------------------------

STATE_KEYS = ("step", "policy_version", "next_batch_index", "sampler", "optimizer_meta")


def _safetensors_problem(folder: StorageFolder, name: str, size: int) -> str | None:
    """A safetensors file's size must be its header's: 8 + header length + the last tensor's end."""
    try:
        with folder.open(name) as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{name} is truncated ({size} bytes, its header alone is {n})"
            header = json.loads(fh.read(n).decode("utf-8"))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{name} is damaged ({str(err)[:80]})"
    if size != 8 + n + end:
        return f"{name} is truncated or damaged ({size} bytes, expected {8 + n + end})"
    return None


def read_checkpoint_state(ck: str | Path) -> tuple[dict | None, str | None]:
    """(trainer_state.json, None) for a complete checkpoint folder (a path or a URI), else
    (None, what is wrong): the state parses and has every key, its step is the folder's, every
    file it lists has its recorded size, the weights and optimizer files (or a sharded
    learner's dcp/ with its .metadata) are there and whole."""
    folder = StorageFolder(ck)
    if not folder.is_dir():
        return None, "does not exist"
    sizes = folder.files()  # a sharded checkpoint's DCP files are in dcp/
    if "trainer_state.json" not in sizes:
        return None, "has no trainer_state.json (incomplete)"
    try:
        state = json.loads(folder.read_bytes("trainer_state.json").decode("utf-8"))
    except ValueError as err:
        return None, f"has a damaged trainer_state.json ({str(err)[:80]})"
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        return None, f"has a trainer_state.json without {', '.join(k for k in STATE_KEYS if k not in (state or {}))}"
    m = CHECKPOINT_RE.fullmatch(str(ck).rstrip("/").rsplit("/", 1)[-1])
    if m and state["step"] != int(m.group(1)):
        return None, f"has the trainer_state.json of step {state['step']}"
    for name, size in (state.get("files") or {}).items():
        if sizes.get(name) != size:
            return None, f"has {name} {'missing' if name not in sizes else 'of the wrong size'} (incomplete)"
    # the weights: full (model.safetensors, or an index of shards), or a LoRA adapter (model.lora: adapter/)
    weights = "model.safetensors" in sizes or "model.safetensors.index.json" in sizes or \
        "adapter/adapter_model.safetensors" in sizes
    if "dcp/.metadata" not in sizes and (not weights or "optimizer.safetensors" not in sizes):
        return None, "has no model.safetensors or optimizer.safetensors (incomplete)"
    for name in sorted(n for n in sizes if n.endswith(".safetensors") and ("/" not in n or n.startswith("adapter/"))):
        problem = _safetensors_problem(folder, name, sizes[name])
        if problem:
            return None, f"has {problem}"
    return state, None


def _at(run, *parts: str):
    """run/parts: a Path for a local run, a URI string for one on shared storage."""
    return as_location(join(run, *parts))


def resume_checkpoint(run: str | Path) -> tuple[Path, dict, list[str]]:
    """(checkpoint folder, its trainer state, notes) to resume `run` from: the one
    checkpoints/latest names when it is complete; else (latest missing, empty, garbled, or
    naming a missing or incomplete checkpoint) the newest complete checkpoint, with a note
    saying so; none complete: RunStateError."""
    run = run if is_uri(run) else Path(run)
    ckdir, store = _at(run, "checkpoints"), StorageFolder(_at(run, "checkpoints"))
    listing = store.files(recursive=False) if store.is_dir() else {}
    if "latest" not in listing:
        problem = "is missing"
    else:
        try:
            text = store.read_bytes("latest").decode("ascii").strip()
        except UnicodeDecodeError:
            text = None
        if not text:
            problem = "is empty" if text == "" else "is garbled"
        elif not CHECKPOINT_RE.fullmatch(text):
            problem = f"is garbled ({text[:40]!r})"
        else:
            state, why = read_checkpoint_state(_at(run, "checkpoints", text))
            if state is not None:
                return _at(run, "checkpoints", text), state, []
            problem = f"names {text}, which {why}"
    found = sorted((d for d in (store.entries() if store.is_dir() else [])
                    if CHECKPOINT_RE.fullmatch(d) and store.is_dir(d)), key=lambda d: int(d[5:]), reverse=True)
    for d in found:
        state, _ = read_checkpoint_state(_at(run, "checkpoints", d))
        if state is not None:
            return _at(run, "checkpoints", d), state, [
                f"checkpoints/latest {problem}: resuming from {d}, the newest complete checkpoint"]
    if problem == "is missing" and not found:
        raise RunStateError(f"--resume {run}: no checkpoint in that run folder (it stopped before its first "
                            "checkpoint, see run.checkpoint_every): start it again with --out NEW_DIR or --overwrite")
    raise RunStateError(f"--resume {run}: checkpoints/latest {problem}, and no complete checkpoint is left in "
                        f"{ckdir}: start the run again with --out NEW_DIR or --overwrite")


def _config_diff(saved: str, now: str) -> list[str]:
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    try:
        a, b = flat(yaml.safe_load(saved)), flat(yaml.safe_load(now))
    except (yaml.YAMLError, AttributeError):
        return []
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_resume(run: str | Path, cfg: Config) -> tuple[Path, dict, list[str]]:
    """Everything `--resume RUN` needs, checked before Ray starts: the folder, its config
    (the same as `cfg`), a complete checkpoint (see resume_checkpoint), metrics.jsonl and
    winrate.jsonl readable (a torn last line is only reported), summary_start.json readable.
    A run on shared storage (a URI) is checked through this node's copy of its records (`pull`,
    without the checkpoints' weights, which stay where they are); its checkpoint where it is.
    Returns (checkpoint, trainer state, notes to print)."""
    location, run = run, Path(run)
    if is_uri(location):
        run = _pull_records(location)
    elif not run.is_dir():
        raise RunStateError(f"--resume {run}: no such run folder")
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise RunStateError(f"--resume {run}: no config.yaml, not a run folder of `rlaif-ray train`")
    saved, now = cfg_file.read_bytes().decode("utf-8", errors="replace"), dump_config(cfg)
    if saved != now:
        diff = _config_diff(saved, now)
        raise RunStateError(f"--resume {run}: the config differs from the run's config.yaml"
                            + (f" ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})" if diff else "")
                            + f"; resume with the run's own config (rlaif-ray train {cfg_file} --resume {run})")
    ck, state, notes = resume_checkpoint(location)
    for name in ("metrics.jsonl", "winrate.jsonl"):
        if (run / name).is_file():
            rows = read_jsonl(run / name, ("step",), notes.append)
            if name == "metrics.jsonl" and rows and max(r["step"] for r in rows) < state["step"]:
                notes.append(f"{run / name}: ends at step {max(r['step'] for r in rows)}, before the checkpoint's "
                             f"step {state['step']} (lines were lost); the record continues from there")
    start = run / "summary_start.json"
    if start.is_file():
        try:
            json.loads(start.read_bytes().decode("utf-8"))
        except ValueError as err:
            raise RunStateError(f"--resume {run}: summary_start.json is damaged ({str(err)[:80]}); delete it to "
                                "resume without the before-training measurements") from None
    return ck, state, notes


def _pull_records(uri: str) -> Path:
    """This node's fresh copy of a URI run folder's records (everything but checkpoints/)."""
    store = StorageFolder(uri)
    if not store.is_dir():
        raise RunStateError(f"--resume {uri}: no such run folder")
    shutil.rmtree(store.local, ignore_errors=True)  # the storage is the truth, not what a dead driver left here
    store.pull(skip=("checkpoints",))
    return store.local


def default_run_dir(cfg: Config, kind: str = "") -> Path | str:
    """run.out_dir/run.name[-kind]-TIMESTAMP (a URI when run.out_dir is one)."""
    name = f"{cfg.run.name}{'-' + kind if kind else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    return join(cfg.run.out_dir, name) if is_uri(cfg.run.out_dir) else Path(cfg.run.out_dir) / name


# ---- the run folder ----------------------------------------------------------------------------

class RunFolder:
    """A new run folder (refused when it exists and is not empty: preflight says so first), or
    with resume=True an existing one checked by `check_resume` (`notes` says what it found:
    a torn last line, a fallback checkpoint)."""

    def __init__(self, cfg: Config, path: str | Path | None = None, resume: bool = False):
        self.location = path if path is not None else default_run_dir(cfg)
        # a URI run is written to this node's staging copy, each file then uploaded (`_push`)
        self.store = StorageFolder(self.location) if is_uri(self.location) else None
        self.path = self.store.local if self.store else Path(self.location)
        self.notes: list[str] = []
        if resume:
            self._resume = check_resume(self.location, cfg)
            self.notes = list(self._resume[2])
            self._start_trackers(cfg, resume=True)
            return
        if self.store is not None and self.store.files():
            raise RunStateError(f"{self.location} exists and is not empty (a run is never overwritten): "
                                "choose another --out")
        if self.store is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise RunStateError(f"{self.path} exists and is not empty (a run is never overwritten): "
                                "choose another --out, or --overwrite")
        (self.path / "rollouts").mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))
        self._push("config.yaml")
        self._start_trackers(cfg, resume=False)

    def _start_trackers(self, cfg: Config, resume: bool) -> None:
        """Open run.trackers (a resumed run: the same tracked runs, by RUN/trackers.json) and
        send a new run's resolved config. A tracker that cannot start stops here, before Ray;
        a new run folder it leaves is removed, so that the same command can simply run again."""
        self.trackers = Trackers(cfg.run.trackers, self.path, cfg.run.tracker_project,
                                 self.read_json("trackers.json") if resume else {},
                                 lambda state: self.write_json("trackers.json", state),
                                 default_mlflow_uri(self.path, self.store is not None))
        try:
            self.trackers.open()
            if not resume:
                self.trackers.log_config(cfg.model_dump(mode="json"))
        except ConfigError:
            if not resume:
                shutil.rmtree(self.path, ignore_errors=True)
                if self.store is not None:
                    for name in self.store.files():
                        self.store.delete(name)
            raise

    def _push(self, rel: str = "", skip: tuple[str, ...] = ()) -> None:
        """Upload what was just written here to the run's URI (nothing for a local run)."""
        if self.store is not None:
            self.store.push(rel, skip=skip)

    def latest_checkpoint(self) -> tuple[str, dict]:
        """The checkpoint to resume from (checked when this folder was opened with resume) and
        its trainer state without the optimizer's part."""
        ck, state, _ = self._resume if hasattr(self, "_resume") else resume_checkpoint(self.path)
        state = {k: v for k, v in state.items() if k not in ("optimizer_meta", "files")}
        return str(ck), state

    def truncate_after(self, step: int) -> None:
        """Forget what a dead driver recorded after the checkpointed step, so the resumed
        record continues without a gap or a repeat (TensorBoard too: purge_step); a torn last
        line goes too (reported in `notes`), and the temp files a crash left. The trackers
        learn the last step the dead driver recorded (see Trackers.resume_after)."""
        seen = {}
        for name, group in (("metrics.jsonl", "train"), ("winrate.jsonl", "eval")):
            path = self.path / name
            if path.is_file():
                rows = read_jsonl(path, ("step",), self._note)
                seen[group] = max((r["step"] for r in rows), default=0)
                keep = [r for r in rows if r["step"] <= step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
                self._push(name)
        self.trackers.resume_after(step, seen)
        if self.store is not None:  # the same on the storage: records and checkpoints after `step` go
            for folder in ("rollouts", "eval", "checkpoints"):
                for name in self.store.entries(folder):
                    m = re.fullmatch(r"step_(\d+)(\.parquet)?", name)
                    if m and int(m.group(1)) > step:
                        self.store.delete(f"{folder}/{name}")
        for folder in (self.path, self.path / "rollouts", self.path / "eval", self.path / "checkpoints"):
            remove_partials(folder)
        for f in [*(self.path / "rollouts").glob("step_*.parquet"), *(self.path / "eval").glob("step_*.parquet")]:
            if int(f.stem.split("_")[1]) > step:
                f.unlink()
        for d in (self.path / "checkpoints").glob("step_*"):
            if CHECKPOINT_RE.fullmatch(d.name) and int(d.name[5:]) > step:
                shutil.rmtree(d)

    def _note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)

    def read_json(self, name: str) -> dict:
        p = self.path / name
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_bytes().decode("utf-8"))
        except ValueError as err:
            raise RunStateError(f"{p} is damaged ({str(err)[:80]})") from None

    def log_metrics(self, row: dict) -> None:
        append_line(self.path / "metrics.jsonl", row)
        self._push("metrics.jsonl")  # an object store has no append: the (small) file again
        self._scalars("train", row, row["step"])

    def log_winrate(self, row: dict) -> None:
        """Held-out win rate against the initial policy, one line per evaluation."""
        append_line(self.path / "winrate.jsonl", row)
        self._push("winrate.jsonl")
        self._scalars("eval", row, row["step"])

    def log_judgements(self, rows: list[dict], step: int) -> None:
        (self.path / "eval").mkdir(exist_ok=True)
        with atomic_path(self.path / "eval" / f"step_{step:06d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), tmp)
        self._push(f"eval/step_{step:06d}.parquet")

    def _scalars(self, prefix: str, row: dict, step: int) -> None:
        """A row's flat numbers to the trackers, as PREFIX/NAME at `step`."""
        values = {f"{prefix}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.trackers.log_metrics(step, values, prefix)

    def close(self, ok: bool = True) -> None:
        """Send the trackers summary.json and the run's files (TRACKED_FILES) and close them
        (`ok`: the run finished, else it is marked failed); then upload every file written here
        that is not yet on the run's URI (the report, plots, TensorBoard events; checkpoints are
        the learner's)."""
        try:
            summary = self.read_json("summary.json")
        except RunStateError:
            summary = {}
        if summary:
            self.trackers.log_summary(summary)
        self.trackers.log_artifacts([self.path / n for n in TRACKED_FILES if (self.path / n).exists()])
        self.trackers.close(ok)
        self._push(skip=("checkpoints",))

    def log_rollouts(self, batch: pa.RecordBatch, step: int) -> None:
        table = pa.Table.from_batches([batch])
        logp_sum = pa.array([float(sum(x)) for x in batch.column("behaviour_logprobs").to_pylist()], pa.float32())
        table = table.append_column("behaviour_logprob_sum", logp_sum)
        table = table.append_column("step_trained", pa.array([step] * batch.num_rows, pa.int64()))
        with atomic_path(self.path / "rollouts" / f"step_{step:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self._push(f"rollouts/step_{step:06d}.parquet")

    def checkpoint_dir(self, step: int) -> Path | str:
        """Where step's checkpoint goes (a URI for a run on shared storage: learner rank 0
        uploads it from its own node); the learner writes it whole (PolicyLearner.save), then
        `mark_checkpoint` points `latest` at it."""
        return _at(self.location, "checkpoints", f"step_{step:06d}")

    def mark_checkpoint(self, step: int) -> None:
        ck = self.checkpoint_dir(step)
        # never point `latest` at a checkpoint that is not whole (a local run's learner on
        # another node without a shared file system writes where the driver cannot look: not
        # checked; `rlaif-ray check --cluster` refuses that layout)
        problem = read_checkpoint_state(ck)[1] if self.store is not None or Path(ck).exists() else None
        if problem:
            raise RunStateError(f"checkpoint {ck} {problem}; checkpoints/latest still names the previous one")
        atomic_write_text(self.path / "checkpoints" / "latest", f"step_{step:06d}\n")
        self._push("checkpoints/latest")

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_json(self.path / name, data)
        self._push(name)


def read_rollouts(run_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(run_dir) / "rollouts")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's rows (a torn last line, from a crash while it was written, is left out)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
