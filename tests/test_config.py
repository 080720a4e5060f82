from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_quickstart_validate():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.reward.source == "direct" and cfg.rl.beta == 0.05
    assert config_from_dict({}).rl.max_staleness == 1


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["rl.lr=3e-4", "rl.max_staleness=0", "run.name=x y"])
    assert cfg.rl.lr == pytest.approx(3e-4) and cfg.rl.max_staleness == 0 and cfg.run.name == "x y"


@pytest.mark.parametrize("data, field, words", [
    ({"rl": {"lr": -1}}, "rl.lr", "greater than 0"),
    ({"rl": {"prompts_per_step": 0}}, "rl.prompts_per_step", "greater than 0"),
    ({"rl": {"max_staleness": -1}}, "rl.max_staleness", "greater than or equal to 0"),
    ({"rl": {"lr_typo": 1}}, "rl.lr_typo", "unknown key"),
    ({"generation": {"backend": "tgi"}}, "generation.backend", "'hf' or 'vllm'"),
    ({"rl": {"steps": "many"}}, "rl.steps", "valid integer"),
    ({"reward": {"source": "pairwise"}, "rl": {"samples_per_prompt": 3, "baseline": "value"}},
     "samples_per_prompt", "even"),
    ({"rl": {"samples_per_prompt": 1}}, "rl.baseline=group_mean", "samples_per_prompt >= 2"),
    ({"reward": {"source": "rm"}}, "reward.rm_path", "train-rm"),
    ({"eval": {"tie_margin": 0.5}}, "eval.tie_margin", "less than 0.5"),
    ({"eval": {"judge": "human"}}, "eval.judge", "'pairwise' or 'scorer'"),
    ({"rm": {"label_kind": "fuzzy"}}, "rm.label_kind", "'soft', 'hard' or 'human'"),
    ({"sft": {"trainer": {"num_workers": 0}}}, "sft.trainer.num_workers", "greater than 0"),
])
def test_errors_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "test.yaml")
    assert field in str(e.value) and words in str(e.value) and "test.yaml" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rl.lr"])


def test_dump_roundtrip():
    cfg = config_from_dict({"rl": {"steps": 3}})
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
