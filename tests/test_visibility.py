"""Watching a run: custom metrics on the Ray metrics endpoint (scraped over loopback), and
the HTML report rendered in headless Chromium (pixels checked, not only the file)."""
import json
import os
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from tests.test_pipeline import tiny_cfg


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _value(text: str, name: str, **tags) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_every_role_emits_metrics_to_the_ray_endpoint(ray_local, tiny_model_path, tmp_path):
    import ray

    from actors.metrics import RoleMetrics
    from actors.pipeline import start_actors
    from actors.ray_session import release
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines.models import load_tokenizer

    cfg = tiny_cfg(tiny_model_path, tmp_path)
    gens, labelers, learner = start_actors(cfg, "metrics")
    try:
        prompts = build_prompts(load_tldr()[:200], load_tokenizer(tiny_model_path), cfg.task)
        rollouts = ray.get(gens[0].generate.remote(prompt_batch(prompts.train[:2]), 0, 2, 0))
        scored = ray.get(labelers[0].score.remote(rollouts))
        learner.train(scored, "token_mean")
        driver = RoleMetrics("driver", "metrics-test")
        driver.set("queue_depth", 3)
        tokens = sum(len(t) for t in rollouts.column("response_token_ids").to_pylist())

        port = ray.nodes()[0]["MetricsExportPort"]
        # actors are tagged with their Ray names (unique per run); the driver with its run tag
        want = {("ray_rlaif_tokens_generated_total", "generator", "generator-0@metrics"): float(tokens),
                ("ray_rlaif_labels_total", "labeler", "labeler-0@metrics"): 4.0,
                ("ray_rlaif_learner_step_s_count", "learner", "learner-0@metrics"): 1.0,
                ("ray_rlaif_queue_depth", "driver", "metrics-test"): 3.0}
        deadline, got = time.time() + 60, {}
        while time.time() < deadline:  # the export interval is about 10 s (MACHINE_NOTES)
            text = _scrape(port)
            got = {k: _value(text, k[0], role=k[1], actor=k[2]) for k in want}
            if all(v is not None and v >= want[k] for k, v in got.items()):
                break
            time.sleep(2)
        assert got == {k: pytest.approx(v) for k, v in want.items()}, got
        assert _value(text, "ray_rlaif_tokens_per_s", role="generator") > 0
    finally:
        for a in gens + labelers + learner.workers:
            ray.kill(a)
        release(learner.tag)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return exe


def _screenshot(html_path, png_path, height=2600) -> np.ndarray:
    import matplotlib.image

    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1300,{height}", f"--screenshot={png_path}", f"file://{html_path}"],
                   check=True, capture_output=True, timeout=120)
    return (matplotlib.image.imread(str(png_path))[:, :, :3] * 255).round().astype(int)


def _pixels(img: np.ndarray, hex_color: str, tol: int = 12) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=2) <= tol).sum())


def test_train_report_renders_with_its_plots(tmp_path):
    from rlaif_ray.run.report import train_report

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"step": s, "reward_mean": 0.1 * s + rng.normal(0, 0.05), "kl": 0.01 * s, "loss": -0.1,
                                "pg_loss": -0.1, "value_loss": 0.0, "staleness": 1, "completions_per_s": 0.5,
                                "waited_for_batch_s": 2.0}) + "\n")
    with open(run / "winrate.jsonl", "w") as f:
        for s, w in ((5, 0.55), (10, 0.65)):
            f.write(json.dumps({"step": s, "win_rate": w, "ci95": [w - 0.1, w + 0.1], "n": 48,
                                "length_controlled": w - 0.05}) + "\n")
    (run / "summary.json").write_text(json.dumps({"loop_s": 100.0, "completions_per_s": 0.5,
                                                  "stage_busy_s": {"generator-0": 60.0, "labeler-0": 30.0,
                                                                   "learner-0": 80.0}}))
    (run / "config.yaml").write_text("rl:\n  steps: 10\n")
    page = train_report(run)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 8 and "steps: 10" in text and "65.0%" in text
    img = _screenshot(page, tmp_path / "shot.png")
    assert img.shape[0] >= 2000
    # the plots really drew: blue series and bars, the green length-controlled line, grey idle bars
    assert _pixels(img, "#1f77b4") > 5000
    assert _pixels(img, "#2ca02c") > 100
    assert _pixels(img, "#dddddd") > 5000
    # and they sit below the headline table, across the page (not one broken image)
    rows_with_blue = np.nonzero((np.abs(img - [31, 119, 180]).max(axis=2) <= 12).any(axis=1))[0]
    assert rows_with_blue.max() - rows_with_blue.min() > 1000


def test_eval_report_renders_with_its_plots(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlaif_ray.config import EvalConfig
    from rlaif_ray.data.schemas import JUDGEMENTS
    from rlaif_ray.feedback.judgements import summarize_judgements as summarize
    from rlaif_ray.run.report import eval_report

    rng = np.random.default_rng(1)
    rows = []
    for i in range(60):
        ca, cb = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        p = float(1 / (1 + np.exp(-(ca - cb) / 50)))
        rows.append({"prompt_id": f"p{i}", "context": "c", "response_a": "a" * ca, "response_b": "b" * cb,
                     "chars_a": ca, "chars_b": cb, "p_a": p, "p_ab": p, "p_ba": 1 - p, "label_mass": 0.5,
                     "usable": True, "harmless_a": float(rng.random()), "harmless_b": float(rng.random())})
    folder = tmp_path / "ev"
    folder.mkdir()
    s = summarize(rows, EvalConfig(bootstrap=100))
    (folder / "summary.json").write_text(json.dumps({**s, "policy_a": "ckpt", "policy_b": "init"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), folder / "judgements.parquet")
    page = eval_report(folder)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "length-controlled win rate" in text
    assert "harmless if P(Yes) &gt;= 0.5" in text
    img = _screenshot(page, tmp_path / "shot.png", height=1600)
    assert _pixels(img, "#1f77b4") > 3000  # histogram and scatter
    assert _pixels(img, "#2ca02c") > 300  # length-controlled bar and the fitted curve
    assert _pixels(img, "#ff7f0e") > 300  # harmless rate of B


def test_labeler_report_has_alignment_and_position_bias(tmp_path):
    from rlaif_ray.run.report import labeler_report

    rows = [{"data": d, "variant": v, "n": 100, "alignment": a, "ci95": [a - 0.1, a + 0.1], "same_position_share": s}
            for d, v, a, s in (("hh_helpful", "base:0", 0.52, 0.9), ("hh_helpful", "base+cot:0", 0.57, 0.6))]
    page = labeler_report({"model": "m", "backend": "hf", "rows": rows}, tmp_path, "reward: {}\n")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 2 and "hh_helpful base+cot:0: 57.0%" in text
    assert (tmp_path / "plots" / "alignment.png").is_file() and (tmp_path / "plots" / "position_bias.png").is_file()
