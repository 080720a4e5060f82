"""The throughput model of rlaif_ray/run/scaling.py (pure arithmetic)."""
import pytest

from rlaif_ray.run.scaling import StageTimes, bottleneck, stage_times, step_time, table, throughput

S = StageTimes(t_g=1.0, t_l=0.5, t_t=1.5, t_s=2.0, n=8)  # C = 8 + 4, U = 12 + 2


def test_synchronous_is_the_sum_of_the_stages():
    assert step_time(S) == pytest.approx(8 * 1.0 + 8 * 0.5 + 8 * 1.5 + 2.0)
    assert throughput(S, 2, 2) == pytest.approx(8 / (4 + 2 + 12 + 2))


def test_unbounded_staleness_is_the_slowest_stage():
    assert throughput(S, staleness=None) == pytest.approx(8 / 14)  # the learner: 12 + 2
    assert bottleneck(S) == "learner"
    slow_gen = StageTimes(t_g=4.0, t_l=0.6, t_t=0.1, t_s=0.0, n=8)
    assert bottleneck(slow_gen) == "generator" and bottleneck(slow_gen, 8, 1) == "labeler"
    assert throughput(slow_gen, 4, 1, None) == pytest.approx(min(4 / 4.0, 1 / 0.6, 1 / 0.1))


def test_one_batch_ahead_is_bounded_by_latency_and_stages():
    # d = 2: max(stage limits, (C + U) / 2) = max(8, 4, 14, 13) = 14
    assert step_time(S, staleness=1) == pytest.approx(14)
    fast_learner = StageTimes(t_g=1.0, t_l=1.0, t_t=0.1, t_s=0.0, n=10)
    assert step_time(fast_learner, staleness=1) == pytest.approx((20 + 1) / 2)  # latency-bound
    assert step_time(fast_learner, staleness=3) == pytest.approx(10)  # deep enough: the generator


def test_throughput_never_falls_as_pools_or_staleness_grow():
    for d in (0, 1, 2, None):
        xs = [throughput(S, g, g, d) for g in (1, 2, 4, 8)]
        assert xs == sorted(xs)
    assert throughput(S, 1, 1, 0) <= throughput(S, 1, 1, 1) <= throughput(S, 1, 1, None)


def test_labelers_beyond_the_generators_are_idle():
    assert throughput(S, 2, 8) == throughput(S, 2, 2)


def test_stage_times_from_a_synchronous_run():
    busy = {"generator-0": 40.0, "labeler-0": 20.0, "learner-0": 30.0}
    s = stage_times(busy, loop_s=100.0, completions=32, steps=4)
    assert (s.t_g, s.t_l, s.t_t, s.t_s, s.n) == (40 / 32, 20 / 32, 30 / 32, 10 / 4, 8)
    assert step_time(s) * 4 == pytest.approx(100.0)  # the model reproduces the run it came from
    two = stage_times({"generator-0": 20.0, "generator-1": 20.0, "labeler-0": 20.0, "learner-0": 30.0,
                       "learner-1": 29.0}, 100.0, 32, 4)
    assert two.t_g == 40 / 32 and two.t_t == 30 / 32  # pool work is summed; learner ranks run in parallel
    with pytest.raises(ValueError):
        stage_times(busy, 100.0, 0, 4)


def test_table_covers_every_pool_size():
    rows = table(S, sizes=(1, 2, 4))
    assert len(rows) == 9 and {"staleness_0", "staleness_1", "staleness_inf", "bottleneck"} <= set(rows[0])
    assert all(r["staleness_0"] <= r["staleness_1"] <= r["staleness_inf"] for r in rows)
