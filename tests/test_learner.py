"""The learner rank on its own (no Ray): memory options leave the update unchanged."""
import numpy as np
import pyarrow as pa
import pytest


def _batch():
    from rlaif_ray import schemas

    rows = []
    for k, (resp, reward) in enumerate([([4, 5, 6], 0.7), ([7, 8], -0.2), ([9, 10, 11, 12], 0.1), ([13], -0.6)]):
        rows.append({"prompt_id": f"p{k // 2}", "prompt_text": "x", "prompt_token_ids": [1, 2, 3, 17 + k],
                     "reference": None, "context": "c", "rollout_id": f"b0:p{k // 2}:{k % 2}", "batch_index": 0,
                     "sample_index": k % 2, "response_text": "y", "response_token_ids": resp,
                     "behaviour_logprobs": [-2.0] * len(resp), "policy_version": 0, "truncated": False,
                     "generator": "g", "reward": reward, "raw_score": 0.0, "reward_meta": "{}", "reward_ok": True})
    return pa.RecordBatch.from_pylist(rows, schema=schemas.SCORED)


def _weights(learner) -> dict:
    return {k: v.detach().numpy().copy() for k, v in learner.state_for_sync("float32")}


def test_gradient_checkpointing_gives_the_same_update(tiny_model_path):
    from rlaif_ray.config import RLConfig
    from rlaif_ray.learner import PolicyLearner

    out = []
    for checkpointing in (False, True):
        cfg = RLConfig(lr=1e-3, gradient_checkpointing=checkpointing, samples_per_prompt=2)
        learner = PolicyLearner(tiny_model_path, cfg, 0.9)
        stats = [learner.step(_batch().to_pylist(), 10, 4) for _ in range(2)]  # the second step uses AdamW state
        out.append((stats, _weights(learner)))
        assert all(p.grad is None for p in learner.policy.parameters())  # gradients are not held between steps
    (s0, w0), (s1, w1) = out
    assert [s["loss_sum"] for s in s0] == pytest.approx([s["loss_sum"] for s in s1], abs=1e-6)
    for k in w0:
        np.testing.assert_allclose(w0[k], w1[k], atol=1e-6, err_msg=k)
    untrained = _weights(PolicyLearner(tiny_model_path, RLConfig(), 0.9))
    assert any(not np.allclose(w0[k], v) for k, v in untrained.items())  # it trained


def test_the_learner_actor_gets_the_malloc_settings_and_the_job_env(ray_local, tiny_model_path, tmp_path):
    """The learner's own env vars are merged with the job's (HF_HUB_OFFLINE stays set); the
    malloc settings follow rl.release_memory."""
    import ray

    from rlaif_ray.config import config_from_dict
    from rlaif_ray.driver import release, start_learner

    names = ["MALLOC_MMAP_THRESHOLD_", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"]
    for release_memory, want in ((True, "65536"), (False, None)):
        cfg = config_from_dict({"model": {"name": tiny_model_path},
                                "rl": {"prompts_per_step": 2, "release_memory": release_memory},
                                "pipeline": {"learner": {"num_cpus": 0.25, "torch_threads": 2}}})
        learner = start_learner(cfg, "malloc")
        try:
            env = ray.get(learner.workers[0].env.remote(names))
            # OpenMP gets the role's torch threads (Ray would give a 0.25-CPU actor 1)
            assert env == {"MALLOC_MMAP_THRESHOLD_": want, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
        finally:
            ray.kill(learner.workers[0])
            release("malloc", ["learner"])
