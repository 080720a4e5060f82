"""docs/config.md is the config model as it is (issue 37): generated from rlaif_ray/config.py,
every key with a type, a default and a meaning; a change to the config without regenerating
the reference fails here. And the config's validators read the YAML alone: the same file
validates to the same config whatever machine, cores or Ray address it is read on."""
from __future__ import annotations

import os

from rlaif_ray import config
from rlaif_ray.run import config_doc


def test_the_config_reference_is_current():
    assert config_doc.DOC.read_text() == config_doc.render(), \
        "docs/config.md is stale: python -m rlaif_ray.run.config_doc --write"


def test_every_key_has_a_type_a_default_and_a_meaning():
    comments = config_doc.field_comments(config)
    keys = [row for name in config.Config.model_fields
            for row in config_doc.rows(getattr(config.Config(), name), f"{name}.", comments)]
    assert len(keys) > 150 and len({k for k, *_ in keys}) == len(keys)
    assert [k for k, kind, default, meaning in keys if not (kind and default and meaning)] == []
    text = config_doc.DOC.read_text()
    assert "| `pipeline.generators.num_cpus` | float | `0.5` |" in text  # a section's own default, not its class's
    assert "| `rl.kl_control` | one of: fixed, adaptive | `fixed` |" in text


def test_validators_do_not_read_the_host(monkeypatch):
    yaml_like = {"ray": {"num_cpus": 2}, "rl": {"max_staleness": 1},
                 "pipeline": {"generators": {"torch_threads": "auto"}, "learner": {"torch_threads": "auto"}}}
    here = config.config_from_dict(yaml_like).model_dump()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert config.config_from_dict(yaml_like).model_dump() == here
    assert here["pipeline"]["learner"]["torch_threads"] == "auto"  # resolved at start-up, not while validating
