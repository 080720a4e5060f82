"""Crash-safe run state and never overwriting a run, mostly without Ray: the run folder's
files truncated at seeded random byte offsets (a crash or a full disk at any byte), a
checkpoint write that fails with ENOSPC, a partial `label` output reaching train-rm, and
every command with an output refusing an existing one before Ray starts (--overwrite moves it
aside). The resume through the real pipeline is in test_reliability.py."""
import errno
import json
import os
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_chain import chain_cfg, synthetic_pairs

from rlaif_ray.config import ConfigError, dump_config, load_config
from rlaif_ray.run.folder import RunFolder, RunStateError, check_resume, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SEED = 20
STATE = {"policy_version": 0, "next_batch_index": 0, "sampler": {"epoch": 0, "offset": 0}}


def _cfg(tiny_model_path, tmp_path, **sections):
    run = {"trackers": [], "report": False, "progress": False, "checkpoint_every": 2, **sections.pop("run", {})}
    return chain_cfg(tiny_model_path, tmp_path, run=run, **sections)


@pytest.fixture(scope="module")
def learner(tiny_model_path):
    from rlaif_ray.rl.learner import PolicyLearner

    return PolicyLearner(tiny_model_path, dict(lr=1e-3, samples_per_prompt=2, seed=3), 0.9)


@pytest.fixture
def run_dir(tiny_model_path, tmp_path, learner):
    """A run folder as a dead driver leaves it: 6 metrics and winrate lines, complete
    checkpoints at steps 2 and 4 (`latest` = step_000004), summary_start.json."""
    cfg = _cfg(tiny_model_path, tmp_path)
    run = RunFolder(cfg, tmp_path / "run")
    for step in range(1, 7):
        run.log_metrics({"step": step, "policy_version": step, "reward_mean": 0.1 * step, "loss": -0.5})
        if step % 3 == 0:
            run.log_winrate({"step": step, "win_rate": 0.5})
        if step in (2, 4):
            learner.save(run.checkpoint_dir(step), {**STATE, "step": step, "policy_version": step})
            run.mark_checkpoint(step)
    run.write_json("summary_start.json", {"run_dir": str(run.path), "heldout_before": {"reward_mean": 0.25}})
    return cfg, run.path


def _resume(cfg, path) -> tuple[int, RunFolder]:
    """What `train --resume` does before and after Ray starts, without Ray: the checks, the
    checkpoint and the record cut back to it."""
    run = RunFolder(cfg, path, resume=True)
    _, state = run.latest_checkpoint()
    run.truncate_after(state["step"])
    return state["step"], run


def _parses(tail: bytes) -> bool:
    try:
        return not tail.strip() or isinstance(json.loads(tail), dict)
    except ValueError:
        return False


def _offsets(size: int, n: int, salt: int) -> list[int]:
    rng = random.Random(SEED * 1000 + salt)
    return sorted({0, size - 1, *(rng.randrange(size) for _ in range(n))})


# ---- a crash at any byte --------------------------------------------------------------------------

def test_metrics_cut_at_any_byte_resumes_and_reports_the_torn_line(run_dir):
    cfg, path = run_dir
    metrics = path / "metrics.jsonl"
    whole = metrics.read_bytes()
    lines = whole.splitlines(keepends=True)
    for cut in _offsets(len(whole), 12, 1):
        metrics.write_bytes(whole[:cut])
        torn = not _parses(whole[:cut].split(b"\n")[-1])  # the unterminated tail, if any
        step, run = _resume(cfg, path)
        assert step == 4
        assert any("torn last line" in n for n in run.notes) == torn, (cut, run.notes)
        kept = [json.loads(x) for x in metrics.read_text().splitlines()]  # clean again: every line parses
        assert [m["step"] for m in kept] == [m["step"] for m in map(json.loads, whole[:cut].split(b"\n")[:-1])
                                             if m["step"] <= 4]
        metrics.write_bytes(whole)
    assert len(lines) == 6 and [m["step"] for m in read_metrics(path)] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_line_in_the_middle_names_the_file_and_line(run_dir):
    cfg, path = run_dir
    metrics = path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:10] + "\n"  # not what a crash leaves: an edit or a bad disk
    metrics.write_text("".join(lines))
    with pytest.raises(RunStateError, match=r"metrics.jsonl: line 3 is damaged"):
        check_resume(path, cfg)


@pytest.mark.parametrize("content", [b"step_000004\n"[:n] for n in range(11)] + [b"\x00\x00\x00", b"\xff\xfe garbage"],
                         ids=lambda c: repr(c))
