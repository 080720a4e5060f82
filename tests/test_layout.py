"""The pre-flight layout check and the weight-sync cost model: pure functions, no cluster."""
import pytest

from rlaif_ray.config import ConfigError, config_from_dict
from rlaif_ray.engines.weight_sync import sync_cost
from rlaif_ray.run.layout import bundle, check_layout, placement


def cfg(**pipeline):
    return config_from_dict({"rl": {"prompts_per_step": 8}, "pipeline": pipeline})


NODE_8GPU = {"CPU": 96, "GPU": 8, "memory": 1e12}


def test_a_layout_that_fits_passes():
    c = cfg(generators={"num_actors": 4, "num_gpus": 1}, labelers={"num_actors": 2, "num_gpus": 1},
            learner={"num_actors": 2, "num_gpus": 1})
    check_layout(c, NODE_8GPU, [NODE_8GPU])


def test_more_gpus_than_the_cluster_declares_is_refused_with_the_numbers():
    c = cfg(generators={"num_actors": 4, "num_gpus": 1}, labelers={"num_actors": 4, "num_gpus": 1},
            learner={"num_actors": 2, "num_gpus": 1})
    with pytest.raises(ConfigError, match=r"GPU: the layout needs 10 \(generators 4 x 1 \+ labelers 4 x 1 "
                                          r"\+ learner 2 x 1\) but the cluster declares 8"):
        check_layout(c, NODE_8GPU, [NODE_8GPU])


def test_declared_full_scale_resources_replace_the_live_ones():
    c = cfg(generators={"num_actors": 8, "num_gpus": 1}, learner={"num_actors": 8, "num_gpus": 1})
    check_layout(c, {"CPU": 800, "GPU": 64})  # e.g. pipeline.cluster_resources of an autoscaling cluster
    with pytest.raises(ConfigError, match="GPU: the layout needs 16"):
        check_layout(c, {"CPU": 8, "GPU": 8})


def test_an_actor_larger_than_any_node_is_refused():
    c = cfg(learner={"num_actors": 1, "num_gpus": 2})
    one_gpu_nodes = [{"CPU": 8, "GPU": 1}] * 4
    with pytest.raises(ConfigError, match=r"pipeline.learner: one actor needs \{CPU: 1, GPU: 2\}, more than any node"):
        check_layout(c, {"CPU": 32, "GPU": 4}, one_gpu_nodes)


def test_strict_pack_and_strict_spread_need_matching_nodes():
    nodes = [{"CPU": 8, "GPU": 2}] * 2
    packed = cfg(learner={"num_actors": 4, "num_gpus": 1, "placement": "STRICT_PACK"})
    with pytest.raises(ConfigError, match="STRICT_PACK puts all 4 actors"):
        check_layout(packed, {"CPU": 16, "GPU": 4}, nodes)
    spread = cfg(generators={"num_actors": 4, "num_cpus": 1, "placement": "STRICT_SPREAD"})
    with pytest.raises(ConfigError, match="STRICT_SPREAD needs 4 nodes .* the cluster has 2"):
        check_layout(spread, {"CPU": 16, "GPU": 4}, nodes)


def test_custom_resources_must_exist():
    c = cfg(generators={"num_actors": 2, "num_gpus": 1, "resources": {"rollout": 1}})
    with pytest.raises(ConfigError, match=r"rollout: the layout needs 2 \(generators 2 x 1\) but the cluster declares 0"):
        check_layout(c, NODE_8GPU, [NODE_8GPU])


def test_batch_sizes_that_do_not_divide_across_workers_are_refused():
    with pytest.raises(ConfigError, match=r"rl.prompts_per_step=6 does not divide across pipeline.learner.num_actors=4"):
        config_from_dict({"rl": {"prompts_per_step": 6}, "pipeline": {"learner": {"num_actors": 4}}})
    with pytest.raises(ConfigError, match=r"rl.prompts_per_step=5 does not divide across pipeline.generators.num_actors=2"):
        config_from_dict({"rl": {"prompts_per_step": 5}, "pipeline": {"generators": {"num_actors": 2}}})
    config_from_dict({"rl": {"prompts_per_step": 8}, "pipeline": {"learner": {"num_actors": 4}}})


def test_placement_defaults_and_bundles():
    c = cfg(learner={"num_actors": 2, "num_cpus": 0, "num_gpus": 1, "resources": {"trainer": 1}})
    assert placement("learner", c.pipeline.learner) == "PACK"
    assert placement("generators", c.pipeline.generators) == "SPREAD"
    assert bundle(c.pipeline.learner) == {"GPU": 1.0, "trainer": 1.0}  # zero amounts left out


def test_weight_sync_cost_model():
    # 7B parameters in bf16 = 14 GB; at 100 GB/s one hop takes 0.14 s
    c = sync_cost(7e9, 2, 100)
    assert c.bytes == 14e9 and c.seconds == pytest.approx(0.14)
    assert sync_cost(7e9, 2, 100, hops=3, latency_s=0.5).seconds == pytest.approx(0.92)


def _vllm(**pipeline):
    return config_from_dict({"rl": {"prompts_per_step": 8}, "generation": {"backend": "vllm"},
                             "reward": {"backend": "vllm"}, "pipeline": pipeline})


