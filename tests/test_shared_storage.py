"""Run folders on shared storage (rlaif_ray.remote_folder): a real S3-compatible server on
loopback (moto's server mode, its own process) stands in for the object store every node of a
GPU cluster reaches. A `train` subprocess writes its run to s3://, is killed after its first
checkpoint, and a second one resumes from the bucket alone; learner rank 0 uploads its
checkpoints itself (nothing stays on its node)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_pipeline import tiny_cfg

from rlaif_ray.config import ConfigError, dump_config
from rlaif_ray.remote_folder import StorageFolder, materialize, staging_for
from rlaif_ray.run.folder import read_checkpoint_state, resume_checkpoint

pytest.importorskip("moto")


def test_a_folder_round_trips_through_the_bucket(s3, tmp_path):
    """push uploads a folder (temp files of a write in progress stay behind, `last` goes last);
    files/entries/read_bytes see it; materialize fetches it whole into a node's cache."""
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\1" * 1000)
    (src / ".w.bin.partial-1-abc").write_bytes(b"torn")
    uri = f"{s3}/models/m1"
    sender = StorageFolder(uri, src)
    assert sender.push(last="config.json") == 1002
    assert sender.push() == 0  # nothing changed since: nothing sent again
    (src / "config.json").write_text('{"a": 1}')
    assert sender.push() == 8
    store = StorageFolder(uri)
    assert store.files() == {"config.json": 8, "sub/w.bin": 1000}
    assert store.entries() == ["config.json", "sub"] and store.is_dir("sub") and not store.exists("nope")
    got = materialize(uri, tmp_path / "cache")
    assert (got / "sub" / "w.bin").read_bytes() == b"\1" * 1000 and not list(got.parent.glob(".*partial*"))
    assert materialize(uri, tmp_path / "cache") == got  # fetched once
    meta = materialize(uri, tmp_path / "meta", keep=lambda name: not name.endswith(".bin"))
    assert sorted(p.name for p in meta.rglob("*") if p.is_file()) == ["config.json"]
    with pytest.raises(ConfigError, match="no such folder"):
        materialize(f"{s3}/models/none", tmp_path / "cache")


def test_train_on_s3_is_killed_and_resumes_from_the_bucket(s3, tiny_model_path, tmp_path):
    """The whole run folder lives in the bucket: config, metrics, rollouts, checkpoints (learner
    rank 0 uploads them, trainer_state.json last, and keeps no copy on its node). A SIGKILL
    after the step-2 checkpoint, then --resume s3://...: the run ends at step 4 with one metrics
    line per step and `latest` naming step 4, read from the bucket."""
    cfg = tiny_cfg(tiny_model_path, s3 + "/runs", rl={"steps": 4, "max_staleness": 0},
                   generation={"max_new_tokens": 8}, eval={"num_prompts": 0, "signal_posts": 0},
                   run={"checkpoint_every": 2, "report": False, "trackers": []}, ray={"num_cpus": 2})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg))
    uri = f"{s3}/runs/cut"
    store = StorageFolder(uri)
    cli = [sys.executable, "-m", "rlaif_ray.commands.cli", "train", str(cfg_file)]
    proc = subprocess.Popen([*cli, "--out", uri], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not store.exists("checkpoints/latest"):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint reached the bucket"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert store.read_bytes("checkpoints/latest").decode().strip() == "step_000002"
    state, why = read_checkpoint_state(f"{uri}/checkpoints/step_000002")
    assert why is None and state["step"] == 2
    # nothing of an uploaded checkpoint stays on the learner's node (step 4's may be mid-upload at the kill)
    assert not list(staging_for(uri).glob("checkpoints/step_000002/*"))

    out = subprocess.run([*cli, "--resume", uri], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed {uri} at step 2" in out.stdout + out.stderr
    ck, state, notes = resume_checkpoint(uri)
    assert ck == f"{uri}/checkpoints/step_000004" and state["step"] == 4 and not notes
    rows = [json.loads(x) for x in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sorted(n for n in store.entries("rollouts")) == [f"step_{i:06d}.parquet" for i in (1, 2, 3, 4)]
    assert {"config.yaml", "summary.json", "summary_start.json"} <= set(store.files(recursive=False))
    summary = json.loads(store.read_bytes("summary.json"))
    assert summary["run_dir"] == uri


def test_outputs_on_s3_are_refused_when_taken(s3, tiny_model_path, tmp_path, capsys):
    """An output on the bucket that holds anything is refused before Ray starts: one error
    line (an object store cannot move it aside, so --overwrite is refused too); an unknown
    scheme is a config error naming run.out_dir."""
    from rlaif_ray.commands.cli import main

    StorageFolder(f"{s3}/taken", tmp_path).write_bytes("x.txt", b"x")
    cfg = tiny_cfg(tiny_model_path, tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg))
    for extra in ([], ["--overwrite"]):
        assert main(["train", str(cfg_file), "--out", f"{s3}/taken", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: train: output s3://") and "cannot be moved aside" in err[-1], err
    assert main(["train", str(cfg_file), "--set", "run.out_dir=ftp://host/runs"]) == 2
    err = capsys.readouterr().err
    assert "run.out_dir" in err and "unknown storage scheme ftp://" in err, err