def test_latest_cut_or_garbled_falls_back_to_the_newest_complete_checkpoint(run_dir, content):
    """`latest` cut at every byte before its name is whole (or zeros, or garbage): resume
    takes the newest complete checkpoint and says so."""
    cfg, path = run_dir
    (path / "checkpoints" / "latest").write_bytes(content)
    step, run = _resume(cfg, path)
    assert step == 4
    assert any("checkpoints/latest is" in n and "resuming from step_000004" in n for n in run.notes), run.notes


def test_latest_naming_an_incomplete_checkpoint_falls_back_to_the_previous_one(run_dir, learner):
    cfg, path = run_dir
    ck6 = path / "checkpoints" / "step_000006"
    learner.save(ck6, {**STATE, "step": 6})
    (ck6 / "optimizer.safetensors").unlink()  # e.g. the write died (a checkpoint by older code, in place)
    (path / "checkpoints" / "latest").write_text("step_000006\n")
    step, run = _resume(cfg, path)
    assert step == 4 and any("names step_000006" in n and "step_000004" in n for n in run.notes)
    assert not ck6.exists()  # the damaged one goes with the rest of the record after step 4
    (path / "checkpoints" / "latest").write_text("step_000008\n")  # names a folder that is not there
    assert _resume(cfg, path)[0] == 4


@pytest.mark.parametrize("name", ["trainer_state.json", "model.safetensors", "optimizer.safetensors"])
def test_checkpoint_file_cut_at_any_byte_is_never_loaded(run_dir, name):
    """A checkpoint file cut anywhere makes that checkpoint incomplete: resume falls back to
    step 2, never a JSONDecodeError or a half-read safetensors; whole, it resumes at step 4."""
    cfg, path = run_dir
    f = path / "checkpoints" / "step_000004" / name
    whole = f.read_bytes()
    for cut in _offsets(len(whole), 6, len(name)):
        f.write_bytes(whole[:cut])
        ck, state, notes = check_resume(path, cfg)
        assert state["step"] == 2 and ck.name == "step_000002", cut
        assert "names step_000004" in notes[0] and "step_000002" in notes[0]
    f.write_bytes(whole)
    assert check_resume(path, cfg)[1]["step"] == 4


