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


# --- issue 20 item 4: every bad input is refused with one line naming the field ---

def _leaf_fields(model=None, prefix=()):
    """(dotted path, annotation) of every leaf field of the config tree."""
    from pydantic import BaseModel

    from rlaif_ray.config import Config

    for name, f in (model or Config).model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, prefix + (name,))
        else:
            yield prefix + (name,), ann


def _nested(path: tuple, value) -> dict:
    for part in reversed(path):
        value = {part: value}
    return value


def _numeric_fields(kind: str):
    from rlaif_ray.config import _number_kind

    return [(p, a) for p, a in _leaf_fields() if _number_kind(a) and (kind == "any" or _number_kind(a) == kind)]


def test_the_field_walk_sees_the_numbers():
    floats = {".".join(p) for p, _ in _numeric_fields("a number")}
    ints = {".".join(p) for p, _ in _numeric_fields("an integer")}
    assert {"rl.lr", "rl.max_grad_norm", "sft.lr", "pipeline.cluster_resources", "eval.tie_margin"} <= floats
    assert {"rl.steps", "ray.num_cpus", "eval.max_new_tokens", "pipeline.learner.max_restarts"} <= ints
    assert "ray.include_dashboard" not in floats | ints and len(floats) > 25 and len(ints) > 40


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "nan", "inf"])
def test_every_float_field_is_finite(bad):
    for path, ann in _numeric_fields("a number"):
        value = {"x": bad} if getattr(ann, "__origin__", None) is dict else bad
        with pytest.raises(ConfigError, match="finite number") as e:
            config_from_dict(_nested(path, value), "t.yaml")
        assert ".".join(path) in str(e.value)


@pytest.mark.parametrize("bad", [True, False])
def test_every_number_field_refuses_a_boolean(bad):
    for path, ann in _numeric_fields("any"):
        value = {"x": bad} if getattr(ann, "__origin__", None) is dict else bad
        with pytest.raises(ConfigError, match="got a boolean") as e:
            config_from_dict(_nested(path, value), "t.yaml")
        assert ".".join(path) in str(e.value)


def test_yes_for_steps_refused_but_numbers_and_booleans_still_load():
    with pytest.raises(ConfigError, match=r"rl\.steps: expected an integer, got a boolean"):
        load_config(None, ["rl.steps=yes"])
    cfg = load_config(None, ["rl.steps=12", "rl.lr=1e-5", "rl.max_grad_norm=0.5", "ray.include_dashboard=yes",
                             "pipeline.generators.vllm.enforce_eager=true", "pipeline.cluster_resources={GPU: 8}"])
    assert cfg.rl.steps == 12 and cfg.rl.lr == 1e-5 and cfg.ray.include_dashboard is True
    assert cfg.pipeline.generators.vllm.enforce_eager is True and cfg.pipeline.cluster_resources == {"GPU": 8.0}
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite"):
        cfg.rl.lr = float("inf")  # assignment is validated too
    with pytest.raises(ValidationError, match="got a boolean"):
        cfg.rl.steps = True


