"""Adaptive KL control (issue 21 item 3): the controller of Ziegler et al. 2019 (rl.adaptive_kl_beta),
its config, the learner's per-step beta, the Pipeline's controller state across checkpoints,
and the KL columns of metrics.jsonl. No Ray."""
import math
from collections import deque

import numpy as np
import pytest

from rlaif_ray.config import ConfigError, config_from_dict
from rlaif_ray.rl.losses import adaptive_kl_beta


def _odds(beta: float) -> float:
    return beta / (1 - beta)


# ---- the controller ---------------------------------------------------------------------------

def test_kl_above_target_raises_beta_below_lowers_it_at_target_keeps_it():
    beta = 0.05
    up = adaptive_kl_beta(beta, kl=7.0, target=6.0, horizon=100, n_steps=8)
    down = adaptive_kl_beta(beta, kl=5.0, target=6.0, horizon=100, n_steps=8)
    assert up > beta > down
    assert adaptive_kl_beta(beta, kl=6.0, target=6.0, horizon=100, n_steps=8) == beta
    # the update, on the KL's weight relative to the reward's (c = beta / (1 - beta))
    assert _odds(up) == pytest.approx(_odds(beta) * (1 + (7 / 6 - 1) * 8 / 100), rel=1e-12)
    assert _odds(down) == pytest.approx(_odds(beta) * (1 + (5 / 6 - 1) * 8 / 100), rel=1e-12)


def test_the_error_is_clipped_at_20_percent():
    beta, h, n = 0.1, 50, 10
    at_clip_up = adaptive_kl_beta(beta, 1.2 * 6, 6.0, h, n)
    at_clip_down = adaptive_kl_beta(beta, 0.8 * 6, 6.0, h, n)
    assert _odds(at_clip_up) == pytest.approx(_odds(beta) * (1 + 0.2 * n / h), rel=1e-12)
    assert _odds(at_clip_down) == pytest.approx(_odds(beta) * (1 - 0.2 * n / h), rel=1e-12)
    for far in (7.3, 60.0, 1e9, float("inf")):  # any KL beyond +20% moves it as +20% does
        assert adaptive_kl_beta(beta, far, 6.0, h, n) == pytest.approx(at_clip_up, rel=1e-12)
    for low in (4.7, 0.0, -3.0):  # k1's per-sequence estimate can be negative
        assert adaptive_kl_beta(beta, low, 6.0, h, n) == pytest.approx(at_clip_down, rel=1e-12)


def test_the_step_scales_with_completions_over_horizon():
    beta, kl, target = 0.05, 6.6, 6.0  # e = +0.1
    moves = {(n, h): _odds(adaptive_kl_beta(beta, kl, target, h, n)) / _odds(beta) - 1
             for n, h in ((8, 10000), (16, 10000), (8, 5000), (8, 8))}
    assert moves[(8, 10000)] == pytest.approx(0.1 * 8 / 10000, rel=1e-9)
    assert moves[(16, 10000)] == pytest.approx(2 * moves[(8, 10000)], rel=1e-9)  # twice the completions
    assert moves[(8, 5000)] == pytest.approx(2 * moves[(8, 10000)], rel=1e-9)  # half the horizon
    assert moves[(8, 8)] == pytest.approx(0.1, rel=1e-9)  # one step as long as the horizon: the whole error
    assert adaptive_kl_beta(beta, kl, target, 100, 0) == beta  # nothing measured, no move


def test_beta_stays_inside_0_1_and_steers_the_kl_to_target():
    """Many steps at a KL far above target take beta toward 1, never past it; on a toy
    policy whose KL falls as its weight grows (KL = 3 / c) the loop settles at the target."""
    beta = 0.5
    for _ in range(500):
        beta = adaptive_kl_beta(beta, 100.0, 6.0, 10, 10)
        assert 0 < beta < 1
    assert beta > 0.999
    beta, kls = 0.05, []
    for _ in range(400):
        kl = 3 / _odds(beta)
        kls.append(kl)
        beta = adaptive_kl_beta(beta, kl, 6.0, 64, 8)
    assert kls[0] > 50 and kls[-1] == pytest.approx(6.0, rel=1e-3)


