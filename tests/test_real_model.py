"""The default path on the real bundled SmolLM2-135M-Instruct: a couple of steps."""
import json

import pytest

from rlaif_ray.run.folder import read_metrics, read_rollouts

pytestmark = pytest.mark.slow


def test_two_steps_on_the_bundled_model(ray_local, tmp_path):
    from pathlib import Path

    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart.yaml", [
        "rl.steps=2", "rl.prompts_per_step=2", "rl.samples_per_prompt=2", "generation.max_new_tokens=16",
        "eval.num_prompts=2", "eval.signal_posts=4", f"run.out_dir={tmp_path}",
        "pipeline.learner.num_cpus=0.5"])
    lines = []
    run = train(cfg, tmp_path / "run", log=lines.append)
    metrics = read_metrics(run)
    assert [m["policy_version"] for m in metrics] == [1, 2]
    assert all(-1 <= m["reward_mean"] <= 1 and m["kl"] == m["kl"] for m in metrics)
    table = read_rollouts(run)
    assert table.num_rows == 2 * 2 * 2
    # a real instruct model writes text, not empty strings
    assert sum(len(t) > 0 for t in table.column("response_text").to_pylist()) >= 6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["signal"]["n"] == 4 and 0 <= summary["signal"]["reference_wins"] <= 1
    assert any(line.startswith("step   2/2") for line in lines)
    assert any("held-out reward (same frozen judge" in line for line in lines)
