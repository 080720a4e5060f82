"""Experiment trackers (run.trackers) with the real libraries and no network: W&B offline
(read back from the run's .wandb transaction log), MLflow on a local file store (read back
with MlflowClient), TensorBoard's event files; a run folder driven directly (new, resumed
after a failure, a tracker failing) and one short real `train` on the tiny model."""
import json
import struct
import time
from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError, config_from_dict, dump_config
from rlaif_ray.run.folder import RunFolder, read_metrics

ALL = ["tensorboard", "wandb", "mlflow"]
VERDICT = {"hacking": True, "reason": "training reward rose while rougeL got worse", "worse": ["rougeL"]}
SUMMARY = {"run_dir": "x", "heldout_change": {"mean": 0.25, "ci95_halfwidth": 0.1},
           "heldout_before": {"reward_mean": 0.5, "rewards": {"p1": 0.5}, "responses": {"p1": "text"}},
           "win_rate": {"win_rate": 0.75, "ci95": [0.5, 0.9]}, "hacking": VERDICT, "processes": {"learner-0": 7}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B offline into the run folder, MLflow's default store; nothing from the caller's environment."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # also restores MLFLOW_ALLOW_FILE_STORE, which the tracker sets


def _cfg(tmp_path, trackers=ALL, **run):
    return config_from_dict({"run": {"out_dir": str(tmp_path), "trackers": trackers, "report": False, **run}})


# ---- reading back what the tools recorded --------------------------------------------------------

def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (RUN/wandb/offline-run-*/run-ID.wandb): LevelDB's
    log format (32 KiB blocks of CRC, length, type-framed chunks) after a 7-byte W&B header;
    wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            out.append(pb.Record.FromString(chunk))
            chunk = b""
    return out


def wandb_runs(run_dir: Path, wait_s: float = 30.0) -> list[list]:
    """Every offline W&B run written in RUN/wandb, oldest first, as its records. W&B's service
    process writes the log; under load its last records can reach the disk a moment after
    `finish` returns, so the read is repeated (up to `wait_s`) until every log holds its run
    record (seen missing once, in a full suite run at load ~4)."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = [wandb_records(f) for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
        complete = all(wandb_of(r, "run") for r in runs)
        if complete or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(records) -> dict[int, dict]:
    return {r.history.step.num: {_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i)[0] == "_"}
            for r in records if r.WhichOneof("record_type") == "history"}


def wandb_summary(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out


def wandb_of(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key))


def tensorboard_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(key)]  # float32: 6 digits


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


# ---- a run folder, driven directly -------------------------------------------------------------

def _steps(run: RunFolder, steps, scale: float = 0.1, evals=()) -> None:
    for step in steps:
        run.log_metrics({"step": step, "policy_version": step, "reward_mean": scale * step, "loss": -step,
                         "ok": True, "note": "not a number"})
        if step in evals:
            run.log_winrate({"step": step, "win_rate": 0.5 + step / 100, "ci95": [0.1, 0.9]})


def _finish(run: RunFolder) -> None:
    run.write_json("summary.json", SUMMARY)
    (run.path / "report.html").write_text("<html>report</html>")
    (run.path / "plots").mkdir()
    (run.path / "plots" / "reward.png").write_bytes(b"\x89PNG")
    run.close()


def test_a_run_folder_sends_metrics_config_summary_and_files_to_every_tracker(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunFolder(cfg, tmp_path / "run")
    _steps(run, (1, 2, 3), evals=(2,))
    _finish(run)
    path = run.path
    state = json.loads((path / "trackers.json").read_text())
    assert set(state) == {"wandb", "mlflow"}
    # MLflow: a file store beside the run folder, the run named after it
    client, mr = mlflow_run(path)
    rid = mr.info.run_id
    assert state["mlflow"]["tracking_uri"] == (tmp_path / "mlruns").as_uri() and mr.info.run_name == "run"
    assert mlflow_series(client, rid, "train/reward_mean") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert mlflow_series(client, rid, "eval/win_rate") == [(2, 0.52)]
    assert not {"train/ok", "train/note", "train/step", "eval/ci95"} & set(mr.data.metrics)
    assert mr.data.params["rl.lr"] == str(cfg.rl.lr) and mr.data.params["run.trackers"] == str(ALL)
    assert mr.data.metrics["heldout_change.mean"] == 0.25 and mr.data.metrics["win_rate.win_rate"] == 0.75
    assert mr.data.metrics["hacking.hacking"] == 1.0 and "heldout_before.rewards.p1" not in mr.data.metrics
    assert mr.data.tags["hacking"] == "suspected" and mr.data.tags["hacking_reason"] == VERDICT["reason"]
    assert mr.info.status == "FINISHED"
    assert _artifacts(client, rid) == {"config.yaml", "summary.json", "metrics.jsonl", "winrate.jsonl",
                                       "report.html", "plots"}
    assert _artifacts(client, rid, "plots") == {"plots/reward.png"}
    # W&B: one offline run in RUN/wandb, its step the training step
    (records,) = wandb_runs(path)
    (info,) = {(r.run_id, r.project, r.display_name) for r in wandb_of(records, "run")}
    assert info == (state["wandb"]["id"], "rlaif-ray", "run")
    history = wandb_history(records)
    assert sorted(history) == [1, 2, 3] and history[1] == {"train/policy_version": 1, "train/reward_mean": 0.1,
                                                           "train/loss": -1}
    assert history[2]["eval/win_rate"] == 0.52 and history[3]["train/reward_mean"] == pytest.approx(0.3)
    config = {_key(i): json.loads(i.value_json) for r in wandb_of(records, "config") for i in r.update}
    config.update({_key(i): json.loads(i.value_json) for r in wandb_of(records, "run") for i in r.config.update})
    assert config["rl"]["lr"] == cfg.rl.lr and config["run"]["trackers"] == ALL
    summary = wandb_summary(records)
    assert summary["heldout_change.mean"] == 0.25 and summary["hacking.hacking"] is True
    assert summary["hacking.reason"] == VERDICT["reason"] and "heldout_before.rewards.p1" not in summary
    assert "reward-hacking-suspected" in wandb_of(records, "run")[-1].tags
    (artifact,) = wandb_of(records, "artifact")
    assert artifact.type == "run-record" and {e.path for e in artifact.manifest.contents} == {
        "config.yaml", "summary.json", "metrics.jsonl", "winrate.jsonl", "report.html", "plots/reward.png"}
    assert [e.exit_code for e in wandb_of(records, "exit")] == [0]
    # TensorBoard as before
    assert tensorboard_series(path, "train/reward_mean") == [(1, 0.1), (2, 0.2), (3, 0.3)]


def _checkpoint(run: RunFolder, step: int) -> None:
    """A complete checkpoint as far as --resume checks one (run.folder.read_checkpoint_state)."""
    import numpy as np
    from safetensors.numpy import save_file

    ck = Path(run.checkpoint_dir(step))
    ck.mkdir(parents=True)
    save_file({"w": np.zeros(2, np.float32)}, str(ck / "model.safetensors"))
    save_file({"m": np.zeros(2, np.float32)}, str(ck / "optimizer.safetensors"))
    (ck / "trainer_state.json").write_text(json.dumps({"step": step, "policy_version": step, "next_batch_index": step,
                                                       "sampler": {}, "optimizer_meta": {}}))
    run.mark_checkpoint(step)


def test_a_resumed_run_continues_the_same_tracked_runs_without_a_step_twice(tmp_path):
    """The first attempt records steps 1-4 and fails after its checkpoint at step 2; --resume
    trains 3-6 again. MLflow and W&B cannot drop points: they keep the first attempt's 3-4
    and get 5-6, in the same run; TensorBoard drops 3-4 and gets them again."""
    cfg = _cfg(tmp_path)
    first = RunFolder(cfg, tmp_path / "run")
    _steps(first, (1, 2), evals=(2,))
    _checkpoint(first, 2)
    _steps(first, (3, 4), evals=(4,))
    first.close(ok=False)
    state = json.loads((first.path / "trackers.json").read_text())
    client, mr = mlflow_run(first.path)
    assert mr.info.status == "FAILED"
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started: the resumed one gets its own

    run = RunFolder(cfg, tmp_path / "run", resume=True)
    _, ckstate = run.latest_checkpoint()
    run.truncate_after(ckstate["step"])
    _steps(run, (3, 4, 5, 6), scale=10.0, evals=(4, 6))
    _finish(run)
    assert json.loads((run.path / "trackers.json").read_text()) == state
    assert [m["reward_mean"] for m in read_metrics(run.path)] == pytest.approx([0.1, 0.2, 30, 40, 50, 60])
    client, mr = mlflow_run(run.path)
    assert len(client.search_runs([mr.info.experiment_id])) == 1 and mr.info.status == "FINISHED"
    assert mlflow_series(client, mr.info.run_id, "train/reward_mean") == [
        (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 50), (6, 60)]
    assert [s for s, _ in mlflow_series(client, mr.info.run_id, "eval/win_rate")] == [2, 4, 6]
    before, after = wandb_runs(run.path)  # offline, each attempt is its own file of the same run id
    assert {r.run_id for r in wandb_of(before + after, "run")} == {state["wandb"]["id"]}
    assert [e.exit_code for e in wandb_of(before, "exit")] == [1]
    assert sorted(wandb_history(before)) == [1, 2, 3, 4] and sorted(wandb_history(after)) == [5, 6]
    assert "eval/win_rate" in wandb_history(after)[6] and wandb_history(after)[5]["train/reward_mean"] == 50
    assert tensorboard_series(run.path, "train/reward_mean") == [
        (1, 0.1), (2, 0.2), (3, 30), (4, 40), (5, 50), (6, 60)]


def test_a_tracker_failing_mid_run_is_one_warning_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from rlaif_ray.run.trackers import MLflowTracker

    run = RunFolder(_cfg(tmp_path, ["tensorboard", "mlflow"]), tmp_path / "run")
    _steps(run, (1,))
    monkeypatch.setattr(MLflowTracker, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(OSError("server gone")))
    _steps(run, (2, 3))
    run.close()
    out = capsys.readouterr().out
    assert out.count("warning: the mlflow tracker failed (OSError: server gone)") == 1
    assert [s for s, _ in tensorboard_series(run.path, "train/loss")] == [1, 2, 3]
    assert len(read_metrics(run.path)) == 3


def test_a_tracker_that_cannot_start_stops_before_the_run_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://somewhere")
    with pytest.raises(ConfigError, match=r"^run.trackers: mlflow did not start \(.*nosuchstore"):
        RunFolder(_cfg(tmp_path, ["wandb", "mlflow"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- config and preflight errors: one line before Ray -------------------------------------------

def _cli(tmp_path, capsys, *sets: str) -> str:
    from rlaif_ray.commands.cli import main

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(_cfg(tmp_path, ["tensorboard"])))
    args = ["train", str(cfg_file), "--out", str(tmp_path / "out")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    return err


def test_an_unknown_tracker_is_one_error_line_naming_run_trackers(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "run.trackers=[tensorboard, comet]")
    assert "run.trackers" in err and "'tensorboard', 'wandb' or 'mlflow'" in err and "comet" in err
    assert "names wandb more than once" in _cli(tmp_path, capsys, "run.trackers=[wandb, wandb]")


def test_the_old_tensorboard_switch_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"run: `tensorboard` was replaced by `trackers`: write `trackers: \[\]`"):
        config_from_dict({"run": {"tensorboard": False}})
    assert config_from_dict({}).run.trackers == ["tensorboard"]
    assert config_from_dict({"run": {"trackers": "wandb"}}).run.trackers == ["wandb"]  # --set run.trackers=wandb


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_one_error_line_before_ray(tracker, tmp_path, capsys, monkeypatch):
    import importlib.util

    import ray

    from rlaif_ray.commands import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    monkeypatch.setattr(train, "ray_session", lambda *a, **k: pytest.fail("Ray started"))
    ray_before = ray.is_initialized()
    err = _cli(tmp_path, capsys, f"run.trackers=[tensorboard, {tracker}]")
    assert f"run.trackers: {tracker} is not installed: pip install 'rlaif-ray[{tracker}]'" in err
    assert ray.is_initialized() == ray_before


def test_tensorboard_missing_is_a_note_as_before(tmp_path, monkeypatch, capsys):
    import builtins

    from rlaif_ray.run.preflight import check_trackers

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "torch.utils.tensorboard" else real(name, *a, **k))
    cfg = _cfg(tmp_path, ["tensorboard"])
    check_trackers(cfg)  # the default: no error
    run = RunFolder(cfg, tmp_path / "run")
    _steps(run, (1, 2))
    run.close()
    assert capsys.readouterr().out.count("note: tensorboard is not installed") == 1
    assert not (run.path / "tensorboard").exists() and len(read_metrics(run.path)) == 2


# ---- one real run ----------------------------------------------------------------------------------

def test_a_real_run_records_the_same_numbers_in_every_tracker(ray_local, tiny_model_path, tmp_path):
    from test_pipeline import tiny_cfg

    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, rl={"steps": 2}, eval={"signal_posts": 0},
                   run={"trackers": ALL, "checkpoint_every": 0})
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    metrics = read_metrics(run)
    summary = json.loads((run / "summary.json").read_text())
    expect = [(m["step"], round(m["reward_mean"], 6)) for m in metrics]
    assert [s for s, _ in expect] == [1, 2]
    assert tensorboard_series(run, "train/reward_mean") == expect
    client, mr = mlflow_run(run)
    assert mlflow_series(client, mr.info.run_id, "train/reward_mean") == expect
    assert mlflow_series(client, mr.info.run_id, "eval/win_rate") == [(2, round(summary["win_rate"]["win_rate"], 6))]
    assert mr.data.tags["hacking"] == ("suspected" if summary["hacking"]["hacking"] else "not suspected")
    assert mr.data.params["model.name"] == str(tiny_model_path) and mr.info.status == "FINISHED"
    assert {"report.html", "summary.json", "plots"} <= _artifacts(client, mr.info.run_id)
    (records,) = wandb_runs(run)
    history = wandb_history(records)
    assert [(s, round(history[s]["train/reward_mean"], 6)) for s in sorted(history)] == expect
    assert wandb_summary(records)["hacking.hacking"] is summary["hacking"]["hacking"]
    (artifact,) = wandb_of(records, "artifact")
    assert {"report.html", "summary.json", "config.yaml"} <= {e.path for e in artifact.manifest.contents}
