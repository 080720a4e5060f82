"""Smoke test of every benchmark at tiny sizes (the tiny random model, 1 pair or round,
2 steps): each runs as `make bench` runs it (python -m benchmarks.X) and writes a
well-formed result. No timing assertions: timings belong in BENCHMARKS.md."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real Ray runs: about 2-3 minutes on 2 cores in all

ROOT = Path(__file__).resolve().parents[1]


def bench(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"benchmarks.{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def tiny_sets(model: str) -> list[str]:
    """--set pairs for a quickstart run on the tiny model (steps left to the caller)."""
    sets = [f"model.name={model}", "generation.max_new_tokens=4", "rl.samples_per_prompt=2",
            "reward.min_label_mass=0", "task.heldout_size=8"]
    return [x for s in sets for x in ("--set", s)]


def tiny(model: str) -> list[str]:
    return ["configs/quickstart.yaml", "--pairs", "1", *tiny_sets(model), "--set", "rl.steps=2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def overlap(results, tiny_model_path):
    bench("overlap", *tiny(tiny_model_path), "--out", str(results / "overlap.json"))
    return json.loads((results / "overlap.json").read_text())


@pytest.fixture(scope="module")
def overhead(results, tiny_model_path):
    bench("overhead", *tiny(tiny_model_path), "--out", str(results / "overhead.json"))
    return json.loads((results / "overhead.json").read_text())


@pytest.fixture(scope="module")
def scaling(results, overlap):
    bench("scaling", "--overlap", str(results / "overlap.json"), "--out", str(results / "scaling.json"))
    return json.loads((results / "scaling.json").read_text())


@pytest.fixture(scope="module")
def generation(results, tiny_model_path):
    bench("generation", "--model", tiny_model_path, "--backends", "hf,direct", "--rounds", "1", "--batch", "2",
          "--new-tokens", "4", "--out", str(results / "generation.json"))
    return json.loads((results / "generation.json").read_text())


@pytest.fixture(scope="module")
def memory(results):
    out = results / "memory.json"
    proc = bench("peak_memory", "--out", str(out), "--", sys.executable, "-c",
                 "import time; x = bytearray(64 * 2**20); time.sleep(2.5)")
    return json.loads(out.read_text()) if out.is_file() else json.loads(proc.stdout.strip().splitlines()[-1])


def check_common(r: dict) -> None:
    assert r["cpus"] >= 1 and len(r["load_before"]) == len(r["load_after"]) == 3 and r["time"]
    assert r["versions"]["python"] and r["versions"]["torch"] and r["versions"]["ray"]


def test_overlap(overlap):
    check_common(overlap)
    assert [r["max_staleness"] for r in overlap["runs"]] == [0, 1]
    assert positive(overlap["completions_per_s_staleness0"]) and positive(overlap["ratio_1_over_0"])
    for r in overlap["runs"]:
        assert r["completions"] == 2 * 2 * 2 and r["steps"] == 2 and positive(r["loop_s"])
        assert set(r["stage_s"]) == {"generator", "labeler", "learner"} and all(map(positive, r["stage_s"].values()))
        assert all(0 <= r["idle_share"][k] <= 1 and r["busy_share"][k] + r["idle_share"][k] == pytest.approx(1)
                   for k in r["stage_s"])
        assert r["slowest_stage"] in r["stage_s"] and positive(r["of_bound"])
        # the rate after step 1: step 2's 4 completions over the time from step 1's end to the loop's
        assert 0 < r["step1_s"] < r["loop_s"]
        assert r["completions_per_s_after_step1"] == pytest.approx(4 / (r["loop_s"] - r["step1_s"]))
    assert len(overlap["pair_ratios"]) == 1 and positive(overlap["ratio_after_step1"])


def test_overhead(overhead):
    check_common(overhead)
    from benchmarks.overhead import plain_variants

    # the plain loop on each allocator one process can choose: glibc, and jemalloc where Ray ships it
    assert [r["variant"] for r in overhead["runs"]] == ["ray", *plain_variants()]
    assert [r["allocator"] for r in overhead["runs"][1:]] == ["system", "jemalloc"][:len(plain_variants())]
    assert all(positive(v) for v in overhead["completions_per_s"].values())
    med = overhead["completions_per_s"]
    assert overhead["plain_baseline"] == max(plain_variants(), key=med.get)
    assert overhead["ratio_ray_over_plain"] == pytest.approx(med["ray"] / med[overhead["plain_baseline"]])
    assert isinstance(overhead["meets_target"], bool)
    for plain in overhead["runs"][1:]:
        assert plain["ray_imported"] is False and plain["completions"] == overhead["runs"][0]["completions"] == 8
    # same seeds, same functions, same thread counts: the same samples, rewards and losses
    assert overhead["max_abs_diff"]["reward_mean"] < 1e-4 and overhead["max_abs_diff"]["loss"] < 1e-4
    # the plain loop steers the KL weight as the driver does (rl.kl_control adaptive in the quickstart)
    assert overhead["max_abs_diff"]["beta"] < 1e-12 and len({*overhead["runs"][0]["beta"]}) == 2
    assert set(overhead["stage_s_per_step_median"]["ray"]) >= {"generator", "labeler", "learner", "loop"}
    assert all(map(positive, overhead["cpu_s_per_step_median"].values()))
    assert {"RolloutGenerator", "Labeler", "LearnerWorker", "driver"} <= set(overhead["runs"][0]["cpu_s_by_process"])

    # the plain loop switches to the learner actor's malloc settings before its step
    from benchmarks.overhead import LEARNER
    from rlaif_ray.cpu.allocator import GLIBC_LEARNER

    env = dict(GLIBC_LEARNER)
    assert LEARNER == (int(env["MALLOC_MMAP_THRESHOLD_"]), int(env["MALLOC_TRIM_THRESHOLD_"]))


def test_scaling(scaling):
    from rlaif_ray.run.scaling import StageTimes, throughput

    t = StageTimes(**scaling["stage_times"])
    assert positive(t.t_g) and positive(t.t_l) and positive(t.t_t) and t.t_s >= 0 and t.n == 4
    assert len(scaling["table"]) == 16 and all(positive(r["staleness_1"]) for r in scaling["table"])
    ck = scaling["check_g1_l1"]
    # the model's synchronous prediction at G = L = 1 reproduces the runs it was fitted on
    assert ck["predicted_per_s"]["0"] == pytest.approx(throughput(t), rel=1e-6)
    assert positive(ck["measured_over_predicted"]["1"])


def test_generation(generation):
    check_common(generation)
    assert set(generation["tokens_per_s"]) == {"hf", "direct"} and all(map(positive, generation["tokens_per_s"].values()))
    assert positive(generation["ratio_hf_actor_over_direct"])
    assert positive(generation["weight_update"]["hf"]["set_weights_and_install_wall_s"])
    assert generation["weight_dtype"] == {"hf": "float32"} and set(generation["cpu_bf16"]) == {
        "avx512_f", "avx512_bf16", "amx_bf16"}
    from rlaif_ray.engines.devices import vllm_dtype

    # what a vLLM run gets on this CPU
    assert generation["auto_variant"] == {"bfloat16": "vllm-bf16", "float32": "vllm-fp32"}[vllm_dtype("auto", "cpu")]


def test_labeling(results, tiny_model_path):
    out = results / "labeling.json"
    bench("labeling", "--model", tiny_model_path, "--pairs", "2", "--batch", "2", "--rounds", "1", "--out", str(out))
    r = json.loads(out.read_text())
    assert all(positive(v) for v in r["pairs_per_s"].values()) and math.isfinite(r["max_abs_diff_p_a"])
    assert len(r["load_before"]) == 3 and r["cpus"] >= 1


def test_peak_memory(memory):
    assert memory["exit_code"] == 0 and positive(memory["wall_s"]) and memory["command"].startswith(os.path.basename(sys.executable))
    assert memory["peak_rss_sum_gib"] >= 0.05 and positive(memory["peak_pss_sum_gib"])


@pytest.fixture(scope="module")
def weight_update(results, tiny_model_path):
    """Bucketed broadcast (10 KB buckets: dozens of them) and the object store, one update each."""
    bench("weight_update", "--model", tiny_model_path, "--buckets", "0.01", "--repeats", "1", "--backends", "hf",
          "--out", str(results / "weight_update.json"))
    return json.loads((results / "weight_update.json").read_text())


def test_weight_update(weight_update):
    r = weight_update
    assert {(s["receiver"], s["path"]) for s in r["summary"]} == {("generator-hf", "broadcast"),
                                                                   ("generator-hf", "object_store")}
    assert all(positive(s["wall_s"]) and s["extra_mb"] >= 0 for s in r["summary"])
    staged = next(s for s in r["summary"] if s["path"] == "object_store")["staged_payload_mb"]
    assert positive(staged)  # the object store stages a model copy; the broadcast does not


def test_report_renders_every_section(results, overlap, overhead, scaling, generation, memory, weight_update,
                                      tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    bench("report", "--results", str(results), "--out", str(out))
    text = out.read_text()
    for heading in ("## Pipeline overlap", "## Scaling model", "## Framework overhead",
                    "## Generation throughput", "## Peak memory", "## Weight updates", "## GPU",
                    "## History: one-off studies", "### Attention (`python -m benchmarks.attention`)"):
        assert heading in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("trl"), reason="trl not installed (.[trl] extra)")
def test_trl_compare(tiny_model_path, tmp_path):
    """rlaif-ray (HF generator) and TRL's GRPOTrainer, one step each on the tiny model."""
    results = tmp_path / "results"
    bench("trl_compare", "--systems", "rlaif-hf,trl", "--rounds", "1", "--steps", "1", "--new-tokens", "4",
          "--model", tiny_model_path, "--set", "task.heldout_size=8", "--out", str(results / "trl_compare.json"))
    r = json.loads((results / "trl_compare.json").read_text())
    check_common(r)
    assert r["versions"]["trl"] and [x["system"] for x in r["runs"]] == ["rlaif-hf", "trl"]
    for x in r["runs"]:
        assert x["steps"] == 1 and x["completions"] == 8 and positive(x["completions_per_s"])
        assert positive(x["peak_pss_gib"]) and positive(x["cpu_s_per_completion"]) and len(x["load_before"]) == 3
    assert r["runs"][0]["processes_at_peak"] > 3  # Ray's daemons and actors are in the sum
    ratio = r["ratios_over_trl"]["rlaif-hf"]
    assert positive(ratio["completions_per_s"]) and positive(ratio["peak_pss_gib"])
    n, total = map(int, r["settings"]["trl_prompts_same_token_ids"].split("/"))
    assert total == 4 and n == total  # TRL gets rlaif-ray's prompts, token for token
    out = tmp_path / "BENCHMARKS.md"
    bench("report", "--results", str(results), "--out", str(out))
    assert "## rlaif-ray vs TRL" in out.read_text() and not re.search(r"\bnan\b", out.read_text(), re.IGNORECASE)


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
                    reason="not a git checkout: the benchmark runs a git worktree of the earlier revision")
