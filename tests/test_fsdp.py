"""The FSDP learner group on CPU (gloo, 2 processes, no Ray): the same batch gives the same
loss and the same updated weights as one unsharded rank; its checkpoint holds full weights
that `from_pretrained` loads, and a 2-rank checkpoint resumes exactly on 1 rank."""
import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_learner import _batch, _batch4, _weights

CFG = dict(lr=1e-3, samples_per_prompt=2, seed=3)


def _rows(rl: dict) -> list[dict]:
    """The batch: _batch, or with micro-batches _batch4 (4 prompts)."""
    return _batch4() if rl.get("micro_batch_tokens") else _batch().to_pylist()


def _shards(rows):
    """What LearnerGroup.shard gives 2 ranks: one prompt each; or (4 prompts) p0, p1 on rank 0
    (26 tokens) and the longer q0, q1 on rank 1 (36)."""
    if len(rows) > 4:
        return [[r for r in rows if r["prompt_id"].startswith(p)] for p in ("p", "q")]
    return [[r for r in rows if r["prompt_id"] == p] for p in ("p0", "p1")]


def _tokens(rows):
    return sum(len(r["response_token_ids"]) for r in rows)


def _rank(rank: int, world: int, port: int, model: str, out: str, rl: dict) -> None:
    import torch.distributed as dist

    from rlaif_ray.rl import learner as learner_module
    from rlaif_ray.rl.learner import PolicyLearner

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    reads, load_model = [], learner_module.load_model
    learner_module.load_model = lambda *a, **kw: (reads.append(a[0]), load_model(*a, **kw))[1]
    chunk = rl.pop("logprob_chunk", None)  # the LM head's positions per chunk (the scorer's, not RLConfig's)
    save_to, hf_weights = rl.pop("save_to", None) or Path(out) / "ckpt", rl.pop("hf_weights", True)
    learner = PolicyLearner(model, rl, 0.9)
    # the policy and the reference read from their files on rank 0 only (the others: meta, then rank 0's)
    assert len(reads) == (2 if rank == 0 else 0), reads
    if chunk:
        learner.policy.logprob_chunk = chunk
    assert learner.sharded and type(next(learner.policy.parameters())).__name__ == "DTensor"
    rows = _rows(rl)
    stats = [learner.step(_shards(rows)[rank], _tokens(rows), len(rows)) for _ in range(2)]
    weights = _weights(learner)  # a collective: every rank gathers
    learner.save(save_to, {"step": 2}, hf_weights)
    if rank == 0:
        np.savez(Path(out) / "weights.npz", **weights)
    Path(out, f"stats{rank}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def _two_ranks(model: str, out: Path, rl: dict) -> list[list[dict]]:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)  # the ranks find it on its port
    mp.start_processes(_rank, args=(2, store.port, model, str(out), rl), nprocs=2, start_method="spawn")
    return [json.loads((out / f"stats{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # two gloo processes
@pytest.mark.parametrize("rl", [dict(CFG, gradient_checkpointing=True), dict(CFG, baseline="value"),
                                # rank 0's shard fits 30 tokens, rank 1's needs 2 passes: both run 2
                                dict(CFG, baseline="value", micro_batch_tokens=30),
                                # the LM head 2 positions at a time, each chunk recomputed in FSDP's backward
                                dict(CFG, gradient_checkpointing=True, logprob_chunk=2),
                                # two optimizer steps a batch; advantages whitened over both ranks' tokens
                                dict(CFG, algorithm="ppo", epochs=2)],
                         ids=["group_mean+checkpointing", "value_baseline", "micro_batches", "chunked_head", "ppo"])
def test_two_gloo_ranks_match_one_rank_and_resume_on_one(tiny_model_path, tmp_path, rl):
    from transformers import AutoModelForCausalLM

    from rlaif_ray.rl.learner import PolicyLearner

    sharded = _two_ranks(tiny_model_path, tmp_path, rl)
    rl = {k: v for k, v in rl.items() if k != "logprob_chunk"}  # the one rank: all positions at once
    one = PolicyLearner(tiny_model_path, {**rl, "gradient_checkpointing": False, "micro_batch_tokens": 0}, 0.9)
    assert not one.sharded
    rows = _rows(rl)
    single = [one.step(rows, _tokens(rows), len(rows)) for _ in range(2)]
    if rl.get("micro_batch_tokens"):
        assert [[s["micro_batches"] for s in r] for r in sharded] == [[2, 2], [2, 2]]
    for step in range(2):  # the ranks' loss sums add up to the one-rank loss of the whole batch
        for key in ("loss_sum", "pg_loss_sum", "kl_sum", "tokens"):
            assert sum(s[step][key] for s in sharded) == pytest.approx(single[step][key], abs=1e-5), key
        assert sharded[0][step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4)
    w2 = dict(np.load(tmp_path / "weights.npz"))
    w1 = _weights(one)
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-6, err_msg=k)

    # the checkpoint holds each rank's DCP shard, and full weights that transformers loads on its own
    ckpt = tmp_path / "ckpt"
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= {
        p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")}
    assert not list(tmp_path.glob(".ckpt*"))  # the temp folder became ckpt
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)
    for k, v in loaded.named_parameters():
        if k in w1:
            np.testing.assert_allclose(v.detach().numpy(), w1[k], atol=1e-6, err_msg=k)

    # resume the 2-rank checkpoint on 1 rank (DCP reshards): the next step equals the uninterrupted run's
    resumed = PolicyLearner(tiny_model_path, {**rl, "gradient_checkpointing": False}, 0.9)
    resumed.load(ckpt)
    a = resumed.step(rows, _tokens(rows), len(rows))
    b = one.step(rows, _tokens(rows), len(rows))
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], abs=1e-5)
    wa, wb = _weights(resumed), _weights(one)
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, err_msg=k)