def test_the_controller_refuses_what_it_cannot_do():
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="0 < beta < 1"):
            adaptive_kl_beta(beta, 6.0, 6.0, 100, 8)
    with pytest.raises(ValueError, match="n_steps <= horizon"):
        adaptive_kl_beta(0.05, 6.0, 6.0, 4, 8)
    with pytest.raises(ValueError, match="target > 0"):
        adaptive_kl_beta(0.05, 6.0, 0.0, 100, 8)
    assert adaptive_kl_beta(0.05, float("nan"), 6.0, 100, 8) == 0.05


# ---- the config -------------------------------------------------------------------------------

def test_the_config_fields_and_their_defaults():
    rl = config_from_dict({}).rl
    assert (rl.kl_control, rl.kl_target, rl.kl_horizon, rl.beta) == ("fixed", 6.0, 10000, 0.05)
    rl = config_from_dict({"rl": {"kl_control": "adaptive", "kl_target": 3.5, "kl_horizon": 64}}).rl
    assert (rl.kl_control, rl.kl_target, rl.kl_horizon) == ("adaptive", 3.5, 64)
    # a fixed beta of 0 (no KL) or 1 stays allowed; so does any horizon, which fixed ignores
    assert config_from_dict({"rl": {"beta": 0.0, "kl_horizon": 1}}).rl.beta == 0.0


@pytest.mark.parametrize("rl, field, words", [
    ({"kl_control": "pid"}, "rl.kl_control", "'fixed' or 'adaptive'"),
    ({"kl_target": 0}, "rl.kl_target", "greater than 0"),
    ({"kl_target": -6}, "rl.kl_target", "greater than 0"),
    ({"kl_target": float("inf")}, "rl.kl_target", "finite number"),
    ({"kl_target": "nan"}, "rl.kl_target", "finite number"),
    ({"kl_target": True}, "rl.kl_target", "got a boolean"),
    ({"kl_horizon": 0}, "rl.kl_horizon", "greater than 0"),
    ({"kl_horizon": 2.5}, "rl.kl_horizon", "valid integer"),
    ({"kl_horizon": True}, "rl.kl_horizon", "got a boolean"),
    ({"kl_control": "adaptive", "beta": 0.0}, "rl.kl_control=adaptive", "0 < rl.beta < 1"),
    ({"kl_control": "adaptive", "beta": 1.0}, "rl.kl_control=adaptive", "0 < rl.beta < 1"),
    # 4 prompts x 2 samples = 8 completions a step
    ({"kl_control": "adaptive", "kl_horizon": 7}, "rl.kl_horizon=7", "8 completions"),
])
def test_bad_kl_control_settings_name_the_field(rl, field, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"rl": rl}, "test.yaml")
    assert field in str(e.value) and words in str(e.value), str(e.value)


# ---- the learner: a per-step beta ---------------------------------------------------------------

@pytest.mark.parametrize("baseline, estimator", [("value", "k3"), ("group_mean", "k1")])
def test_a_beta_override_is_a_learner_configured_with_that_beta(tiny_model_path, baseline, estimator):
    """step(beta=b) on a learner configured with rl.beta 0.05 makes the same updates as a
    learner configured with rl.beta b (value baseline: its start from the mean return uses
    beta too; k3: the KL loss term does), and differs from the learner's own beta."""
    from test_learner import _batch, _weights

    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    rows, b = _batch().to_pylist(), 0.3

    def run(cfg_beta, override):
        learner = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3, beta=cfg_beta, baseline=baseline,
                                                          kl_estimator=estimator), 0.9)
        stats = [learner.step(rows, 10, 4, beta=override) for _ in range(2)]  # the second step has a nonzero KL
        return stats, _weights(learner)

    (s_over, w_over), (s_cfg, w_cfg), (s_own, _) = run(0.05, b), run(b, None), run(0.05, None)
    keys = ("loss_sum", "pg_loss_sum", "kl_loss_sum", "value_loss_sum", "kl_sum", "adv_sum", "return_sum", "grad_norm")
    for a, c in zip(s_over, s_cfg):
        for k in keys:
            assert a[k] == pytest.approx(c[k], rel=1e-6, abs=1e-7), k
    for k in w_over:
        np.testing.assert_allclose(w_over[k], w_cfg[k], atol=1e-7, err_msg=k)
    assert s_own[0]["return_sum"] != pytest.approx(s_over[0]["return_sum"], rel=1e-3)
    assert s_over[1]["kl_sum"] != 0


