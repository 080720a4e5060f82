"""The canonical chain on Ray Train and local Ray with tiny models: sft, train-rm (2 DDP
workers over gloo), train with reward.source: rm, sample-pairs and the whole `run`."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlaif_ray.config import config_from_dict

GOOD, BAD = ["yes", "good", "great", "fine"], ["no", "bad", "poor", "awful"]
FILLER = "the a of to in is it on that this with as for was at by an be".split()


def synthetic_pairs(n, seed, labels="ai"):
    """An easy preference: the better response ends in a 'good' word. The AI labels are
    soft (0.85 / 0.15); the held-out set carries the same preference as human labels."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = " ".join(rng.choices(FILLER, k=rng.randint(3, 8)) + [rng.choice(GOOD)])
        bad = " ".join(rng.choices(FILLER, k=rng.randint(3, 8)) + [rng.choice(BAD)])
        a_good = rng.random() < 0.5
        a, b = (good, bad) if a_good else (bad, good)
        row = {"id": f"syn-{seed}-{i}", "context": f"Which reply is better? (question {seed}-{i})",
               "response_a": a, "response_b": b,
               "human": "a" if a_good else "b", "error": None}
        if labels == "ai":
            row.update(p_a=0.85 if a_good else 0.15, human=None)
        rows.append(row)
    return rows


def chain_cfg(model, tmp_path, **sections):
    data = {
        "model": {"name": model},
        "task": {"max_prompt_tokens": 320, "heldout_size": 8},
        "generation": {"max_new_tokens": 6},
        "reward": {"min_label_mass": 0.0, "batch_size": 8},
        "rl": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": 1e-3},
        "pipeline": {"generators": {"num_cpus": 0.5}, "labelers": {"num_cpus": 0.5}, "learner": {"num_cpus": 0.5}},
        "eval": {"num_prompts": 2, "signal_posts": 0, "bootstrap": 20},
        "run": {"out_dir": str(tmp_path), "name": "c", "report": False},
        "sft": {"max_examples": 48, "heldout": 8, "batch_size": 8, "lr": 2e-3, "epochs": 2,
                "trainer": {"num_workers": 2, "num_cpus_per_worker": 0.5}},
        "rm": {"batch_size": 8, "lr": 3e-3, "epochs": 3, "max_tokens": 64, "eval_n": 60,
               "trainer": {"num_workers": 2, "num_cpus_per_worker": 0.5}},
        "label": {"pool_size": 1, "num_cpus": 0.5, "batch_size": 8},
        "sample_pairs": {"num_prompts": 8},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


@pytest.fixture(scope="module")
def trained_rm(ray_local, tiny_model_path, tmp_path_factory):
    """A reward model trained by `train-rm` on 2 Ray Train workers from 240 AI-labelled pairs."""
    from rlaif_ray.commands.train_rm import run_train_rm

    tmp = tmp_path_factory.mktemp("rm")
    labels = tmp / "labels"
    labels.mkdir()
    pq.write_table(pa.Table.from_pylist(synthetic_pairs(240, seed=1)), labels / "part-0.parquet")
    held = tmp / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(60, seed=2, labels="human")))
    cfg = chain_cfg(tiny_model_path, tmp, rm={"labels": str(labels), "eval_data": str(held)})
    return run_train_rm(cfg, tmp / "rm", log=lambda *_: None)


def test_train_rm_on_two_workers_learns_the_ai_preference(trained_rm):
    summary = json.loads((trained_rm / "rm_summary.json").read_text())
    hist = summary["history"]
    assert summary["pairs"] == 240 and summary["heldout_pairs"] == 60 and summary["label_kind"] == "soft"
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3] and hist[1]["steps"] == 30  # 240 / batch 8
    assert hist[-1]["heldout_accuracy"] >= 0.8 and hist[-1]["heldout_accuracy"] > hist[0]["heldout_accuracy"]
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (trained_rm / f).is_file()