@pytest.mark.slow  # two gloo processes and an S3 server
def test_sharded_checkpoint_on_s3_resumes_on_one_rank(s3, tiny_model_path, tmp_path):
    """Two FSDP ranks write a run's intermediate checkpoint to s3:// as DCP shards (no gather,
    no HF weights): each rank uploads its own shard, rank 0 the metadata and trainer_state.json
    last, and nothing stays in their staging folders. One rank fetches it and resumes with the
    2-rank run's weights."""
    from rlaif_ray.remote_folder import StorageFolder, staging_root
    from rlaif_ray.rl.learner import PolicyLearner
    from rlaif_ray.run.folder import STATE_KEYS, read_checkpoint_state

    uri = f"{s3}/fsdp/checkpoints/step_000002"
    _two_ranks(tiny_model_path, tmp_path, dict(CFG, save_to=uri, hf_weights=False))
    files = StorageFolder(uri).files()
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "trainer_state.json"} <= set(files)
    assert not any(f.endswith("model.safetensors") for f in files)  # no full gather before the run's end
    state = json.loads(StorageFolder(uri).read_bytes("trainer_state.json"))
    assert state["optimizer_meta"]["format"] == "dcp" and state["files"] == {k: v for k, v in files.items()
                                                                             if k != "trainer_state.json"}
    # what the driver checks before `latest` names it (a run's state has every key; this one only step)
    StorageFolder(uri).write_bytes("trainer_state.json", json.dumps(
        {**{k: 0 for k in STATE_KEYS}, **state, "step": 2}).encode())
    assert read_checkpoint_state(uri) == (json.loads(StorageFolder(uri).read_bytes("trainer_state.json")), None)
    assert not [p for p in staging_root().rglob("*") if p.is_file() and "fsdp" in str(p)]

    one = PolicyLearner(tiny_model_path, CFG, 0.9)
    one.load(uri)
    w2, w1 = dict(np.load(tmp_path / "weights.npz")), _weights(one)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], atol=1e-6, err_msg=k)
    assert one.steps == 2 and one.opt.state  # the AdamW moments came back too
    fetched = [p for p in staging_root().rglob("*") if p.is_file() and "fsdp" in str(p) and p.suffix != ".lock"]
    assert not fetched  # the fetched copy went (an empty lock file of the per-node fetch stays)


