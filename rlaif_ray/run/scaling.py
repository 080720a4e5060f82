"""A throughput model of the RL loop from measured per-stage times (pure; no Ray).

Inputs, per completion on one actor: t_g (generation), t_l (labeling), t_t (learner step);
t_s: seconds per step outside the actors' timers (weight sync, dispatch, the driver), and
n completions per step. G generators, L labelers (the learner group is fixed). The driver
splits a batch into min(G, prompts_per_step) shards and sends shard i to labeler i mod L,
so at most G labelers are used: L' = min(L, G).

A step's stages:
    C = n t_g / G + n t_l / L'     (a batch through generators, then labelers)
    U = n t_t + t_s                (the learner's step, then the weight sync)

With d = max_staleness + 1 batches in flight, the time per step is

    T(d) = max(n t_g / G,  n t_l / L',  U,  (C + U) / d)

and the throughput n / T(d) completions/s. d = 1 is the synchronous loop, T = C + U.
The first three terms are the stages' own limits (a generator, a labeler or the learner
can serve one batch at a time); the last is the latency bound: a batch is launched d - 1
steps before it is trained, so d steps must cover one batch's whole trip C + U.
d -> infinity leaves the slowest stage: min(G / t_g, L' / t_l, n / U).

The model assumes the stages do not slow each other down (separate cores or GPUs); on a
machine with fewer cores than busy stages the overlapped run falls short of it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageTimes:
    t_g: float  # generation seconds per completion, one generator
    t_l: float  # labeling seconds per completion, one labeler
    t_t: float  # learner seconds per completion
    t_s: float  # seconds per step outside the actors (weight sync, dispatch)
    n: int  # completions per step


def step_time(s: StageTimes, generators: int = 1, labelers: int = 1, staleness: int | None = 0) -> float:
    """Seconds per step, T(d) above with d = staleness + 1; staleness None: unbounded."""
    if generators < 1 or labelers < 1:
        raise ValueError("generators and labelers must be >= 1")
    lab = min(labelers, generators)
    gen_s, lab_s = s.n * s.t_g / generators, s.n * s.t_l / lab
    learn_s = s.n * s.t_t + s.t_s
    latency = 0.0 if staleness is None else (gen_s + lab_s + learn_s) / (staleness + 1)
    return max(gen_s, lab_s, learn_s, latency)


def throughput(s: StageTimes, generators: int = 1, labelers: int = 1, staleness: int | None = 0) -> float:
    """Predicted completions/s."""
    return s.n / step_time(s, generators, labelers, staleness)


def bottleneck(s: StageTimes, generators: int = 1, labelers: int = 1) -> str:
    """The stage that bounds the unbounded-staleness pipeline."""
    lab = min(labelers, generators)
    stages = {"generator": s.n * s.t_g / generators, "labeler": s.n * s.t_l / lab, "learner": s.n * s.t_t + s.t_s}
    return max(stages, key=stages.get)


def stage_times(busy_s: dict[str, float], loop_s: float, completions: int, steps: int) -> StageTimes:
    """StageTimes from a synchronous run: the actors' busy seconds (names generator-*,
    labeler-* or reward-model-*, learner-*), the loop's wall seconds, completions and steps.
    Per-actor times are summed over a pool (work per completion on one actor); t_s is the
    loop time no actor accounts for, per step (valid for max_staleness 0 only, where the
    stages do not overlap)."""
    def total(*prefixes: str) -> float:
        return sum(v for k, v in busy_s.items() if k.startswith(prefixes))

    learner = [v for k, v in busy_s.items() if k.startswith("learner")]
    gen, lab = total("generator"), total("labeler", "reward-model")
    learn = max(learner) if learner else 0.0  # ranks work in parallel on shards of one batch
    if completions <= 0 or steps <= 0:
        raise ValueError("completions and steps must be positive")
    rest = max(loop_s - gen - lab - learn, 0.0) / steps
    return StageTimes(t_g=gen / completions, t_l=lab / completions, t_t=learn / completions, t_s=rest,
                      n=round(completions / steps))


def table(s: StageTimes, sizes=(1, 2, 4, 8), staleness: tuple = (0, 1, None)) -> list[dict]:
    """Predicted completions/s for every generator/labeler pool size pair."""
    rows = []
    for g in sizes:
        for lab in sizes:
            row = {"generators": g, "labelers": lab, "bottleneck": bottleneck(s, g, lab)}
            for d in staleness:
                row[f"staleness_{'inf' if d is None else d}"] = throughput(s, g, lab, d)
            rows.append(row)
    return rows