def test_no_complete_checkpoint_is_one_clear_error(run_dir):
    cfg, path = run_dir
    for step in (2, 4):
        (path / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").write_text('{"step": ')
    (path / "checkpoints" / "latest").write_text("")
    with pytest.raises(RunStateError, match=r"checkpoints/latest is empty, and no complete checkpoint is left"):
        check_resume(path, cfg)


def test_summary_start_cut_at_any_byte_is_a_clear_error(run_dir):
    cfg, path = run_dir
    f = path / "summary_start.json"
    whole = f.read_bytes()
    for cut in _offsets(len(whole), 6, 3):
        f.write_bytes(whole[:cut])
        with pytest.raises(RunStateError, match=r"summary_start.json is damaged .*delete it to resume"):
            check_resume(path, cfg)
    f.write_bytes(whole)
    assert RunFolder(cfg, path, resume=True).read_json("summary_start.json")["heldout_before"]["reward_mean"] == 0.25
    (path / "summary.json").write_text('{"recoveries": [')
    with pytest.raises(RunStateError, match=r"summary.json is damaged"):
        RunFolder(cfg, path, resume=True).read_json("summary.json")


def test_whole_files_survive_enospc_at_any_byte(run_dir, monkeypatch):
    """`latest`, summaries, config.yaml: a write cut by a full disk leaves the old version and
    no temp file."""
    cfg, path = run_dir
    run = RunFolder(cfg, path, resume=True)
    real_write = os.write
    for cut in (0, 1, 5, 11):
        budget = {"left": cut}

        def short_write(fd, data, budget=budget):
            if budget["left"] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = real_write(fd, bytes(data[:budget["left"]]))
            budget["left"] -= n
            return n

        monkeypatch.setattr(os, "write", short_write)
        with pytest.raises(OSError, match="No space left"):
            run.mark_checkpoint(2)
        with pytest.raises(OSError, match="No space left"):
            run.write_json("summary_start.json", {"x": "y" * 100})
        monkeypatch.setattr(os, "write", real_write)
        assert (path / "checkpoints" / "latest").read_text() == "step_000004\n"
        assert json.loads((path / "summary_start.json").read_text())["heldout_before"]["reward_mean"] == 0.25
        assert not [p.name for p in [*path.iterdir(), *(path / "checkpoints").iterdir()] if ".partial-" in p.name]


# ---- a checkpoint that fails with ENOSPC ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["safetensors.torch.save_file", "huggingface_hub.save_torch_state_dict"])
def test_enospc_during_a_checkpoint_leaves_latest_on_the_previous_one(run_dir, learner, monkeypatch, where,
                                                                      tiny_model_path):
    import importlib

    from rlaif_ray.rl.learner import PolicyLearner

    cfg, path = run_dir
    module, fn = where.rsplit(".", 1)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(importlib.import_module(module), fn, full_disk)
    run = RunFolder(cfg, path, resume=True)
    with pytest.raises(OSError, match="No space left"):
        learner.save(run.checkpoint_dir(6), {**STATE, "step": 6})
    monkeypatch.undo()
    ckdir = path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_000002", "step_000004"]  # no partial one
    assert (ckdir / "latest").read_text().strip() == "step_000004"
    ck, state, notes = check_resume(path, cfg)
    assert ck.name == "step_000004" and state["step"] == 4 and not notes
    resumed = PolicyLearner(tiny_model_path, dict(lr=1e-3, samples_per_prompt=2, seed=3), 0.9)
    resumed.load(ck)  # weights and AdamW state, strictly
    from test_learner import _batch

    rows = _batch().to_pylist()
    stats = resumed.step(rows, sum(len(r["response_token_ids"]) for r in rows), len(rows))
    assert stats["loss_sum"] == stats["loss_sum"]  # finite: the run goes on from step 4


def test_a_failed_checkpoint_stops_the_run_with_one_line(tmp_path):
    """The driver's side: the learner's OSError (wrapped by Ray) becomes a RunStateError that
    names the checkpoint kept and the resume command; `latest` is not touched."""
    from actors.training import checkpoint

    class Pipe:
        checkpoint = str(tmp_path / "run" / "checkpoints" / "step_000004")

        def save(self, *a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

    class Run:
        path = location = tmp_path / "run"

        def checkpoint_dir(self, step):
            return self.path / "checkpoints" / f"step_{step:06d}"

        def mark_checkpoint(self, step):
            raise AssertionError("latest must not move")

    with pytest.raises(RunStateError, match=r"step 6: writing checkpoint .*step_000006 failed .*No space left.*"
                                            r"latest still names step_000004.*--resume"):
        checkpoint(Pipe(), Run(), 6, None)


def test_optimizer_state_that_does_not_match_is_refused_naming_the_checkpoint(learner, tiny_model_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from rlaif_ray.rl.learner import PolicyLearner

    ck = tmp_path / "step_000002"
    learner.save(ck, {**STATE, "step": 2})
    tensors = load_file(str(ck / "optimizer.safetensors"))
    tensors.pop("state.model.model.norm.weight.exp_avg_sq")
    save_file(tensors, str(ck / "optimizer.safetensors"))
    with pytest.raises(RuntimeError, match=rf"checkpoint {re.escape(str(ck))}: its optimizer state does not match"
                                           r".*model.model.norm.weight"):
        PolicyLearner(tiny_model_path, dict(lr=1e-3, samples_per_prompt=2, seed=3), 0.9).load(ck)


# ---- a partial `label` output reaching train-rm ---------------------------------------------------

def _label_output(folder: Path, rows: int = 24) -> Path:
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist([{**r, "labeler": "labeler:1", "prompt_config": "{}"}
                                  for r in synthetic_pairs(rows, seed=1)])
    pq.write_table(table.slice(0, rows // 2), folder / "a_000000.parquet")
    pq.write_table(table.slice(rows // 2), folder / "a_000001.parquet")
    (folder / "_summary.json").write_text("{}")
    return folder


@pytest.mark.parametrize("damage", ["cut_parquet", "no_summary"])
def test_partial_label_output_stops_train_rm_before_ray(tiny_model_path, tmp_path, damage, monkeypatch):
    from rlaif_ray.commands import train_rm
    from rlaif_ray.run.preflight import preflight

    labels = _label_output(tmp_path / "labels")
    cfg = _cfg(tiny_model_path, tmp_path, rm={"labels": str(labels)})
    preflight(cfg, "train-rm")  # whole: accepted
    if damage == "cut_parquet":
        f = labels / "a_000001.parquet"
        whole = f.read_bytes()
        cuts = _offsets(len(whole), 4, 7)
    else:
        (labels / "_summary.json").unlink()
        cuts = [None]
    monkeypatch.setattr(train_rm, "ray_session", _no_ray)
    for cut in cuts:
        if cut is not None:
            f.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match=rf"rm.labels: {re.escape(str(labels))} is (a partial or damaged label|an unfinished `label`) "
                                              r"output.*rlaif-ray label"):
            train_rm.run_train_rm(cfg, tmp_path / "rm", log=lambda *_: None)


# ---- never overwrite a run ----------------------------------------------------------------------------

class RayStarted(Exception):
    """A command got past every check to the point where Ray would start."""


def _no_ray(*a, **k):
    raise RayStarted


COMMANDS = {  # command: (module, output flag, is the output a file)
    "train": ("train", "--out", False), "eval": ("evaluate", "--out", False), "sft": ("sft", "--out", False),
    "train-rm": ("train_rm", "--out", False), "sample-pairs": ("sample_pairs", "--out", True),
    "label": ("label", "--output", False), "run": ("run_chain", "--out", False),
}


@pytest.fixture
def cli_setup(tiny_model_path, tmp_path):
    labels = _label_output(tmp_path / "labels", rows=48)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(20, seed=2, labels="human")))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(8, seed=3)))
    cfg = _cfg(tiny_model_path, tmp_path, rm={"labels": str(labels), "eval_data": str(held)},
               label={"input": str(pairs)}, rl={"steps": 2})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg))
    return cfg_file