def test_reward_model_data_keeps_held_out_contexts_out(tiny_model_path, tokenizer, tmp_path):
    """A training pair on the same context as a held-out pair is dropped and counted, whatever
    its id; bad held-out rows are counted too."""
    from rlaif_ray.rl.supervised import rm_data

    held = synthetic_pairs(20, seed=2, labels="human")
    for i, r in enumerate(held):
        r["context"] = f"held-out context {i}"
    held.append({"id": "bad", "context": "c", "response_a": "a", "response_b": "b", "human": "maybe"})
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    train_rows = synthetic_pairs(30, seed=1)
    train_rows[0]["context"] = "held-out  context 3"  # same text, other id and spacing
    (tmp_path / "labels").mkdir()
    pq.write_table(pa.Table.from_pylist(train_rows), tmp_path / "labels" / "p.parquet")
    cfg = chain_cfg(tiny_model_path, tmp_path, rm={"labels": str(tmp_path / "labels"), "eval_data": str(tmp_path / "held.jsonl")})
    train, heldout, counts = rm_data(cfg.rm, tokenizer)
    assert counts["dropped_heldout_overlap"] == 1 and len(train) == 29 and len(heldout) == 20
    assert counts["heldout_unusable"] == 1


def test_batch_that_does_not_divide_across_workers_is_refused(tiny_model_path, tmp_path):
    from rlaif_ray.commands.sft import run_sft
    from rlaif_ray.config import ConfigError

    cfg = chain_cfg(tiny_model_path, tmp_path, sft={"batch_size": 7})
    with pytest.raises(ConfigError, match=r"sft.batch_size=7 does not divide across sft.trainer.num_workers=2"):
        run_sft(cfg, tmp_path / "x", log=lambda *_: None)