# ---- the pipeline: the controller's state, the step's beta, checkpoints ----------------------------

class _FakeLearner:
    """LearnerGroup's train/save/load, recording what it was given."""

    def __init__(self, kl_per_seq=9.0, usable_rows=8, tokens=80):
        self.calls, self.saved = [], None
        self.kl_per_seq, self.usable_rows, self.tokens = kl_per_seq, usable_rows, tokens

    def train(self, batch, loss_agg, beta=None):
        self.calls.append((batch, loss_agg, beta))
        return {"loss": 0.0, "kl_sum": self.kl_per_seq * self.usable_rows, "tokens": self.tokens,
                "usable_rows": self.usable_rows, "kl": self.kl_per_seq}

    def save(self, path, state, hf_weights=True):
        self.saved = (path, dict(state))

    def load(self, path):
        pass


def _pipeline(rl: dict, learner=None):
    """A Pipeline without actors: the controller and checkpoint logic only."""
    from actors.pipeline import Pipeline

    cfg = config_from_dict({"rl": rl})
    pipe = Pipeline.__new__(Pipeline)
    pipe.cfg, pipe.log = cfg, (lambda *_: None)
    pipe.learner = learner or _FakeLearner()
    pipe.version, pipe.beta, pipe.replay, pipe.checkpoint = 0, cfg.rl.beta, [], None
    pipe.inflight, pipe.launched = deque(), 0
    pipe.published = []
    pipe.publish = lambda v: (pipe.published.append(v), setattr(pipe, "version", v))
    return pipe


class _Sampler:
    def state(self):
        return {"pos": 3}


def test_fixed_beta_never_moves_and_is_passed_every_step():
    pipe = _pipeline({"beta": 0.05})
    for batch in ("b0", "b1", "b2"):
        stats = pipe.train(batch)
        assert stats["beta"] == 0.05
    assert [c[2] for c in pipe.learner.calls] == [0.05] * 3 and pipe.beta == 0.05
    assert pipe.replay == [("b0", 0.05), ("b1", 0.05), ("b2", 0.05)] and pipe.published == [1, 2, 3]


def test_adaptive_beta_follows_the_measured_kl_per_sequence():
    rl = {"beta": 0.05, "kl_control": "adaptive", "kl_target": 6.0, "kl_horizon": 80}
    pipe = _pipeline(rl, _FakeLearner(kl_per_seq=9.0, usable_rows=8))  # 50% above target: clipped to +20%
    s1, s2 = pipe.train("b0"), pipe.train("b1")
    b1 = adaptive_kl_beta(0.05, 9.0, 6.0, 80, 8)
    assert (s1["beta"], s2["beta"]) == (0.05, b1) and b1 > 0.05  # each step reports the beta it trained with
    assert pipe.beta == adaptive_kl_beta(b1, 9.0, 6.0, 80, 8)
    assert [c[2] for c in pipe.learner.calls] == [0.05, b1] and pipe.replay[1] == ("b1", b1)
    pipe.learner.kl_per_seq = 2.0  # KL below target: it comes back down
    before = pipe.beta
    pipe.train("b2")
    assert pipe.beta < before
    pipe.learner.usable_rows = 0  # no usable row: nothing measured, beta stays
    before = pipe.beta
    pipe.train("b3")
    assert pipe.beta == before


def test_beta_round_trips_through_a_checkpoint():
    rl = {"beta": 0.05, "kl_control": "adaptive", "kl_horizon": 80}
    pipe = _pipeline(rl)
    for b in ("b0", "b1"):
        pipe.train(b)
    pipe.save("ck", 2, _Sampler())
    path, state = pipe.learner.saved
    assert state["kl_beta"] == pipe.beta != 0.05 and pipe.replay == []
    state = {**state, "policy_version": 2}
    fresh = _pipeline(rl)
    fresh.resume(path, state)
    assert fresh.beta == pipe.beta and fresh.version == 2
    old = {k: v for k, v in state.items() if k != "kl_beta"}  # a checkpoint from before kl_beta
    fresh = _pipeline(rl)
    fresh.resume(path, old)
    assert fresh.beta == 0.05
    fixed = _pipeline({"beta": 0.07})  # fixed control keeps the config's beta whatever was saved
    fixed.resume(path, state)
    assert fixed.beta == 0.07


