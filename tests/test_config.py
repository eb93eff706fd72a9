import pytest
import yaml

from aacray.config import ConfigError, ExtractConfig, TrainConfig, dump_yaml, from_dict, load_config


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_yaml_and_overrides(tmp_path):
    p = _write(tmp_path, {"output": "o", "input": {"kind": "manifest", "manifest": "m.csv"}})
    cfg = load_config(ExtractConfig, [p, "actors.num_actors=3", "encoder.checkpoint=null", "input.subsets=[dev,val]", "max_bad_fraction=1"])
    assert cfg.output == "o"
    assert cfg.input.kind == "manifest" and cfg.input.subsets == ["dev", "val"]
    assert cfg.actors.num_actors == 3
    assert cfg.encoder.checkpoint is None
    assert cfg.max_bad_fraction == 1.0 and isinstance(cfg.max_bad_fraction, float)


def test_unknown_key_named(tmp_path):
    p = _write(tmp_path, {"actors": {"num_actor": 2}})
    with pytest.raises(ConfigError, match=r"actors\.num_actor"):
        load_config(ExtractConfig, [p])
    with pytest.raises(ConfigError, match="bogus"):
        load_config(ExtractConfig, [_write(tmp_path, {}), "bogus=1"])


@pytest.mark.parametrize(
    "override, key",
    [("epochs=ten", "epochs"), ("lr=fast", "lr"), ("use_gpu=3", "use_gpu"), ("model.n_layers=2.5", "model.n_layers"), ("betas=0.9", "betas")],
)
def test_wrong_type_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainConfig, [_write(tmp_path, {}), override])


def test_literal_choices(tmp_path):
    with pytest.raises(ConfigError, match="encoder.name"):
        load_config(ExtractConfig, [_write(tmp_path, {"encoder": {"name": "resnet"}})])


def test_resolved_roundtrip(tmp_path):
    cfg = load_config(TrainConfig, [_write(tmp_path, {"epochs": 3}), "model.n_heads=8"])
    again = from_dict(TrainConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and again.model.n_heads == 8


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, ["/nonexistent.yaml"])
