"""The pipeline on a real local Ray with real actors and a tiny random model."""
import os
import time

import pyarrow as pa
import pytest

from rlaif_ray.config import config_from_dict
from rlaif_ray.data import schemas
from rlaif_ray.run.folder import read_metrics, read_rollouts


def tiny_cfg(model_path, out_dir, **sections):
    data = {
        "model": {"name": model_path},
        "task": {"max_prompt_tokens": 320, "heldout_size": 8},
        "generation": {"max_new_tokens": 6},
        # a random model puts ~0 probability on "Yes"/"No": accept every label in these tests
        "reward": {"scorer": "yesno_about_chat", "batch_size": 8, "min_label_mass": 0.0},
        "rl": {"steps": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": 1e-3, "max_staleness": 1},
        "pipeline": {"generators": {"num_cpus": 0.5}, "labelers": {"num_cpus": 0.5},
                     "learner": {"num_cpus": 0.5}, "sync_timeout_s": 60},
        "eval": {"num_prompts": 2, "signal_posts": 2},
        "run": {"out_dir": str(out_dir), "name": "t", "checkpoint_every": 2},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def test_overlapped_run_accounts_for_every_rollout(ray_local, tiny_model_path, tmp_path):
    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, eval={"every": 2})
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    import json

    summary = json.loads((run / "summary.json").read_text())
    pids = summary["processes"]
    assert len(set(pids.values())) == len(pids) == 3 and os.getpid() not in pids.values()
    assert set(summary["stage_busy_s"]) == set(pids) and all(v > 0 for v in summary["stage_busy_s"].values())

    metrics = read_metrics(run)
    assert [m["policy_version"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["staleness"] <= 1 for m in metrics)
    assert [m["staleness"] for m in metrics][1:] == [1, 1, 1]  # overlapped: trained one version behind

    table = read_rollouts(run)
    ids = table.column("rollout_id").to_pylist()
    assert len(ids) == len(set(ids)) == 4 * 2 * 2  # every generated rollout, exactly once
    assert set(ids) == {f"b{b}:{p}:{k}" for b, p, k in zip(table.column("batch_index").to_pylist(),
                                                           table.column("prompt_id").to_pylist(),
                                                           table.column("sample_index").to_pylist())}
    assert sorted(set(table.column("step_trained").to_pylist())) == [1, 2, 3, 4]
    for name in ("prompt_text", "response_text", "reward", "policy_version", "behaviour_logprob_sum"):
        assert name in table.column_names
    for step in (2, 4):
        ck = run / "checkpoints" / f"step_{step:06d}"
        assert (ck / "model.safetensors").is_file() and (ck / "optimizer.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert "heldout_before" in summary and "heldout_after" in summary and "signal" in summary
    # "did it learn?": the win rate against the initial policy, mid-run (eval.every) and at the end
    wr = [json.loads(x) for x in (run / "winrate.jsonl").read_text().splitlines()]
    assert [w["step"] for w in wr] == [2, 4] and summary["win_rate"] == wr[-1]
    assert all(w["n"] == 2 and w["ci95"][0] <= w["win_rate"] <= w["ci95"][1] for w in wr)
    assert (run / "eval" / "step_000004.parquet").is_file() and (run / "report.html").is_file()
    # TensorBoard event files carry the same numbers as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/reward_mean")] == pytest.approx([m["reward_mean"] for m in metrics])
    assert [e.step for e in events.Scalars("eval/win_rate")] == [2, 4]


@pytest.mark.parametrize("weight_sync,generators", [("object_store", 1), ("broadcast", 2)])
def test_synchronous_run_is_on_policy(ray_local, tiny_model_path, tmp_path, weight_sync, generators):
    """Either sync path (the broadcast one over a gloo group here, NCCL on GPUs) leaves
    every generator with exactly the learner's weights."""
    import ray

    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, rl={"max_staleness": 0, "steps": 3},
                   eval={"num_prompts": 0, "signal_posts": 0},
                   pipeline={"weight_sync": weight_sync, "generators": {"num_actors": generators, "num_cpus": 0.5}})
    metrics = read_metrics(train(cfg, tmp_path / "run", log=lambda *_: None))
    assert [m["staleness"] for m in metrics] == [0, 0, 0]
    # behaviour log-probs recorded by the generators match the learner's: ratio 1
    assert all(abs(m["ratio_mean"] - 1) < 1e-3 for m in metrics)
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]  # released


def test_actors_exchange_arrow_and_weights_reach_generators(ray_local, tiny_model_path, tmp_path):
    import ray

    from actors.pipeline import start_actors, sync_weights
    from actors.ray_session import release
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines.models import load_tokenizer

    cfg = tiny_cfg(tiny_model_path, tmp_path, reward={"source": "pairwise"})
    gens, labelers, learner = start_actors(cfg, "arrow")
    try:
        prompts = build_prompts(load_tldr()[:200], load_tokenizer(tiny_model_path), cfg.task)
        rollouts = ray.get(gens[0].generate.remote(prompt_batch(prompts.train[:2]), 0, 2, 0))
        assert isinstance(rollouts, pa.RecordBatch) and rollouts.schema.equals(schemas.ROLLOUT)
        scored = ray.get(labelers[0].score.remote(rollouts, "pairwise"))
        assert isinstance(scored, pa.RecordBatch) and scored.schema.equals(schemas.SCORED)
        r = scored.column("reward").to_pylist()
        assert r[0] == pytest.approx(-r[1], abs=1e-6)  # pairwise: the two samples share one preference
        v0, d0 = ray.get(gens[0].digest.remote())
        learner.train(scored, "token_mean")
        sync_weights(gens, learner.weights(), 1, timeout=60)
        v1, d1 = ray.get(gens[0].digest.remote())
        assert (v0, v1) == (0, 1) and d0 != d1
        # the generator now holds exactly the learner's weights
        w = ray.get(learner.weights())
        import numpy as np

        assert w["dtype"] == "float32"  # the generator's dtype on CPU (model.dtype auto)
        assert d1 == pytest.approx(sum(float(np.asarray(a, dtype=np.float64).sum()) for a in w["arrays"].values()),
                                   rel=1e-9)
        with pytest.raises(schemas.SchemaError, match="expected an Arrow RecordBatch"):
            ray.get(labelers[0].score.remote({"not": "arrow"}))
    finally:
        for a in gens + labelers + learner.workers:
            ray.kill(a)
        release(learner.tag)


def test_generator_computes_in_one_thread_and_stages_weights_meanwhile(ray_local, tiny_model_path):
    """Back-to-back batches all run in the default group's one thread (one OpenMP team:
    actors/generator.py), while set_weights answers from the control thread before they are
    done; the batches started after it carry the new version."""
    import ray

    from actors.generator import generator_actor
    from rlaif_ray.config import GenerationConfig
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines import weight_sync
    from rlaif_ray.engines.models import load_model, load_tokenizer

    gen = generator_actor().options(num_cpus=0, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}}).remote(
        "generator-threads", tiny_model_path, "float32", GenerationConfig(max_new_tokens=64).model_dump(), 2)
    try:
        prompts = build_prompts(load_tldr()[:200], load_tokenizer(tiny_model_path),
                                tiny_cfg(tiny_model_path, "unused").task).train
        payload = ray.put(weight_sync.pack(load_model(tiny_model_path).named_parameters(), "float32"))
        assert ray.get(gen.info.remote())["compute_threads"] == 0
        refs = [gen.generate.remote(prompt_batch(prompts[2 * i:2 * i + 2]), i, 4, i) for i in range(8)]
        ray.wait(refs[:1], timeout=120)  # the first batch done: the rest are queued or sampling
        assert ray.get(gen.set_weights.remote(payload, 1), timeout=30) == 1
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        # answered while batches were still to come; with two unfinished, the last had not started
        # (one compute call at a time), so it installs version 1
        assert len(refs) - len(ready) >= 2
        versions = [set(b.column("policy_version").to_pylist()) for b in ray.get(refs)]
        assert versions[0] == {0} and versions[-1] == {1}
        info = ray.get(gen.info.remote())
        assert info["version"] == 1 and info["compute_threads"] == 1
    finally:
        ray.kill(gen)


