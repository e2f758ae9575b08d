from pathlib import Path

import pytest

from tracerl.config import Config, ConfigError, describe_fields, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_yaml_equals_embedded_defaults():
    # `tracerl train` with no --config runs the typed defaults; configs/quickstart.yaml spells them out.
    assert load_config(REPO / "configs" / "quickstart.yaml") == Config()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    load_config(REPO / "configs" / name)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.learning_rate'"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  group_size: many\n")
    with pytest.raises(ConfigError, match=r"config key 'rollout.group_size'"):
        load_config(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["trainer.lr=1e-5", "run.seed=3", "algo.dual_clip=null", "env.options.top_k=2"])
    assert cfg.trainer.lr == 1e-5 and cfg.run.seed == 3 and cfg.algo.dual_clip is None
    assert cfg.env.options == {"top_k": 2}
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["trainer.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.lrr'"):
        load_config(None, ["trainer.lrr=1"])


def test_path_preset_needs_a_path():
    with pytest.raises(ConfigError, match="model.path must be set"):
        load_config(None, ["model.preset=path"])


def test_every_field_has_a_doc():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
