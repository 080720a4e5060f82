"""Bucketed weight updates (rlaif_ray.engines.weight_sync) without Ray: rank 0 and a receiver in two
threads of one process on a gloo group, a bucket far smaller than the model (several
buckets), weights cast to the receiver's dtype at the source, loaded as they arrive."""
import threading

import pytest
import torch


def _group(store_port, rank, world, out, key):
    from rlaif_ray.engines import weight_sync

    out[key] = weight_sync.open_group("127.0.0.1", store_port, rank, world, "gloo", 60)


def _pair(world=2):
    from rlaif_ray.engines import weight_sync

    store = weight_sync.host_store("127.0.0.1", world, 60)
    out = {}
    threads = [threading.Thread(target=_group, args=(store.port, r, world, out, r)) for r in range(1, world)]
    for t in threads:
        t.start()
    out[0] = weight_sync.open_group("127.0.0.1", store.port, 0, world, "gloo", 60, store=store)
    for t in threads:
        t.join()
    return store, [out[r] for r in range(world)]


def test_plan_buckets_keeps_order_and_size():
    from rlaif_ray.engines.weight_sync import nbytes, plan_buckets

    spec = [("a", [10, 10], "float32"), ("b", [100], "float32"), ("c", [1000], "bfloat16"), ("d", [5], "float32")]
    plan = plan_buckets(spec, 800)
    assert [i for b in plan for i in b] == [0, 1, 2, 3]  # every tensor once, in order
    assert plan == [[0, 1], [2], [3]]  # 400 + 400 = 800 fits; c (2000 B) is a bucket of its own
    assert all(sum(nbytes(spec[i][1], spec[i][2]) for i in b) <= 800 for b in plan if len(b) > 1)


def test_buckets_are_cast_at_the_source_and_loaded_as_they_arrive(tiny_model_path):
    from rlaif_ray.config import RLConfig
    from rlaif_ray.engines import weight_sync
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.rl.learner import PolicyLearner

    learner = PolicyLearner(tiny_model_path, RLConfig(), 0.9)
    with torch.no_grad():
        for _, p in learner.named_weights():
            p.add_(0.01)  # the learner moved away from the receiver's weights
    receiver = HFEngine(tiny_model_path, dtype="bfloat16")  # a bf16 generator: the learner sends bf16
    spec = learner.weight_spec("bfloat16")
    total = sum(weight_sync.nbytes(s, d) for _, s, d in spec)
    bucket = 8 << 10  # the tiny model's layers are KBs; its embedding (3 MB) is a bucket of its own
    assert len(weight_sync.plan_buckets(spec, bucket)) >= 5

    seen = []

    def load(stream):
        def recorded():
            for name, t in stream:
                seen.append((name, t.dtype))
                yield name, t

        receiver.load_stream(recorded())

    store, (g0, g1) = _pair()
    box = {}
    rx = threading.Thread(target=lambda: box.update(r=weight_sync.receive_into(load, g1, spec, 5, "gen", bucket)))
    rx.start()
    sent = weight_sync.send_buckets(g0, learner.state_for_sync("bfloat16"), spec, 5, bucket)
    rx.join()
    assert sent["bytes"] == total and sent["largest_bucket"] <= max(bucket, max(weight_sync.nbytes(s, d)
                                                                                   for _, s, d in spec))
    assert seen == [(name, torch.bfloat16) for name, _, _ in spec]
    mine = dict(receiver.model.named_parameters())
    for name, full in learner.state_for_sync("bfloat16"):
        assert torch.equal(mine[name].detach(), full), name


def test_a_wrong_version_is_refused_before_loading_and_the_group_stays_in_step(tiny_model_path):
    from rlaif_ray.config import RLConfig
    from rlaif_ray.engines import weight_sync
    from rlaif_ray.rl.learner import PolicyLearner

    learner = PolicyLearner(tiny_model_path, RLConfig(), 0.9)
    spec = learner.weight_spec("float32")
    store, (g0, g1) = _pair()
    loads, errors = [], []

    def receive(version):
        try:
            weight_sync.receive_into(lambda s: loads.append(len(list(s))), g1, spec, version, "generator-0", 1 << 20)
        except weight_sync.WeightVersionError as e:
            errors.append(str(e))

    for sent_version, expected in ((2, 3), (3, 3)):
        rx = threading.Thread(target=receive, args=(expected,))
        rx.start()
        weight_sync.send_buckets(g0, learner.state_for_sync("float32"), spec, sent_version, 1 << 20)
        rx.join()
    assert errors == ["generator-0 expected weights version 3 but rank 0 sent version 2"]
    assert loads == [len(spec)]  # the refused version loaded nothing; the next one loaded every tensor

    with pytest.raises(weight_sync.WeightVersionError, match="rebuild the group"):
        rx = threading.Thread(target=lambda: weight_sync.send_buckets(g0, learner.state_for_sync("float32"), spec, 4,
                                                                      2 << 20))
        rx.start()
        try:
            weight_sync.receive_into(lambda s: list(s), g1, spec, 4, "generator-0", 1 << 20)
        finally:
            for _ in weight_sync.receive_stream(g1, spec, 2 << 20):  # drain, so the sender finishes
                pass
            rx.join()
