"""Reliability on a real local Ray: actors killed by pid mid-run, a killed driver resumed,
and a corpus of bad inputs with the message each must produce."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import tiny_cfg

from rlaif_ray.config import dump_config
from rlaif_ray.run.folder import read_metrics, read_rollouts

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(cond, timeout=240, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.2)


def _metrics_lines(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.is_file() else 0


def test_killed_actors_lose_and_repeat_nothing(ray_local, tiny_model_path, tmp_path):
    """One run, three SIGKILLs: the generator after step 6, the labeler after step 12, a
    learner rank after step 18. Each is recovered (a re-dispatched shard, a rebuilt learner
    replaying from its checkpoint); every rollout is trained exactly once and every step logged."""
    from rlaif_ray.commands.train import train

    steps, kills = 26, (("generator-0", 6), ("labeler-0", 12), ("learner-0", 18))
    cfg = tiny_cfg(tiny_model_path, tmp_path, rl={"steps": steps, "max_staleness": 1},
                   generation={"max_new_tokens": 16}, eval={"num_prompts": 0, "signal_posts": 0},
                   run={"checkpoint_every": 5, "out_dir": str(tmp_path), "report": False})
    run = tmp_path / "run"
    result, lines = {}, []
    worker = threading.Thread(target=lambda: result.setdefault("run", train(cfg, run, log=lines.append)))
    worker.start()
    killed = {}
    for role, after in kills:
        _wait_for(lambda: _metrics_lines(run) >= after, what=f"{after} steps")
        killed[role] = json.loads((run / "processes.json").read_text())[role]  # not restarted before its own kill
        os.kill(killed[role], signal.SIGKILL)
    worker.join(timeout=600)
    assert "run" in result, f"run did not finish after the kills: {lines[-5:]}"
    ids = read_rollouts(run).column("rollout_id").to_pylist()
    assert len(ids) == len(set(ids)) == steps * 2 * 2  # no loss, no duplicate
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert any(r.get("learner") for r in summary["recoveries"])  # the learner rebuilt
    assert sum("shard" in r for r in summary["recoveries"]) >= 2  # the generator's and the labeler's shards
    for role, pid in killed.items():
        assert summary["processes"][role] != pid, role  # each role runs in a new process now
    print(f"\nkilled {killed}; recoveries: {json.dumps(summary['recoveries'])}")


def test_resumed_run_continues_like_an_uninterrupted_one(ray_local, tiny_model_path, tmp_path):
    """Kill a `train` subprocess after its step-2 checkpoint, resume it, and compare with an
    uninterrupted run of the same seed (max_staleness 0, so every batch is on-policy). The KL
    weight is adaptive (a horizon of one step, so it moves every step): the resumed run takes
    the controller's beta back from the checkpoint."""
    from safetensors.numpy import load_file

    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, rl={"steps": 5, "max_staleness": 0, "kl_control": "adaptive",
                                                  "kl_horizon": 4},
                   generation={"max_new_tokens": 16}, eval={"num_prompts": 0, "signal_posts": 0},
                   run={"checkpoint_every": 2, "out_dir": str(tmp_path)}, ray={"num_cpus": 2})
    full = train(cfg, tmp_path / "full", log=lambda *_: None)

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_config(cfg))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "rlaif_ray.commands.cli", "train", str(cfg_file), "--out", str(cut)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (cut / "checkpoints" / "latest").is_file(), timeout=600, what="first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    # what a crash at a bad byte also leaves (tests/test_crash_safety.py cuts every file): a torn
    # metrics line, an empty `latest`, a checkpoint half-written under its temp name
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "reward_me')
    (cut / "checkpoints" / "latest").write_text("")
    partial = cut / "checkpoints" / ".step_000099.partial-1-x"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    lines: list[str] = []
    resumed = train(cfg, log=lines.append, resume=cut)
    notes = [x for x in lines if x.startswith("note: ")]
    assert any("torn last line" in x for x in notes) and any("checkpoints/latest is empty" in x for x in notes), notes
    assert not partial.exists()

    a, b = read_metrics(full), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5] and [m["policy_version"] for m in b] == [1, 2, 3, 4, 5]
    for ma, mb in zip(a, b):  # CPU float nondeterminism only: same seeds, weights, optimizer state
        for key in ("reward_mean", "loss", "kl", "response_len"):
            assert mb[key] == pytest.approx(ma[key], abs=1e-4), (ma["step"], key)
        assert mb["kl_beta"] == pytest.approx(ma["kl_beta"], rel=1e-6), ma["step"]
    assert a[0]["kl_beta"] == 0.05 and len({m["kl_beta"] for m in a}) == 5  # it moved every step
    for run in (full, cut):
        saved = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
        assert saved["kl_beta"] == pytest.approx(a[2]["kl_beta"], rel=1e-6)  # the beta step 3 trains with
    ids_a = read_rollouts(full).column("rollout_id").to_pylist()
    ids_b = read_rollouts(resumed).column("rollout_id").to_pylist()
    assert sorted(ids_a) == sorted(ids_b) and len(set(ids_b)) == len(ids_b)
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa = load_file(str(full / "checkpoints" / "step_000005" / name))
        wb = load_file(str(resumed / "checkpoints" / "step_000005" / name))
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, err_msg=f"{name}:{k}")


