"""Custom metrics for the Ray dashboard (Prometheus/Grafana), from every role.

Each actor (and the driver) holds one `RoleMetrics`, tagged with its role (generator,
labeler, learner, driver) and its actor name, so the dashboard can split any series by
role or by actor. Prometheus sees them as `ray_rlaif_<name>` (counters gain `_total`).
Outside a Ray worker or driver every call is a no-op: the logic stays testable alone.
"""
from __future__ import annotations

# name -> (kind, description); histograms get boundaries in seconds
METRICS = {
    "tokens_generated": ("counter", "response tokens sampled"),
    "tokens_per_s": ("gauge", "generation throughput of the last batch (tokens/s)"),
    "labels": ("counter", "AI labels or scores produced"),
    "labels_per_s": ("gauge", "labeling throughput of the last batch (labels/s)"),
    "unusable_labels": ("counter", "labels whose tokens held too little probability"),
    "batch_s": ("histogram", "time one call (generate, score, label) took"),
    "learner_step_s": ("histogram", "learner step time (one rank)"),
    "weight_broadcast_s": ("histogram", "time learner rank 0 took to send one policy version"),
    "queue_depth": ("gauge", "batches in flight: sampled or labeled, not yet trained"),
    "policy_lag": ("gauge", "policy versions between generation and training of the last batch"),
    "reward_mean": ("gauge", "mean reward of the last trained batch"),
    "kl": ("gauge", "mean per-sequence KL to the reference policy, last batch"),
    "learner_wait_s": ("gauge", "time the driver waited for the last batch (learner idle)"),
    "eval_win_rate": ("gauge", "held-out win rate of the policy against the initial one"),
}
BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300]


# one Ray metric object per name and process: a second object of the same name in a process
# (a driver that runs several pipelines) is not exported, so every RoleMetrics shares these
_BY_NAME: dict = {}


class RoleMetrics:
    def __init__(self, role: str, actor: str):
        self.tags = {"role": role, "actor": actor}
        self._named = False

    def _metric(self, name: str):
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        if not self._named:  # inside an actor, its Ray name ("generator-0@RUN"), as in the dashboard
            ctx = ray.get_runtime_context()
            if ctx.get_actor_id() is not None:  # not in the driver (the name call warns there)
                self.tags["actor"] = ctx.get_actor_name() or self.tags["actor"]
            self._named = True
        if name not in _BY_NAME:
            kind, desc = METRICS[name]
            args = dict(description=desc, tag_keys=("role", "actor"))
            if kind == "counter":
                _BY_NAME[name] = metrics.Counter(f"rlaif_{name}", **args)
            elif kind == "gauge":
                _BY_NAME[name] = metrics.Gauge(f"rlaif_{name}", **args)
            else:
                _BY_NAME[name] = metrics.Histogram(f"rlaif_{name}", boundaries=BOUNDARIES, **args)
        return _BY_NAME[name]

    def inc(self, name: str, value: float = 1.0) -> None:
        m = self._metric(name)
        if m is not None and value > 0:
            m.inc(value, tags=self.tags)

    def set(self, name: str, value: float) -> None:
        m = self._metric(name)
        if m is not None:
            m.set(float(value), tags=self.tags)

    def observe(self, name: str, value: float) -> None:
        m = self._metric(name)
        if m is not None:
            m.observe(float(value), tags=self.tags)