def test_weight_sync_timeout_names_the_actor(ray_local):
    import ray

    from actors.pipeline import WeightSyncTimeout, sync_weights

    class _DeafGenerator:  # defined here so Ray ships it by value to the worker
        def set_weights(self, weights, version):
            time.sleep(30)

    deaf = ray.remote(_DeafGenerator).options(num_cpus=0).remote()
    t0 = time.time()
    with pytest.raises(WeightSyncTimeout, match=r"version 7 .* within 2s by \['generator-deaf'\]"):
        sync_weights([deaf], ray.put({}), 7, timeout=2, names=["generator-deaf"])
    assert time.time() - t0 < 15
    ray.kill(deaf)


def test_two_learner_workers_match_one(ray_local, tiny_model_path, tmp_path):
    """An FSDP group of 2 gloo ranks gives the same update as 1 worker (through Ray), and its
    sharded checkpoint resumes in a new group of 2."""
    import numpy as np
    import ray

    from actors.learner import LearnerGroup, LearnerWorker
    from actors.pipeline import start_actors
    from actors.ray_session import release
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines.models import load_tokenizer

    cfg = tiny_cfg(tiny_model_path, tmp_path, pipeline={"learner": {"num_cpus": 0.25}})
    gens, labelers, learner1 = start_actors(cfg, "grad")
    learners = []
    try:
        prompts = build_prompts(load_tldr()[:200], load_tokenizer(tiny_model_path), cfg.task)
        batch = ray.get(labelers[0].score.remote(gens[0].generate.remote(prompt_batch(prompts.train[:4]), 0, 2, 0)))
        kw = dict(model_name=tiny_model_path, dtype="float32", rl_cfg=cfg.rl.model_dump(), temperature=0.9,
                  torch_threads=1)
        learner2 = LearnerGroup(ray.remote(LearnerWorker), 2, {"num_cpus": 0.25}, "grad2", **kw)
        learners.append(learner2)
        s1 = learner1.train(batch, "token_mean")
        s2 = learner2.train(batch, "token_mean")
        assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5) and s1["kl"] == pytest.approx(s2["kl"], abs=1e-6)
        w1, w2 = (ray.get(x.weights())["arrays"] for x in (learner1, learner2))
        for k in w1:
            np.testing.assert_allclose(w1[k], w2[k], atol=1e-6, err_msg=k)
        # a run's intermediate checkpoint of the group: each rank's DCP shard, no full weights;
        # a new group of 2 reads it back, each rank its own part
        ck = tmp_path / "ck"
        learner2.save(str(ck), {"step": 1}, hf_weights=False)
        assert (ck / "dcp" / ".metadata").is_file() and not (ck / "model.safetensors").exists()
        for a in learner2.workers:  # their CPUs go to the new group
            ray.kill(a)
        learners.append(LearnerGroup(ray.remote(LearnerWorker), 2, {"num_cpus": 0.25}, "grad3", **kw))
        learners[-1].load(str(ck))
        w3 = ray.get(learners[-1].weights())["arrays"]
        for k in w2:
            np.testing.assert_allclose(w3[k], w2[k], atol=0, err_msg=k)
    finally:
        for a in gens + labelers + learner1.workers + [w for g in learners for w in g.workers]:
            ray.kill(a)
        release("grad")