# The bad-input corpus: every tests/bad_inputs/*.yaml is a config run through the CLI
# (`main`, in this process). Its first lines are `# KEY: VALUE` headers:
#   # expect: TEXT      required: words the one `error: ...` line must hold
#   # command: ARGS     optional: the command and its flags; the config path goes right after
#                       the command name (default: train --out /nonexistent/should-not-be-created)
#   # set: KEY=VALUE    optional, repeatable: passed verbatim as --set KEY=VALUE
# A data file a case needs sits beside it (tests/bad_inputs/NAME.jsonl, .jsonl.gz, .PARQUET)
# and is named in the config relative to the repository root. Each case must end with exit
# code 2, exactly one line `error: ...` (the last line of stderr), no traceback, and no Ray.
CORPUS = sorted((ROOT / "tests" / "bad_inputs").glob("*.yaml"))
DEFAULT_ARGS = ["train", "--out", "/nonexistent/should-not-be-created"]


def corpus_case(path: Path) -> tuple[list[str], str]:
    """(the CLI arguments, the expected words) of one corpus file, from its header lines."""
    head: dict[str, list[str]] = {}
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():  # a case may be non-UTF-8
        if not line.startswith("# ") or ":" not in line:
            break
        key, _, value = line[2:].partition(":")
        head.setdefault(key.strip(), []).append(value.strip())
    assert set(head) <= {"expect", "command", "set"} and len(head.get("expect", [])) == 1, f"{path.name}: bad header"
    command = head["command"][0].split() if "command" in head else DEFAULT_ARGS
    args = [command[0], str(path.relative_to(ROOT)), *command[1:]]
    for item in head.get("set", []):
        args += ["--set", item]
    return args, head["expect"][0]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_input_corpus(path, capsys, monkeypatch):
    """Each bad config, data file or argument stops before Ray starts, with one clear line."""
    import ray

    import actors.ray_session
    from rlaif_ray.commands.cli import main

    def no_ray(*_, **__):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RLAIF_RAY_DEBUG", raising=False)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(actors.ray_session, "start_ray", no_ray)
    was_up = ray.is_initialized()  # the session's ray_local fixture may have started one
    args, expect = corpus_case(path)
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: ") and expect in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err
    assert ray.is_initialized() == was_up
    assert not Path("/nonexistent/should-not-be-created").exists()


def test_non_finite_reward_stops_with_ids(tiny_model_path, tmp_path):
    import pyarrow as pa

    from actors.learner import LearnerWorker
    from rlaif_ray.config import RLConfig
    from rlaif_ray.data import schemas
    from rlaif_ray.rl.learner import NonFiniteError

    worker = LearnerWorker(0, 1, tiny_model_path, "float32", RLConfig().model_dump(), 0.9, 1)
    worker.setup()
    row = {"prompt_id": "p", "prompt_text": "x", "prompt_token_ids": [1, 2, 3], "reference": None, "context": "c",
           "rollout_id": "b7:p:0", "batch_index": 7, "sample_index": 0, "response_text": "y",
           "response_token_ids": [4, 5], "behaviour_logprobs": [-1.0, -1.0], "policy_version": 0, "truncated": False,
           "generator": "g", "reward": float("nan"), "raw_score": 0.0, "reward_meta": "{}", "reward_ok": True}
    other = dict(row, rollout_id="b7:p:1", sample_index=1, reward=0.5)
    batch = pa.RecordBatch.from_pylist([row, other], schema=schemas.SCORED)
    before = {k: v.copy() for k, v in worker.get_weights()["arrays"].items()}
    with pytest.raises(NonFiniteError, match=r"b7:p:0.*batch 7"):
        worker.train_step(batch, 4, 2)
    after = worker.get_weights()["arrays"]
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was applied


def test_checkpoints_are_safetensors_only(tiny_model_path, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from rlaif_ray.engines.models import load_model

    pickled = tmp_path / "pickled"  # the same weights as a pickle checkpoint
    pickled.mkdir()
    shutil.copy(Path(tiny_model_path) / "config.json", pickled)
    torch.save(load_file(str(Path(tiny_model_path) / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(pickled))
    assert load_model(tiny_model_path) is not None


def test_servers_bind_loopback_by_default():
    from rlaif_ray.config import Config

    assert Config().ray.dashboard_host == "127.0.0.1"


def test_unusable_labels_are_counted_and_not_trained(ray_local, tiny_model_path, tmp_path):
    """A random model puts almost no probability on "Yes"/"No": with min_label_mass 0.5 every
    label is unusable, so every rollout is recorded and counted, and nothing is learned."""
    import json

    from safetensors.numpy import load_file

    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, reward={"min_label_mass": 0.5}, rl={"steps": 2},
                   eval={"num_prompts": 0, "signal_posts": 0}, run={"checkpoint_every": 0})
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    metrics = read_metrics(run)
    assert [m["unusable_labels"] for m in metrics] == [m["completions"] for m in metrics] == [4, 4]
    table = read_rollouts(run)
    assert table.num_rows == 8 and not any(table.column("reward_ok").to_pylist())
    assert all(json.loads(m)["label_mass"] < 0.5 for m in table.column("reward_meta").to_pylist())
    final = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    initial = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    for k, v in final.items():
        np.testing.assert_array_equal(v, initial[k], err_msg=k)
