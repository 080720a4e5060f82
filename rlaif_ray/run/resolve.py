"""`auto` values that depend on the machine a run starts on, resolved once at start-up.

The config's validators read the YAML alone, so one file validates the same everywhere;
what `auto` means on this machine is decided here, by the command before Ray starts, and
the resolved numbers are what the run's config.yaml records:

- `pipeline.*.torch_threads: auto`: on a local Ray, the threads that fit the cores it is
  given beside the pools that compute at the same time; on a cluster (ray.address or
  RAY_ADDRESS set), each actor's own CPUs (rlaif_ray/cpu/threads.py gives the rule).

- `reward.rubrics.*.template_file`: read here and recorded inline (`template`), so actors on
  other nodes need no copy of the file and the run's config.yaml holds the exact text.

Every other `auto` (model.dtype, rl.reference, pipeline.weight_sync, eval.harmless_rate,
reward.prefix_sharing, vllm.dtype and kv_cache_gib) is a rule on the config and the device
an actor gets, not on the machine that starts the run, and stays as written.
"""
from __future__ import annotations

from rlaif_ray.config import Config, ConfigError
from rlaif_ray.cpu.threads import POOLS, local_cores, on_cluster, pool_threads
from rlaif_ray.rubrics import rubric_text

HOST = object()  # `cores` default: read this machine


def resolve_auto(cfg: Config, cores: int | None | object = HOST) -> Config:
    """A copy of `cfg` with its machine-dependent `auto` values resolved. `cores`: the cores a
    local Ray run has (None: a cluster; default: read from ray.num_cpus and this machine, or
    None when the run joins a cluster)."""
    if cores is HOST:
        cores = None if on_cluster(cfg.ray.address) else local_cores(cfg.ray.num_cpus)
    threads = pool_threads(cfg, cores)
    pools = {k: getattr(cfg.pipeline, k).model_copy(update={"torch_threads": threads[k]}) for k in POOLS}
    return cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update=pools), "reward": inline_rubrics(cfg.reward)})


def inline_rubrics(reward):
    """The reward section with every rubric's template_file read into its template."""
    rubrics = {}
    for name, r in reward.rubrics.items():
        try:
            text = rubric_text(name, r)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rubrics[name] = r.model_copy(update={"template": text, "template_file": None})
    return reward.model_copy(update={"rubrics": rubrics})
