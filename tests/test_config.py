"""The typed config tree: YAML + dotted overrides, and errors that name the field path."""

import typing

import pytest
from pydantic import BaseModel

from gemb_dist.cli import main as gemb_main
from gemb_dist.config import ConfigError, GembConfig, build_config, dump_config, load_config, parse_overrides
from gemb_dist.config_cli import SCHEMAS, schema


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  temperature: 0.1\nmodel:\n  mrl_dims: [32, 64]\nray:\n  num_workers: 2\n")
    cfg = load_config(path, ["loss.temperature=0.02", "model.prompts={retrieval: 'q: {text}'}", "data.seed=7"])
    assert cfg.loss.temperature == 0.02
    assert cfg.model.mrl_dims == [32, 64]
    assert cfg.model.prompts == {"retrieval": "q: {text}"}
    assert cfg.data.seed == 7


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(GembConfig()))
    assert load_config(path) == GembConfig()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.temperature=0", "loss.temperature"),
        (
            "loss.temprature=0.1",
            "loss.temprature: unknown key; allowed keys: mask_duplicates, mrl_weights, temperature",
        ),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("model.attention=sideways", "'bidirectional' or 'causal'"),
        ("optimizer.schedule=step", "'cosine', 'linear' or 'constant'"),
        ("nosuch.field=1", "nosuch: unknown key"),
        ("model.mrl_dims=[64, 32]", "strictly ascending"),
        ("loss.mrl_weights=[1.0]", "loss.mrl_weights has 1 entries"),
        ("data.global_batch_size=7", "divisible by ray.num_workers"),
        ("model.default_prompt=query", "placeholder"),
        (
            "mlflow.tracking_uri=127.0.0.1:5000",
            "mlflow.tracking_uri: Value error, '127.0.0.1:5000' has no known scheme",
        ),
        ("data.shards=gs://bucket/shards", "data.shards: Value error, 'gs://bucket/shards' is not a local path"),
        ("train.resume=true", "train.resume needs train.run_name"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    assert expected in str(err.value)


def _models_in(annotation) -> list[type]:
    """The config sections an annotation holds, through Optional, unions and lists."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


@pytest.mark.parametrize("job", sorted(SCHEMAS))
def test_every_field_is_described(job):
    """Every field of every config root, sections included (by a description or the section's docstring)."""

    def walk(model_cls, prefix):
        for name, field in model_cls.model_fields.items():
            sections = _models_in(field.annotation)
            yield f"{prefix}{name}", field.description or all(s.__doc__ for s in sections) and sections
            for section in sections:
                yield from walk(section, f"{prefix}{name}.")

    undocumented = [path for path, described in walk(schema(job), "") if not described]
    assert not undocumented


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["loss.temperature"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        load_config(bad)


def test_cli_config_show(capsys):
    assert gemb_main(["config", "--set", "loss.temperature=0.03"]) == 0
    assert "temperature: 0.03" in capsys.readouterr().out
    assert gemb_main(["config", "--set", "loss.temperature=-1"]) == 2
    assert "loss.temperature" in capsys.readouterr().err
