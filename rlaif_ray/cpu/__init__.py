"""CPU-only measures, each kept because it paid 5% or more on a shipped config
(BENCHMARKS.md, "Settings chosen by measurement"), all applied at start-up or between compute
calls, never inside model code:

- threads.py: `torch_threads: auto`, the threads that fit the cores (resolved once by
  rlaif_ray/run/resolve.py) and the preflight's oversubscription warning;
- attention.py: grouped-query SDPA without copied KV heads for CPU generators and labelers
  (quickstart generation 1.17x);
- allocator.py: the CPU learner on the jemalloc Ray ships, freed heap handed back after each
  compute call (learner step 1.10x, 0.9 GiB less).

Imported only on the start-up path: rlaif_ray/run/resolve.py and preflight.py, the commands,
and the actors' process set-up (actors/process.py, the learner's environment in
actors/pipeline.py). May import: rlaif_ray.config, rlaif_ray.engines.
"""