@pytest.mark.parametrize("text, words", [
    ("rl:\n  lr: 0.1\nrl:\n  steps: 3\n", "key 'rl' appears twice (lines 1 and 3)"),
    ("rl:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "key 'lr' appears twice (lines 2 and 4)"),
    ("pipeline:\n  learner:\n    vllm: {kv_cache_gib: 1, kv_cache_gib: 2}\n", "key 'kv_cache_gib' appears twice"),
])
def test_duplicated_yaml_keys_are_refused(tmp_path, text, words):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert words in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_yaml_anchors_and_merges_still_load(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("x: &base {num_cpus: 2.0}\npipeline:\n  learner:\n    <<: *base\n    num_cpus: 1.0\n")
    with pytest.raises(ConfigError, match="x: unknown key"):  # a merge key is not a duplicate; x itself is unknown
        load_config(p)


def test_non_utf8_config_names_the_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"rl:\n  steps: 3\nrun:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml is not valid UTF-8 \(byte 0xe9 on line 4\): save it as UTF-8"):
        load_config(p)
    p.write_bytes(b"\xef\xbb\xbfrl:\n  steps: 3\n")  # a UTF-8 byte-order mark is fine
    assert load_config(p).rl.steps == 3


@pytest.mark.parametrize("item, words", [
    ("rl.lr=[1,", "--set rl.lr=[1,: the value is not valid YAML"),
    ("rl.lr={a: 1", "not valid YAML"),
    ("rl.lr=!!python/object/apply:os.system ['true']", "YAML tags (!!...) are not allowed"),
    ("rl.lr=!!python/name:os.system", "YAML tags (!!...) are not allowed"),
    ("rl={lr: 1, lr: 2}", "key 'lr' appears twice"),
    ("rl.lr", "key=value"),
])
def test_malformed_set_values_are_one_line(item, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["../escape", "../../x", "/abs/run", "a/b", "a\\b", "..", ".", "", "  "])
def test_run_name_cannot_leave_out_dir(name):
    with pytest.raises(ConfigError, match="run.name: must be a plain folder name"):
        config_from_dict({"run": {"name": name}})


def test_plain_run_names_load():
    for name in ("run", "x y", "tldr-0.5", "..x", "café"):
        assert config_from_dict({"run": {"name": name}}).run.name == name


def test_validation_errors_are_one_line():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"rl": {"lr": -1, "steps": "ten"}, "reward": {"scorer": "nope"}}, "t.yaml")
    msg = str(e.value)
    assert "\n" not in msg and "Value error" not in msg
    assert msg.startswith("invalid config t.yaml: ") and "rl.lr: Input should be greater than 0 (got -1)" in msg
    assert "rl.steps: Input should be a valid integer" in msg and "reward.scorer: unknown scorer 'nope'" in msg
    with pytest.raises(ConfigError) as e:  # a rule across fields names them itself, with no dump of the input
        config_from_dict({"rl": {"samples_per_prompt": 1}})
    assert str(e.value).startswith("invalid config (dict): rl.baseline=group_mean needs") and "{" not in str(e.value)


def test_model_paths_are_checked_before_loading(tmp_path, monkeypatch):
    from rlaif_ray.engines.models import ModelNotFoundError, looks_local, model_path_problem, resolve
    from rlaif_ray.run.preflight import check_model_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "model").mkdir()
    (tmp_path / "runs" / "model" / "config.json").write_text("{}")
    assert not looks_local("HuggingFaceTB/SmolLM2-135M-Instruct") and not looks_local("gpt2")
    assert looks_local("./m") and looks_local("/abs/m") and looks_local("a/b/c") and looks_local("runs/nope")
    assert model_path_problem("runs/model") is None and model_path_problem("org/hub-model") is None
    assert "does not exist" in model_path_problem("runs/nope")
    assert "holds no config.json" in model_path_problem("runs/empty")
    with pytest.raises(ModelNotFoundError, match="model ./nope does not exist"):
        resolve("./nope")
    cfg = config_from_dict({"model": {"name": "./nope"}})
    with pytest.raises(ConfigError, match=r"^model.name: ./nope does not exist \(give a local model folder"):
        check_model_paths(cfg, "train")
    cfg = config_from_dict({"model": {"name": "runs/model"}, "reward": {"model": "/no/labeler"}})
    with pytest.raises(ConfigError, match="^reward.model: /no/labeler does not exist"):
        check_model_paths(cfg, "label")
    check_model_paths(cfg, "sft")  # sft loads model.name only
    cfg = config_from_dict({"rm": {"init": "runs/empty"}})
    with pytest.raises(ConfigError, match="^rm.init: runs/empty holds no config.json"):
        check_model_paths(cfg, "train-rm")


def test_cli_prints_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from rlaif_ray.commands.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  lr: .inf\n  steps: yes\n")
    monkeypatch.delenv("RLAIF_RAY_DEBUG", raising=False)
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid config") and "rl.lr" in err and "rl.steps" in err
    for argv in (["--debug", "check", str(bad)], ["check", str(bad), "--debug"]):
        with pytest.raises(ConfigError):
            main(argv)
    monkeypatch.setenv("RLAIF_RAY_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["check", str(bad)])
    monkeypatch.setenv("RLAIF_RAY_DEBUG", "0")
    assert main(["check", str(bad)]) == 2


def test_unknown_prompt_variant_is_a_config_error():
    from rlaif_ray.feedback.labeler_eval import parse_variant

    with pytest.raises(ConfigError, match="eval-labeler --prompts: unknown prompt variant 'bsae'"):
        parse_variant("bsae")
    assert parse_variant("detailed+cot:2") == ("detailed", True, 2)


def test_a_lone_surrogate_in_config_text_is_refused(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text('run:\n  name: "x\\ud800"\n')
    with pytest.raises(ConfigError, match=r"run.name: holds a lone surrogate"):
        load_config(p)
    p.write_text('run:\n  name: "x\\U0001F600"\n')
    assert load_config(p).run.name == "x\U0001F600"
