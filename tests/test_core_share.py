"""pipeline.share_idle_cores: the core-share table (rlaif_ray/core_share.py), its hooks on a
real (tiny) model, the config field and the table's slots. The overlapped pipeline run with
the share on is in tests/test_pipeline.py."""
import os

import pytest
import torch

from rlaif_ray.config import ConfigError, config_from_dict, shares_idle_cores
from rlaif_ray.core_share import CoreShare, create_table, decoder_layers, remove_table, table_path


@pytest.fixture
def table():
    threads = torch.get_num_threads()
    path = create_table(table_path("test"))
    yield path
    remove_table(path)
    torch.set_num_threads(threads)
    assert not os.path.exists(path)


def share(path, slot, cores=2, floor=1, elastic=True):
    return CoreShare({"path": path, "slot": slot, "cores": cores}, floor, elastic)


def test_an_actor_alone_takes_the_idle_cores_and_gives_them_back(table):
    a, b = share(table, 0), share(table, 1)
    with a.computing():
        assert torch.get_num_threads() == 2 and a.view[0] == 2  # nobody else computes
        with b.computing():
            assert b.current == 1  # b never goes below its own threads, even on a full node
            assert a.acquire() == 1 and torch.get_num_threads() == 1  # a gives one back at its next layer
            assert list(a.view[:2]) == [1, 1]
        assert a.acquire() == 2  # b waits again
    assert list(a.view[:2]) == [0, 0]  # both idle
    assert torch.get_num_threads() == 1  # back to its own threads between calls: the table says 0
    assert 1.0 < a.threads_mean() < 2.0 and b.threads_mean() == 1.0
    assert a.changes >= 3


def test_the_share_stays_between_the_floor_and_the_cores(table):
    big, other = share(table, 0, cores=8, floor=2), share(table, 1, cores=8, floor=3, elastic=False)
    with big.computing():
        assert big.current == 8
        with other.computing():
            assert other.current == 3 and torch.get_num_threads() == 8  # not elastic: counted, threads kept
            assert big.acquire() == 5
            third = share(table, 2, cores=8, floor=4, elastic=False)
            with third.computing():
                assert big.acquire() == 2  # 3 + 4 of 8 taken: the floor, not 1
    big.close()
    assert big.view is None


def test_off_times_calls_and_keeps_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        off = CoreShare(None, 3)
        with off.computing():
            assert off.acquire() == 3 and torch.get_num_threads() == 1
        assert off.threads_mean() is None and off.busy_s > 0 and off.attach(torch.nn.Linear(2, 2)) == 0
    finally:
        torch.set_num_threads(threads)


def test_a_slot_outside_the_table_is_refused(table):
    with pytest.raises(ValueError, match="slot 256"):
        share(table, 256)
    with pytest.raises(ValueError, match="slot 3 outside 0..2"):
        CoreShare({"path": table, "slot": 3, "cores": 2, "slots": 3}, 1)


def test_hooks_retake_the_share_at_each_layer_forward_and_backward(table, tiny_model):
    import copy

    model = copy.deepcopy(tiny_model).train()
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 2
    a, b = share(table, 0), share(table, 1)
    assert a.attach(model) == 2
    seen = []

    def other_stops(module, args):  # after a's own hook on layer 0 (registered first)
        seen.append(a.current)
        b.view[1] = 0

    layers[0].register_forward_pre_hook(other_stops)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with a.computing():
        assert a.current == 2  # a starts alone
        b.view[1] = 1  # then b computes (as another process would mark it)
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        assert seen == [1] and a.current == 2  # layer 1's hook saw the freed core
        b.view[1] = 1  # b is back before a's backward
        loss.backward()
        assert a.current == 1  # a gradient hook gave the core back during backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_forward_and_backward_agree_at_one_and_two_threads(tiny_model):
    """Threads change during a run: the numbers must not depend on them beyond rounding (on
    the CPUs measured they were bitwise equal: docs in rlaif_ray/core_share.py)."""
    import copy

    threads = torch.get_num_threads()
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        model = copy.deepcopy(tiny_model).train()
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        out[n] = (logits.detach(), [p.grad for p in model.parameters()])
    torch.set_num_threads(threads)
    torch.testing.assert_close(out[1][0], out[2][0], rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(out[1][1], out[2][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def _cfg(**sections):
    data = {"rl": {"max_staleness": 1}, "ray": {}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def test_auto_shares_in_the_overlapped_mode_on_a_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert shares_idle_cores(_cfg())
    assert not shares_idle_cores(_cfg(rl={"max_staleness": 0}))  # each stage has every core already
    assert not shares_idle_cores(_cfg(ray={"address": "ray://head:10001"}))  # a node's cores are unknown
    assert shares_idle_cores(_cfg(rl={"max_staleness": 0}, pipeline={"share_idle_cores": True}))
    assert not shares_idle_cores(_cfg(pipeline={"share_idle_cores": False}))
    with pytest.raises(ConfigError, match="pipeline.share_idle_cores=true needs a local Ray"):
        _cfg(ray={"address": "ray://head:10001"}, pipeline={"share_idle_cores": True})
    with pytest.raises(ConfigError, match="pipeline.share_idle_cores"):
        _cfg(pipeline={"share_idle_cores": "sometimes"})


def test_every_actor_has_its_own_slot_and_gpu_pools_none():
    from rlaif_ray.commands.pipeline import share_spec

    cfg = _cfg(pipeline={"generators": {"num_actors": 2}, "labelers": {"num_actors": 2},
                         "learner": {"num_actors": 2}}, rl={"prompts_per_step": 2}, ray={"num_cpus": 2})
    slots = [share_spec(cfg, "/t", "generators", i)["slot"] for i in range(2)] + \
        [share_spec(cfg, "/t", "labelers", i)["slot"] for i in range(2)] + \
        [share_spec(cfg, "/t", "learner")["slot"] + r for r in range(2)] + [share_spec(cfg, "/t", "judge")["slot"]]
    assert slots == list(range(7))
    assert share_spec(cfg, "/t", "learner")["cores"] == 2 and share_spec(cfg, "/t", "judge")["slots"] == 7
    assert share_spec(cfg, None, "learner") is None
    gpu = _cfg(pipeline={"learner": {"num_gpus": 1}})
    assert share_spec(gpu, "/t", "learner") is None and share_spec(gpu, "/t", "generators") is not None
