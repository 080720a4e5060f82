"""Helpers of the tests that train with your own data and a judge endpoint
(tests/test_own_judge.py, tests/test_openai_backend.py)."""
import json
from pathlib import Path

from rlaif_ray.config import config_from_dict
from rlaif_ray.run.folder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
JUDGE = "smollm2-135m-instruct"


def own_data_cfg(policy: str, out: Path, reward: dict, **sections):
    """configs/own-data-openai-judge.yaml as shipped (the data's `question` column in a 1-10
    score rubric, a chat pairwise rubric for the win rate), shrunk: a tiny policy, 2 steps of
    1 prompt x 2 samples, 4 held-out prompts. Paths in it are relative to the repository."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "own-data-openai-judge.yaml").read_text())
    small = {
        "run": {"out_dir": str(out), "name": "own"},
        "model": {"name": policy},
        "task": {"heldout_size": 4},
        "generation": {"max_new_tokens": 8},
        "reward": reward,
        "rl": {"steps": 2, "prompts_per_step": 1, "samples_per_prompt": 2, "max_staleness": 0,
               "gradient_checkpointing": False},
        "pipeline": {"generators": {"num_cpus": 0.25, "torch_threads": 1},
                     "labelers": {"num_cpus": 0.25, "torch_threads": 1},
                     "learner": {"num_cpus": 0.5, "torch_threads": 1}},
        "eval": {"num_prompts": 4, "signal_posts": 4, "batch_size": 4},
        "ray": {"num_cpus": 2},
    }
    for section in (small, sections):
        for k, v in section.items():
            if k == "reward" and "openai" in v:
                data[k]["openai"] = {**data[k].get("openai", {}), **v["openai"]}
                v = {x: y for x, y in v.items() if x != "openai"}
            data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def endpoint(url: str, labels: str, **more) -> dict:
    return {"openai": {"base_url": url, "model": JUDGE, "labels": labels, "top_logprobs": 20, "samples": 4,
                       "max_answer_tokens": 3, "backoff_s": 0.2, **more}}


def check_judged_run(run: Path, steps: int, n: int = 4) -> dict:
    """Every phase that judges ran: the signal check, the held-out reward before and after,
    the win rate (its unusable labels counted); the judge's tokens in metrics and summary."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["signal"]["n"] == n and summary["signal"]["scorer"] == "helpful"
    assert summary["heldout_before"]["n"] == n and summary["heldout_after"]["n"] == n
    win = summary["win_rate"]
    assert win["n"] + win["unusable_labels"] == n and win["step"] == steps
    usage = summary["judge_usage"]
    assert usage["judge_prompt_tokens"] > 0 and usage["judge_completion_tokens"] > 0 and usage["endpoint_requests"] > 0
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(m["judge_prompt_tokens"] > 0 for m in metrics)
    return summary