def test_load_is_strict(tiny_model_path, tmp_path):
    """A checkpoint with a tensor missing is refused, not half-loaded."""
    from safetensors.torch import load_file, save_file

    from rlaif_ray.rl.learner import PolicyLearner

    learner = PolicyLearner(tiny_model_path, CFG, 0.9)
    learner.save(tmp_path / "c", {"step": 0})
    weights = load_file(str(tmp_path / "c" / "model.safetensors"))
    weights.pop("model.norm.weight")
    save_file(weights, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        PolicyLearner(tiny_model_path, CFG, 0.9).load(tmp_path / "c")


def _slow_read_rank(rank: int, world: int, port: int, model: str, ckpt: str, out: str) -> None:
    """A rank of a group whose collectives time out after 3 s, resuming while rank 0's read of
    the checkpoint takes 6 s (as a 7B checkpoint's ~90 GB would take minutes)."""
    import time

    import torch.distributed as dist

    from rlaif_ray.rl import learner as learner_module

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=3))
    read = learner_module.read_model_weights
    learner_module.read_model_weights = lambda path: (time.sleep(6), read(path))[1]
    learner = learner_module.PolicyLearner(model, CFG, 0.9, store=store)
    learner.load(ckpt)
    weights = _weights(learner)
    if rank == 0:
        np.savez(Path(out) / "resumed.npz", **weights)
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_ranks_wait_for_rank0s_checkpoint_read_outside_any_collective(tiny_model_path, tmp_path):
    """While rank 0 reads a checkpoint the other ranks wait on the group's TCP store: a
    collective would time out (NCCL's watchdog would abort the process). Both ranks then
    hold the checkpoint's weights."""
    import torch.distributed as dist

    from rlaif_ray.rl.learner import PolicyLearner

    one = PolicyLearner(tiny_model_path, CFG, 0.9)
    rows = _batch().to_pylist()
    one.step(rows, _tokens(rows), len(rows))
    one.save(tmp_path / "ckpt", {"step": 1})
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    mp.start_processes(_slow_read_rank, args=(2, store.port, tiny_model_path, str(tmp_path / "ckpt"), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    resumed, saved = dict(np.load(tmp_path / "resumed.npz")), _weights(one)
    for k in saved:
        np.testing.assert_allclose(resumed[k], saved[k], atol=1e-6, err_msg=k)


def _failing_rank0_rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    """A rank of a 2-rank group saving a sharded checkpoint whose rank 0 hits a full disk while
    it finishes the checkpoint: each rank records what it raised."""
    import errno

    import torch.distributed as dist

    from rlaif_ray.rl.learner import PolicyLearner

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    learner = PolicyLearner(model, CFG, 0.9, store=store)

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    learner._finish_sharded = full_disk
    try:
        learner.save(Path(out) / "ckpt", {"step": 1}, hf_weights=False)
        raised = "nothing"
    except Exception as err:  # noqa: BLE001 - what each rank saw is the test's record
        raised = f"{type(err).__name__}: {err}"
    Path(out, f"raised{rank}.txt").write_text(raised)
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_a_sharded_checkpoint_that_rank0_cannot_finish_fails_on_every_rank(tiny_model_path, tmp_path):
    """Rank 0's OSError (a full disk) reaches every rank at once (no rank waits in a collective
    for a rank 0 that gave up), and no checkpoint folder, whole or partial, is left."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    mp.start_processes(_failing_rank0_rank, args=(2, store.port, tiny_model_path, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    assert (tmp_path / "raised0.txt").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp_path / "raised1.txt").read_text().startswith("RuntimeError: checkpoint ")
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))