def test_quickstart_speed(tiny_model_path, tmp_path):
    """Before/after runs in one go; against the committed HEAD as `before` (a shallow clone
    has no older revision), every variant computes the same first step."""
    out = tmp_path / "quickstart_speed.json"
    bench("quickstart_speed", "--before", "HEAD", "--steps", "1", *tiny_sets(tiny_model_path), "--out", str(out))
    r = json.loads(out.read_text())
    check_common(r)
    assert [x["variant"] for x in r["runs"]] == ["before", "after-same-settings", "after-bundled"]
    for x in r["runs"]:
        assert x["steps"] == 1 and positive(x["completions_per_s"]) and positive(x["peak_pss_gib"])
    assert r["first_step_identical"], r["first_step_reward"]
    assert set(r["ratios_over_before"]) == {"after-same-settings", "after-bundled"}
    # the temporary worktree is gone again
    trees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "quickstart-speed-" not in trees


def test_lora(tiny_model_path, tmp_path):
    """LoRA against full fine-tuning: two 2-step runs on the tiny model, each under the sampler."""
    out = tmp_path / "lora.json"
    bench("lora", *tiny_sets(tiny_model_path), "--set", "rl.steps=2", "--set", "eval.num_prompts=2", "--set",
          "eval.signal_posts=0", "--r", "4", "--out", str(out), timeout=900)
    r = json.loads(out.read_text())
    full, lora = r["modes"]["full"], r["modes"]["lora"]
    assert 0 < lora["weight_update_bytes"] < full["weight_update_bytes"] and r["bytes_ratio"] < 0.2
    assert all(positive(m["learner_peak_rss_mib"]) and "heldout_reward" in m for m in (full, lora))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "lora.json").write_text(out.read_text())
    bench("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "BENCHMARKS.md"))
    assert "## LoRA against full fine-tuning" in (tmp_path / "BENCHMARKS.md").read_text()