def test_vllm_engines_sharing_a_gpu_must_fit_its_memory():
    """Two engines on one GPU (num_gpus 0.5 each) at the default-like 0.9 would ask for 180%."""
    with pytest.raises(ConfigError, match=r"pipeline.generators: engines on 0.5 of a GPU .*"
                                          r"gpu_memory_utilization=0.9: 2 engines would ask for 180% of one GPU"):
        _vllm(generators={"num_actors": 2, "num_gpus": 0.5, "vllm": {"gpu_memory_utilization": 0.9}})
    _vllm(generators={"num_actors": 2, "num_gpus": 0.5, "vllm": {"gpu_memory_utilization": 0.45}})
    # the hf backend has no such setting to check
    config_from_dict({"rl": {"prompts_per_step": 8}, "pipeline": {"generators": {"num_gpus": 0.5}}})


def test_vllm_tensor_parallel_engines_hold_their_gpus():
    c = _vllm(labelers={"num_actors": 2, "num_gpus": 2, "vllm": {"tensor_parallel_size": 2}})
    assert bundle(c.pipeline.labelers) == {"CPU": 1.0, "GPU": 2.0}
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 needs pipeline.labelers.num_gpus=4"):
        _vllm(labelers={"num_gpus": 2, "vllm": {"tensor_parallel_size": 4}})
    with pytest.raises(ConfigError, match=r"num_gpus=2: a vLLM engine uses more than one GPU only with "
                                          r"vllm.tensor_parallel_size=2"):
        _vllm(generators={"num_gpus": 2})


def test_shared_gpus_never_put_two_nccl_members_on_one_gpu():
    """NCCL takes one GPU per member ("Duplicate GPU detected" otherwise): a fractional num_gpus
    with the broadcast path, or a learner group on shared GPUs, is one line at validation; auto
    sends the weights of a shared-GPU layout through the object store instead."""
    from rlaif_ray.config import broadcasts_weights

    shared = {"learner": {"num_gpus": 0.5}, "generators": {"num_gpus": 0.5}}
    with pytest.raises(ConfigError, match=r"weight_sync=broadcast runs NCCL, which takes one GPU per member, but "
                                          r"pipeline.generators.num_gpus=0.5 lets two members share a GPU"):
        cfg(**shared, weight_sync="broadcast")
    with pytest.raises(ConfigError, match=r"pipeline.learner.num_gpus=0.5 with num_actors=2: the learner's ranks "
                                          r"form an NCCL group"):
        cfg(learner={"num_actors": 2, "num_gpus": 0.5})
    assert not broadcasts_weights(cfg(**shared).pipeline)  # auto: the object store
    assert not broadcasts_weights(cfg(learner={"num_gpus": 1}, generators={"num_gpus": 0.5}).pipeline)
    assert broadcasts_weights(cfg(learner={"num_gpus": 1}, generators={"num_gpus": 1}).pipeline)
    assert not broadcasts_weights(cfg().pipeline)  # CPU: the object store unless asked
    assert broadcasts_weights(cfg(weight_sync="broadcast").pipeline)  # gloo on CPU: no GPU to share


def test_the_memory_plan_per_gpu_by_hand():
    """rlaif_ray/run/gpu_memory.py on a small shape: parameters, a learner rank's state,
    reference, activations and logits, an engine's weights, KV room and need."""
    from rlaif_ray.run import gpu_memory as gm

    s = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    P = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + 1000 * 64
    assert gm.param_count(s) == P
    assert gm.kv_bytes_per_token(s) == 2 * 2 * 2 * 16 * 2
    m = gm.learner_gib(s, ranks=2, tokens=100, checkpointing=True, reference=True, chunk=10)
    layer = 100 * (10 * 64 + 3 * 128) * 2
    assert m == pytest.approx({"state": 16 * P / 2 / 2**30, "reference": 2 * P / 2 / 2**30,
                               "activations": (100 * 64 * 2 * 2 + layer) / 2**30, "logits": 4 * 10 * 1000 * 4 / 2**30})
    e = gm.engine_gib(s, gpu_gib=10, share=0.5, tp=1, sequences=4, max_len=50)
    assert e == pytest.approx({"weights": 2 * P / 2**30, "kv_room": 5 - 2 * P / 2**30 - gm.ENGINE_RESERVE_GIB,
                               "kv_needed": 4 * 50 * 256 / 2**30})


def test_check_prints_the_memory_plan_of_each_gpu_pool(capsys):
    """`rlaif-ray check` on the shipped 8-GPU d-RLAIF config (its models' shapes are known
    without downloading them): a line per pool; none for a CPU config."""
    from pathlib import Path

    from rlaif_ray.commands.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(["check", str(root / "configs/gpu/tldr-d-rlaif-8gpu.yaml"), "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (estimates on 80 GiB GPUs" in out
    assert "learner: 4 GPU(s), per GPU 14.6 GiB of 80 (18%): state 5.8, reference 0.7" in out
    assert "generators: 2 x 1 GPU(s), per GPU 2.9 GiB of bf16 weights (Qwen/Qwen2.5-1.5B-Instruct)" in out
    assert "labelers: 2 x 1 GPU(s), per GPU 14.2 GiB of bf16 weights (Qwen/Qwen2.5-7B-Instruct)" in out
    assert main(["check", str(root / "configs/quickstart.yaml")]) == 0
    assert "memory per GPU" not in capsys.readouterr().out
    assert main(["check", str(root / "configs/quickstart.yaml"), "--gpu-gib", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: check --gpu-gib: must be a positive")
