"""Threads that fit the cores (issue 22 item 4): the torch threads the pipeline's actors
compute with at once (rlaif_ray/cpu/threads.py), `torch_threads: auto` (resolved at start-up,
rlaif_ray/run/resolve.py), the preflight's
warning when a config oversubscribes, and the bundled configs that do not."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError, config_from_dict, load_config
from rlaif_ray.cpu import threads
from rlaif_ray.cpu.threads import thread_warnings
from rlaif_ray.run.resolve import resolve_auto

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"generators": (1, 0.5, 1), "labelers": (1, 0.5, 1), "learner": (1, 1.0, 2)}  # before issue 22


def test_which_pools_compute_at_once():
    assert threads.stages(True, 1) == [("generators", "labelers", "learner")]
    assert threads.stages(False, 1) == [("generators",), ("labelers",), ("learner",)]
    # several generators: a labeler scores one shard while another generator still samples
    assert threads.stages(False, 2) == [("generators", "labelers"), ("learner",)]


def test_peak_threads_in_both_modes():
    assert threads.peak_threads(QUICK, overlapped=True) == (4, ("generators", "labelers", "learner"))
    assert threads.peak_threads(QUICK, overlapped=False) == (2, ("learner",))
    pools = {"generators": (2, 1.0, 2), "labelers": (1, 1.0, 3), "learner": (1, 2.0, 4)}
    assert threads.peak_threads(pools, overlapped=False) == (7, ("generators", "labelers"))
    assert threads.peak_threads(pools, overlapped=True)[0] == 11
    assert threads.least_threads(QUICK, overlapped=True) == 3  # one per actor: 3 pools cannot fit 2 cores
    assert threads.least_threads(QUICK, overlapped=False) == 1


def test_auto_threads_fit_the_cores():
    auto = {k: (a, c, "auto") for k, (a, c, _) in QUICK.items()}
    assert threads.auto_threads(auto, 2, overlapped=False) == {"generators": 2, "labelers": 2, "learner": 2}
    assert threads.auto_threads(auto, 2, overlapped=True) == {"generators": 1, "labelers": 1, "learner": 1}
    # overlapped, in proportion to the CPU reservations (0.5 : 0.5 : 1), the remainder to the largest share
    assert threads.auto_threads(auto, 16, overlapped=True) == {"generators": 4, "labelers": 4, "learner": 8}
    assert threads.auto_threads(auto, 5, overlapped=True) == {"generators": 1, "labelers": 1, "learner": 3}
    # a pool with fixed threads keeps them; the auto pools share what is left
    mixed = {**auto, "learner": (1, 1.0, 3)}
    assert threads.auto_threads(mixed, 8, overlapped=True) == {"generators": 3, "labelers": 2, "learner": 3}
    # several actors: per actor, so the pool's total fits
    many = {"generators": (4, 1.0, "auto"), "labelers": (2, 1.0, "auto"), "learner": (2, 2.0, "auto")}
    got = threads.auto_threads(many, 16, overlapped=True)
    assert got == {"generators": 2, "labelers": 1, "learner": 3}
    assert sum(many[k][0] * got[k] for k in got) <= 16
    sync = threads.auto_threads(many, 16, overlapped=False)
    assert sync["learner"] == 8 and 4 * sync["generators"] + 2 * sync["labelers"] <= 16
    # no CPU reservations: shared by actors; a cluster: each actor's own CPUs
    zero = {k: (1, 0.0, "auto") for k in threads.POOLS}
    assert threads.auto_threads(zero, 6, overlapped=True) == {k: 2 for k in threads.POOLS}
    assert threads.auto_threads(many, None, overlapped=True) == {"generators": 1, "labelers": 1, "learner": 2}
    for cores in range(1, 40):  # whenever one thread per actor fits, auto fits
        for overlapped in (True, False):
            got = threads.auto_threads(many, cores, overlapped)
            peak = threads.peak_threads({k: (*many[k][:2], got[k]) for k in got}, overlapped)[0]
            assert peak <= max(cores, threads.least_threads(many, overlapped)), (cores, overlapped)


def test_local_cores_never_exceed_the_machine():
    assert threads.local_cores(2, machine=16) == 2
    assert threads.local_cores(8, machine=2) == 2
    assert threads.local_cores(None, machine=6) == 6


def test_the_config_field_takes_a_number_or_auto():
    base = {"ray": {"num_cpus": 2}, "rl": {"max_staleness": 0}}
    cfg = config_from_dict({**base, "pipeline": {"learner": {"torch_threads": "auto"}}})
    assert cfg.pipeline.learner.torch_threads == "auto"  # the config is the YAML: resolved at start-up
    resolved = resolve_auto(cfg, cores=2)
    assert resolved.pipeline.learner.torch_threads == 2 and resolved.pipeline.generators.torch_threads == 1
    assert resolve_auto(cfg, cores=None).pipeline.learner.torch_threads == 1  # a cluster: the actor's own CPUs
    assert config_from_dict(resolved.model_dump()).pipeline == resolved.pipeline  # re-validation keeps the numbers
    assert resolve_auto(resolved, cores=8) == resolved  # numbers are kept as given
    assert config_from_dict({"pipeline": {"learner": {"torch_threads": 3}}}).pipeline.learner.torch_threads == 3
    for bad in (0, True, "many", 1.5):
        with pytest.raises(ConfigError, match="pipeline.learner.torch_threads: expected a whole number of threads"):
            config_from_dict({"pipeline": {"learner": {"torch_threads": bad}}})


def test_the_warning_names_pools_and_numbers():
    old = config_from_dict({"ray": {"num_cpus": 2}, "rl": {"max_staleness": 1}, "pipeline": {
        "generators": {"num_cpus": 0.5}, "labelers": {"num_cpus": 0.5},
        "learner": {"num_cpus": 1.0, "torch_threads": 2}}})
    (w,) = thread_warnings(old, machine=2)
    assert "4 threads compute at once on 2 cores (ray.num_cpus)" in w
    assert "generators 1 x 1 + labelers 1 x 1 + learner 1 x 2" in w and "rl.max_staleness=0" in w
    sync = old.model_copy(update={"rl": old.rl.model_copy(update={"max_staleness": 0})})
    assert thread_warnings(sync, machine=2) == []  # the stages take turns: 2 at most
    assert thread_warnings(old.model_copy(update={"ray": old.ray.model_copy(update={"num_cpus": 4})}), machine=8) == []
    (w,) = thread_warnings(old.model_copy(update={"ray": old.ray.model_copy(update={"num_cpus": 4})}), machine=2)
    assert "on 2 cores (this machine's; ray.num_cpus=4 counts more than it has)" in w
    # a cluster: each actor's threads against its own CPUs
    assert thread_warnings(old, cluster=True) == [
        "pipeline.learner: 2 torch threads per actor on 1 CPUs: Ray may place other actors on the cores those "
        "threads compute on; set torch_threads <= num_cpus (or auto)"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "gpu").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_bundled_training_configs_do_not_oversubscribe(path):
    if path.name == "labeler.yaml":  # label / serve-labeler / eval-labeler: no RL pipeline
        return
    cfg = load_config(path)
    assert thread_warnings(cfg, machine=cfg.ray.num_cpus or 2) == []
    assert thread_warnings(resolve_auto(cfg, cores=cfg.ray.num_cpus or 2), machine=cfg.ray.num_cpus or 2) == []


def test_preflight_logs_the_warning(tiny_model_path):
    from rlaif_ray.run.preflight import preflight

    cfg = config_from_dict({"model": {"name": tiny_model_path}, "ray": {"num_cpus": 2},
                            "task": {"heldout_size": 4}, "rl": {"max_staleness": 1},
                            "pipeline": {"learner": {"torch_threads": 2}}})
    lines: list[str] = []
    preflight(cfg, "train", log=lines.append)
    assert lines == [f"warning: {w}" for w in thread_warnings(cfg)] and len(lines) == 1
    assert "the pipeline's torch threads oversubscribe the cores" in lines[0]