def test_a_rebuilt_learner_replays_each_batch_at_its_own_beta(monkeypatch):
    import actors.pipeline as pipeline

    rl = {"beta": 0.05, "kl_control": "adaptive", "kl_horizon": 80}
    pipe = _pipeline(rl)
    for b in ("b0", "b1"):
        pipe.train(b)
    betas = [c[2] for c in pipe.learner.calls]
    new = _FakeLearner()
    new.workers, new.tag = [], "t"
    pipe.learner.workers, pipe.learner.tag = [], "t"
    pipe.tag, pipe.recoveries, pipe.broadcast = "t", [], False
    monkeypatch.setattr(pipeline, "release", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "start_learner", lambda cfg, tag: new)
    pipe.rebuild_learner(RuntimeError("died"))
    assert [(c[0], c[2]) for c in new.calls] == [("b0", betas[0]), ("b1", betas[1])]


# ---- metrics.jsonl ------------------------------------------------------------------------------

def test_metrics_rows_carry_the_kl_per_sequence_per_token_and_beta():
    from test_learner import _batch

    from actors.training import metrics_row

    batch = _batch()  # 4 usable rows, 10 tokens
    stats = {"loss": 0.1, "pg_loss": 0.1, "value_loss": 0.0, "ratio_mean": 1.0, "ratio_clipped_frac": 0.0,
             "grad_norm": 0.5, "kl_sum": 2.0, "tokens": 10.0, "usable_rows": 4, "kl": 0.5, "beta": 0.06}
    row = metrics_row(1, 1, 0, 0, batch, stats, 0.0, 1.0, 4.0)
    assert row["kl"] == row["kl_per_seq"] == 0.5
    assert row["kl_per_token"] == pytest.approx(0.2) and row["kl_beta"] == 0.06
    assert math.isfinite(metrics_row(1, 1, 0, 0, batch, {**stats, "tokens": 0, "usable_rows": 0}, 0, 1, 1)["kl_per_seq"])


def test_beta_stays_within_its_bounds_when_the_target_is_never_reached():
    """A KL target the run never reaches: beta decays 20% a step (horizon = one step) without
    end, 0.05 -> 0.0036 in 12 steps; rl.kl_beta_min holds it at the floor, rl.kl_beta_max
    caps the way up."""
    free, floored, capped = 0.05, 0.05, 0.05
    for _ in range(12):
        free = adaptive_kl_beta(free, 0.0, 6.0, 8, 8)
        floored = adaptive_kl_beta(floored, 0.0, 6.0, 8, 8, lo=0.01, hi=0.5)
        capped = adaptive_kl_beta(capped, 1e6, 6.0, 8, 8, lo=0.01, hi=0.06)
    assert free == pytest.approx(0.0036, abs=2e-4) and floored == 0.01 and capped == 0.06


def test_beta_bounds_in_the_config_and_a_short_horizon_warned():
    from rlaif_ray.config import ConfigError, config_from_dict
    from rlaif_ray.run.preflight import rl_warnings

    rl = config_from_dict({}).rl
    assert (rl.kl_beta_min, rl.kl_beta_max) == (0.005, 0.5)
    with pytest.raises(ConfigError, match=r"rl.kl_beta_min=0.1 and rl.kl_beta_max=0.5, but starts at rl.beta=0.05"):
        config_from_dict({"rl": {"kl_control": "adaptive", "kl_beta_min": 0.1}})
    short = config_from_dict({"rl": {"kl_control": "adaptive", "kl_horizon": 8, "prompts_per_step": 2,
                                     "samples_per_prompt": 4}})
    (line,) = rl_warnings(short)
    assert line.startswith("rl.kl_horizon=8 spans 1 batches of 8 completions: beta moves up to 20% a step")
    assert not rl_warnings(config_from_dict({"rl": {"kl_control": "adaptive", "kl_horizon": 64, "prompts_per_step": 2,
                                                    "samples_per_prompt": 4}}))