def test_broadcast_group_checks_versions_and_placement(ray_local, tiny_model_path, tmp_path):
    """Rank 0 broadcasts over a group of its own; a receiver told another version refuses
    (naming itself) and the group stays usable; the object-store path checks versions too.
    The roles sit in their placement groups: learner PACK, generators SPREAD."""
    import numpy as np
    import ray

    from actors.pipeline import broadcast_weights, form_weight_group, start_actors, sync_weights
    from actors.ray_session import release
    from rlaif_ray.engines.weight_sync import WeightVersionError

    cfg = tiny_cfg(tiny_model_path, tmp_path, pipeline={"learner": {"num_cpus": 0.25}, "labelers": {"num_cpus": 0.25},
                                                        "generators": {"num_actors": 2, "num_cpus": 0.25}})
    gens, labelers, learner = start_actors(cfg, "bcast")
    try:
        table = {g["name"]: g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"}
        assert table["learner@bcast"]["strategy"] == "PACK" and table["generators@bcast"]["strategy"] == "SPREAD"
        assert table["generators@bcast"]["bundles"] == {0: {"CPU": 0.25}, 1: {"CPU": 0.25}}
        w0 = learner.workers[0]
        mb = 0.01  # 10 KB buckets: the tiny model travels in dozens of them
        form_weight_group(w0, gens, "cpu", timeout=60, bucket_mb=mb)
        broadcast_weights(learner.workers, gens, 1, timeout=60, bucket_mb=mb)
        want = sum(float(np.asarray(a, dtype=np.float64).sum()) for a in ray.get(learner.weights())["arrays"].values())
        for v, d in ray.get([g.digest.remote() for g in gens]):
            assert v == 1 and d == pytest.approx(want, rel=1e-9)

        late = [w0.broadcast_weights.remote(2, "float32", int(mb * 2**20))] + [g.receive_weights.remote(3) for g in gens]
        with pytest.raises(WeightVersionError, match="generator-0 expected weights version 3 but rank 0 sent version 2"):
            ray.get(late[1])
        broadcast_weights(learner.workers, gens, 3, timeout=60, bucket_mb=mb)  # still in step
        assert [v for v, _ in ray.get([g.digest.remote() for g in gens])] == [3, 3]

        # object store: an update older than what a generator holds is refused by the driver
        with pytest.raises(WeightVersionError, match=r"version 2: generator-0 holds version 3, generator-1 holds version 3"):
            sync_weights(gens, learner.weights(), 2, timeout=60)
    finally:
        for a in gens + labelers + learner.workers:
            ray.kill(a)
        release("bcast")
    assert not [g for g in ray.util.placement_group_table().values()
                if g["name"].endswith("@bcast") and g["state"] != "REMOVED"]


def test_a_broadcast_that_times_out_names_the_member_and_a_new_group_works(ray_local, tiny_model_path, tmp_path):
    """One generator never joins the collective: the wait names it, the members inside the
    stuck broadcast fail at the group's own timeout (no hang), and a re-formed group works."""
    import ray

    from actors.pipeline import WeightSyncTimeout, broadcast_weights, form_weight_group, start_actors
    from actors.ray_session import release

    cfg = tiny_cfg(tiny_model_path, tmp_path, pipeline={"learner": {"num_cpus": 0.25}, "labelers": {"num_cpus": 0.25},
                                                        "generators": {"num_actors": 2, "num_cpus": 0.25}})
    gens, labelers, learner = start_actors(cfg, "stuck")
    try:
        w0 = learner.workers[0]
        form_weight_group(w0, gens, "cpu", timeout=5, bucket_mb=0.01)
        # generator-1 is never told: rank 0 and generator-0 wait for it inside the collective,
        # and the driver's wait names both
        with pytest.raises(WeightSyncTimeout, match=r"within 3s by \['learner-0', 'generator-0'\]"):
            broadcast_weights(learner.workers, gens[:1], 1, timeout=3, names=["generator-0"], bucket_mb=0.01)
        t0 = time.time()
        form_weight_group(w0, gens, "cpu", timeout=60, bucket_mb=0.01)  # queued behind the stuck calls
        broadcast_weights(learner.workers, gens, 1, timeout=60, bucket_mb=0.01)
        assert time.time() - t0 < 45  # the stuck collective failed at its 5 s timeout instead of hanging
        assert [v for v, _ in ray.get([g.digest.remote() for g in gens])] == [1, 1]
    finally:
        for a in gens + labelers + learner.workers:
            ray.kill(a)
        release("stuck")


def test_an_impossible_layout_is_refused_before_any_actor_starts(ray_local, tiny_model_path, tmp_path):
    import ray

    from rlaif_ray.commands.train import train
    from rlaif_ray.config import ConfigError

    before = set(ray.util.list_named_actors())
    cfg = tiny_cfg(tiny_model_path, tmp_path, pipeline={"generators": {"num_actors": 2, "num_gpus": 1}})
    with pytest.raises(ConfigError, match=r"GPU: the layout needs 2 \(generators 2 x 1\) but the cluster declares 0"):
        train(cfg, tmp_path / "run", log=lambda *_: None)
    assert set(ray.util.list_named_actors()) == before
