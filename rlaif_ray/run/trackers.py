"""Experiment trackers (`run.trackers`): a run's per-step metrics, its resolved config, its
summary (with the reward-hacking verdict) and its report sent to TensorBoard, Weights & Biases
and MLflow. One interface (`Tracker`: log_metrics, log_config, log_summary, log_artifacts,
close), one class per tool, and `Trackers`, the list a RunFolder holds.

The run folder stays the record: a tracker is a view of it. So a tracker that fails during a
run is one warning and gets nothing more (metrics.jsonl has every step); only a tracker that
cannot start stops the run, before Ray starts. wandb and mlflow are optional packages (the
extras of the same names), imported only when asked for; `missing_package` is what preflight
checks. Their settings come from the environment as the tools read it (WANDB_PROJECT,
WANDB_MODE, WANDB_API_KEY, WANDB_DIR; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), with
run.tracker_project naming the project / experiment. The ids a resumed run continues are kept
in RUN/trackers.json.
"""
from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Protocol

from rlaif_ray.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_PROJECT = "rlaif-ray"
# summary.json's per-prompt details, examples and process ids: not results, and hundreds of keys
SUMMARY_SKIP = frozenset({"rewards", "responses", "examples", "heldout_examples", "processes", "run_dir"})


def missing_package(name: str) -> str | None:
    """The pip command that installs tracker `name`'s package (its module has the tracker's
    name; tensorboard's is imported through torch.utils.tensorboard) when it is missing, else None."""
    if importlib.util.find_spec(name) is not None:
        return None
    return f"pip install 'rlaif-ray[{name}]' (or pip install {'mlflow-skinny' if name == 'mlflow' else name})"


def flatten(d: dict, prefix: str = "", skip: frozenset = frozenset()) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; keys in `skip` are left out at any depth."""
    out: dict = {}
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}.", skip))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_values(summary: dict) -> dict[str, float | bool]:
    """summary.json's results as flat numbers and booleans (`heldout_change.mean`,
    `hacking.hacking`, `win_rate.win_rate`, ...): lists, text and per-prompt details left out."""
    return {k: v for k, v in flatten(summary, skip=SUMMARY_SKIP).items()
            if isinstance(v, (bool, int, float)) and v == v}


def verdict(summary: dict) -> tuple[bool, str] | None:
    """(reward hacking suspected, why) from summary.json; None when the run measured none."""
    v = summary.get("hacking")
    return (bool(v.get("hacking")), str(v.get("reason", ""))) if isinstance(v, dict) else None


class Tracker(Protocol):
    name: str
    # True: after a resume it drops what it held past the checkpoint and is sent those steps again;
    # False: it cannot drop points, so the steps it already holds are not sent twice
    rewrites: bool
    state: dict  # what a resumed run needs to continue the same tracked run (RUN/trackers.json)

    def open(self) -> None: ...
    def resume_after(self, step: int) -> None: ...
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_summary(self, summary: dict) -> None: ...
    def log_artifacts(self, files: list[Path]) -> None: ...
    def close(self, ok: bool = True) -> None: ...


class TensorBoardTracker:
    """Event files in RUN/tensorboard, opened at the first metric (a resumed run's purge step
    is known only then). Optional like the others, but the default: without the package the
    run notes it once and goes on. Config, summary and report are already beside the events."""
    name, rewrites = "tensorboard", True

    def __init__(self, folder: Path):
        self.folder, self.state = folder, {}
        self._writer, self._wanted, self._purge = None, True, None

    def open(self) -> None:
        pass

    def resume_after(self, step: int) -> None:
        self._purge = step + 1  # TensorBoard hides what the dead driver wrote after the checkpoint

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None and self._wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=self._purge)
            except ImportError:
                self._wanted = False
                print("note: tensorboard is not installed (pip install tensorboard); metrics.jsonl only")
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def log_config(self, config: dict) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def log_artifacts(self, files: list[Path]) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """A W&B run named after the run folder, in RUN/wandb unless WANDB_DIR says otherwise.
    Its id is kept, so --resume continues the same run (resume="allow"); the W&B step is the
    training step. The config as the run's config, summary values and the verdict (a
    `reward-hacking-suspected` tag) in its summary, the run's files as one artifact."""
    name, rewrites = "wandb", False

    def __init__(self, folder: Path, run_name: str, project: str | None, state: dict):
        self.folder, self.run_name, self.project, self.state = folder, run_name, project, dict(state)
        self._run = None

    def open(self) -> None:
        import wandb

        self.state.setdefault("id", uuid.uuid4().hex[:12])  # letters and digits: a valid W&B run id
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.folder)}
        self._run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                               name=self.run_name, id=self.state["id"], resume="allow", **where)
        self.state["project"] = self._run.project

    def resume_after(self, step: int) -> None:
        pass

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def log_config(self, config: dict) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log_summary(self, summary: dict) -> None:
        self._run.summary.update(summary_values(summary))
        v = verdict(summary)
        if v:
            self._run.summary["hacking.reason"] = v[1]
            if v[0]:
                self._run.tags = (*self._run.tags, "reward-hacking-suspected")

    def log_artifacts(self, files: list[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"run-{self.state['id']}", type="run-record")
        for f in files:
            if f.is_dir():
                artifact.add_dir(str(f), name=f.name)
            else:
                artifact.add_file(str(f))
        self._run.log_artifact(artifact)

    def close(self, ok: bool = True) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)
            self._run = None