def _existing(tmp_path: Path, is_file: bool) -> Path:
    if is_file:
        out = tmp_path / "old.jsonl"
        out.write_text('{"old": 1}\n')
    else:
        out = tmp_path / "old"
        (out / "checkpoints").mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_existing_output_is_refused_before_ray_and_moved_aside_with_overwrite(command, cli_setup, tmp_path,
                                                                               monkeypatch, capsys):
    import importlib

    import ray

    from rlaif_ray.commands.cli import main

    module, flag, is_file = COMMANDS[command]
    mod = importlib.import_module(f"rlaif_ray.commands.{module}")
    ray_before = ray.is_initialized()
    # Ray must not start: every module's ray_session is the one that would
    for name in ("train", "evaluate", "sft", "train_rm", "sample_pairs", "label"):
        monkeypatch.setattr(importlib.import_module(f"rlaif_ray.commands.{name}"), "ray_session", _no_ray)
    out = _existing(tmp_path, is_file)
    before = sorted(p.name for p in out.rglob("*")) if not is_file else out.read_text()

    assert main([command, str(cli_setup), flag, str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output {out} " in err and "never overwritten" in err and "--overwrite" in err, err
    assert "Traceback" not in err
    assert (sorted(p.name for p in out.rglob("*")) if not is_file else out.read_text()) == before
    assert ray.is_initialized() == ray_before

    # --overwrite: every check passes, the old output is moved aside (kept), the command goes on
    if command == "run":
        monkeypatch.setattr(mod, "run_sft", _no_ray)
    with pytest.raises(RayStarted):
        main([command, str(cli_setup), flag, str(out), "--overwrite"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{out.name}.replaced-")]
    assert len(aside) == 1, list(tmp_path.iterdir())
    assert (aside[0].read_text() if is_file else sorted(p.name for p in aside[0].rglob("*"))) == before
    assert f"--overwrite: moved the existing {out} to {aside[0]}" in capsys.readouterr().out
    assert ray.is_initialized() == ray_before


def test_train_into_an_existing_run_points_to_resume(cli_setup, tmp_path, capsys, monkeypatch):
    from rlaif_ray.commands import train
    from rlaif_ray.commands.cli import main

    monkeypatch.setattr(train, "ray_session", _no_ray)
    out = _existing(tmp_path, False)
    assert main(["train", str(cli_setup), "--out", str(out)]) == 2
    assert f"--resume {out} to continue it" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_checkpoint", "other_config", "with_overwrite"])
def test_resume_problems_are_one_error_line_before_ray(case, run_dir, tmp_path, capsys, monkeypatch):
    import ray

    from rlaif_ray.commands import train
    from rlaif_ray.commands.cli import main

    cfg, path = run_dir
    cfg_file = path / "config.yaml"
    args = ["train", str(cfg_file), "--resume", str(path)]
    expect = {"missing": "no such run folder", "no_checkpoint": "no checkpoint in that run folder",
              "other_config": "the config differs from the run's config.yaml (rl.lr)",
              "with_overwrite": "--resume continues a run and --overwrite replaces one"}[case]
    if case == "missing":
        args[3] = str(tmp_path / "nowhere")
    elif case == "no_checkpoint":
        for p in (path / "checkpoints").iterdir():
            p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    elif case == "other_config":
        args += ["--set", "rl.lr=0.5"]
    else:
        args += ["--overwrite"]
    monkeypatch.setattr(train, "ray_session", _no_ray)
    ray_before = ray.is_initialized()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err, err
    assert ray.is_initialized() == ray_before


def test_the_quickstart_checkpoints_while_it_runs():
    """A crash of the quickstart loses at most checkpoint_every - 1 steps (0 = only at the end
    left nothing to resume from)."""
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [])
    assert cfg.run.checkpoint_every == 4 and cfg.rl.steps % cfg.run.checkpoint_every == 0