def test_run_executes_the_whole_chain(s3, ray_local, tiny_model_path, tmp_path):
    """`rlaif-ray run` with run.out_dir on shared storage (an S3 server on loopback): sft (2 Ray
    Train workers, Ray Train's storage on the bucket) -> sample-pairs -> label -> train-rm ->
    train with the reward model's actor -> eval, every output in one folder of the bucket, each
    model handed to the next step by URI (the actors fetch it, as on another node). Along the
    way: SFT lowers the held-out loss and leaves a loadable model; the RL loop's rewards are the
    reward model's own scores of those responses (its actor never grades itself: a separate
    judge runs the win rate). SFT and the RM train in micro-batches of at most 150 tokens a
    worker (DDP's no_sync path)."""
    from actors.reward_model import RewardModel
    from rlaif_ray.commands.run_chain import run_chain
    from rlaif_ray.engines.models import load_model
    from rlaif_ray.remote_folder import StorageFolder, materialize
    from rlaif_ray.run.folder import read_rollouts

    micro = {"num_workers": 2, "num_cpus_per_worker": 0.5, "micro_batch_tokens": 150}
    cfg = chain_cfg(tiny_model_path, tmp_path, reward={"source": "pairwise"}, sft={"trainer": micro},
                    rm={"epochs": 1, "eval_data": "hh_helpful", "eval_n": 8, "trainer": micro},
                    eval={"num_prompts": 2, "win_rate": True}, run={"out_dir": f"{s3}/chains"})
    uri = f"{s3}/chains/one"
    assert run_chain(cfg, uri, log=lambda *_: None) == uri
    # Ray Train's storage is the bucket too: its runs and their checkpoints, beside sft/ and rm/
    assert any("checkpoint" in f and f.endswith("model.safetensors") for f in StorageFolder(f"{uri}/ray_train").files())
    folder = materialize(uri, tmp_path / "fetched")  # what the bucket holds, fetched for the checks below
    steps = json.loads((folder / "chain.json").read_text())
    assert [s["step"] for s in steps] == ["sft", "sample-pairs", "label", "train-rm", "train", "eval"]
    assert [s["output"] for s in steps if s["step"] in ("sft", "train-rm", "train")] == \
        [f"{uri}/sft", f"{uri}/rm", f"{uri}/train"]
    sft_uri, sft = f"{uri}/sft", folder / "sft"
    hist = json.loads((sft / "sft_summary.json").read_text())["history"]
    assert hist[-1]["heldout_loss"] < hist[0]["heldout_loss"] - 0.5
    assert load_model(str(sft)) is not None and (sft / "tokenizer.json").is_file()

    pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and all(p["policy"] == sft_uri for p in pairs)
    labels = pq.read_table(folder / "labels").to_pylist()
    assert len(labels) == 8 and all(r["p_a"] is not None for r in labels)
    rm_sum = json.loads((folder / "rm" / "rm_summary.json").read_text())
    assert rm_sum["pairs"] == 8 and rm_sum["init"] == sft_uri

    run = folder / "train"
    train_cfg = (run / "config.yaml").read_text()
    assert f"rm_path: {uri}/rm" in train_cfg and f"name: {sft_uri}" in train_cfg
    table = read_rollouts(run)
    assert table.num_rows == 2 * 2 * 2
    meta = json.loads(table.column("reward_meta")[0].as_py())
    assert meta["mode"] == "rm" and meta["labeler"] == "reward-model-0"
    local = RewardModel("check", str(folder / "rm"), max_tokens=cfg.rm.max_tokens)
    rows = table.slice(0, 3).to_pylist()
    assert local.score_texts([r["context"] for r in rows], [r["response_text"] for r in rows]) == \
        pytest.approx([r["reward"] for r in rows], abs=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert "reward-model-0" in summary["processes"] and "judge-0" in summary["processes"]
    assert summary["win_rate"]["n"] == 2

    ev = json.loads((folder / "eval" / "summary.json").read_text())
    assert ev["policy_b"] == sft_uri and ev["policy_a"] == f"{uri}/train/checkpoints/step_000002"


# quickstart-vllm.yaml trains (vLLM generators) in tests/test_vllm.py::test_train_with_vllm_generators;
# own-data-openai-judge.yaml against vLLM's server in tests/test_own_judge.py
CONFIGS = sorted(p.name for p in __import__("pathlib").Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")
                 if p.name not in ("quickstart-vllm.yaml", "own-data-openai-judge.yaml"))


# one step for each distinct path through the loop (task, reward source, scorer kind, pairwise
# prompt, baseline, KL control); the others are the same paths with other numbers, so each of
# them is validated as shipped but not trained: labeler.yaml (quickstart's path plus the label
# command's settings), rlhf-baseline.yaml (hh-helpful's without CoT), tldr-same-size.yaml
# (tldr-canonical's with another model size)
ONE_STEP = ["hh-harmless.yaml", "hh-helpful.yaml", "own-data-python-reward.yaml", "quickstart.yaml",
            "tldr-canonical.yaml", "tldr-d-rlaif.yaml"]


def test_every_config_validates_as_shipped():
    from pathlib import Path

    from rlaif_ray.config import load_config

    for name in CONFIGS + ["quickstart-vllm.yaml", "own-data-openai-judge.yaml"]:
        assert load_config(Path(__file__).parent.parent / "configs" / name).rl.steps >= 1, name
    assert set(ONE_STEP) <= set(CONFIGS)


@pytest.mark.parametrize("name", ONE_STEP)
def test_configs_run_one_step(name, ray_local, tiny_model_path, trained_rm, tmp_path):
    """A shipped config, shrunk (tiny model, one RL step) and trained."""
    from pathlib import Path

    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config
    from rlaif_ray.run.folder import read_metrics

    path = Path(__file__).parent.parent / "configs" / name
    overrides = [f"model.name={tiny_model_path}", "rl.steps=1", "rl.prompts_per_step=2", "generation.max_new_tokens=4",
                 "eval.num_prompts=2", "eval.signal_posts=0", "eval.bootstrap=10", "reward.min_label_mass=0", "reward.model=null",
                 f"run.out_dir={tmp_path}", "run.report=false", "ray.num_cpus=2"]
    overrides += [f"pipeline.{r}.num_actors=1" for r in ("generators", "labelers", "learner")]
    overrides += [f"pipeline.{r}.num_cpus=0.5" for r in ("generators", "labelers", "learner")]
    if load_config(path).reward.source == "rm":
        overrides.append(f"reward.rm_path={trained_rm}")
    cfg = load_config(path, overrides)
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert [m["step"] for m in read_metrics(run)] == [1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["win_rate"]["step"] == 1  # the config's own judge and prompt ran
    if cfg.eval.harmless_rate == "on":
        assert "harmless" in summary["win_rate"]