class MLflowTracker:
    """An MLflow run named after the run folder, at MLFLOW_TRACKING_URI, else in `default_uri`
    (a local file store: see `default_mlflow_uri`). The config as params (flat `rl.lr`), the
    summary values as metrics, the verdict as tags (`hacking`, `hacking_reason`), the run's
    files as artifacts. --resume reopens the same run (its id and store in trackers.json)."""
    name, rewrites = "mlflow", False

    def __init__(self, run_name: str, project: str | None, state: dict, default_uri: str):
        self.run_name, self.project, self.state, self.default_uri = run_name, project, dict(state), default_uri
        self._client = None

    def open(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.state.get("tracking_uri") or self.default_uri
        if uri.startswith("file:") and not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 refuses its file store unless opted in; it is the one local store mlflow-skinny has
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        if self.state.get("run_id") and self.state.get("tracking_uri") == uri:
            self._client.update_run(self.state["run_id"], status="RUNNING")
            return
        name = self.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        run = self._client.create_run(self._experiment(name), run_name=self.run_name)
        self.state = {"tracking_uri": uri, "run_id": run.info.run_id}

    def _experiment(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another run created it meanwhile
            return self._client.get_experiment_by_name(name).experiment_id

    def resume_after(self, step: int) -> None:
        pass

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._client.log_batch(self.state["run_id"], metrics=metrics)

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()]
        self._client.log_batch(self.state["run_id"], params=params)  # the client sends 100 at a time

    def log_summary(self, summary: dict) -> None:
        self.log_metrics(0, summary_values(summary))
        v = verdict(summary)
        if v:
            from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

            self._client.set_tag(self.state["run_id"], "hacking", "suspected" if v[0] else "not suspected")
            self._client.set_tag(self.state["run_id"], "hacking_reason", v[1][:MAX_TAG_VAL_LENGTH])

    def log_artifacts(self, files: list[Path]) -> None:
        for f in files:
            if f.is_dir():
                self._client.log_artifacts(self.state["run_id"], str(f), artifact_path=f.name)
            else:
                self._client.log_artifact(self.state["run_id"], str(f))

    def close(self, ok: bool = True) -> None:
        if self._client is not None:
            self._client.set_terminated(self.state["run_id"], "FINISHED" if ok else "FAILED")
            self._client = None


def default_mlflow_uri(run_folder: Path, on_shared_storage: bool) -> str:
    """Without MLFLOW_TRACKING_URI: a file store `mlruns` beside the run folder (in run.out_dir,
    so the runs there are compared in one `mlflow ui`); a run on shared storage keeps its own in
    the run folder, which is uploaded with it."""
    base = run_folder if on_shared_storage else run_folder.resolve().parent
    return (base / "mlruns").resolve().as_uri()


class Trackers:
    """The run's trackers as one: each call goes to every tracker that still works. `save`
    writes their state (run ids) to RUN/trackers.json when they open."""

    def __init__(self, names: list[str], folder: Path, project: str | None, state: dict,
                 save: Callable[[dict], None], mlflow_uri: str):
        make = {"tensorboard": lambda: TensorBoardTracker(folder),
                "wandb": lambda: WandbTracker(folder, folder.name, project, state.get("wandb", {})),
                "mlflow": lambda: MLflowTracker(folder.name, project, state.get("mlflow", {}), mlflow_uri)}
        self.live: list[Tracker] = [make[n]() for n in names]
        self._save, self._seen = save, {}

    def open(self) -> None:
        """Start each tracker; one that cannot (no API key, an unreachable server) is a
        ConfigError naming it: the run stops before Ray starts, not hours later."""
        for t in self.live:
            try:
                t.open()
            except Exception as err:  # noqa: BLE001 - whatever the tool raises, said in one line
                self.close(ok=False)
                raise ConfigError(f"run.trackers: {t.name} did not start ({type(err).__name__}: {err})") from None
        if any(t.state for t in self.live):
            self._save({t.name: t.state for t in self.live if t.state})

    def resume_after(self, step: int, seen: dict[str, int]) -> None:
        """A resumed run continues after checkpoint `step`; `seen` is the last step per group
        (train, eval) the dead driver recorded, so sent to the trackers that keep what they hold."""
        self._seen = dict(seen)
        self._each(lambda t: t.resume_after(step))

    def log_metrics(self, step: int, values: dict[str, float], group: str) -> None:
        """`values` keyed GROUP/NAME; a tracker that cannot drop points gets no step twice."""
        fresh = step > self._seen.get(group, 0)
        self._each(lambda t: t.log_metrics(step, values) if fresh or t.rewrites else None)

    def log_config(self, config: dict) -> None:
        self._each(lambda t: t.log_config(config))

    def log_summary(self, summary: dict) -> None:
        self._each(lambda t: t.log_summary(summary))

    def log_artifacts(self, files: list[Path]) -> None:
        self._each(lambda t: t.log_artifacts(files))

    def close(self, ok: bool = True) -> None:
        self._each(lambda t: t.close(ok))
        self.live = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for t in list(self.live):
            try:
                call(t)
            except Exception as err:  # noqa: BLE001 - a tracker is a view of the run folder: its failure ends no run
                self.live.remove(t)
                print(f"warning: the {t.name} tracker failed ({type(err).__name__}: {str(err)[:200]}); it gets "
                      "nothing more from this run (the run folder has everything)")
