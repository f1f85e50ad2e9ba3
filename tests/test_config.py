import pytest

from orchestrator.config import ConfigError, FinetuneConfig, load_yaml, validate, with_overrides


def write(tmp_path, text, name="ft.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_and_are_frozen(tmp_path):
    cfg = load_yaml(FinetuneConfig, write(tmp_path, "train:\n  lr: 1.0e-4\n"))
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == FinetuneConfig().train.epochs
    with pytest.raises(Exception):
        cfg.train.lr = 3.0


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(FinetuneConfig, p)
    assert str(p) in str(e.value) and "train.learning_rate" in str(e.value)


def test_out_of_range_names_file_and_key(tmp_path):
    p = write(tmp_path, "train:\n  label_smoothing: 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(FinetuneConfig, p)
    assert str(p) in str(e.value) and "train.label_smoothing" in str(e.value)


def test_wrong_type_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_yaml(FinetuneConfig, write(tmp_path, "train:\n  epochs: many\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(FinetuneConfig, write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(FinetuneConfig, tmp_path / "missing.yaml")


def test_selection_split_cannot_be_a_reporting_split():
    with pytest.raises(ConfigError, match="selection split"):
        validate(FinetuneConfig, {"data": {"selection_split": "test"}})


def test_template_needs_a_slot():
    with pytest.raises(ConfigError, match="model"):
        validate(FinetuneConfig, {"model": {"templates": ["a photo"]}})


def test_overrides_revalidate():
    cfg = with_overrides(FinetuneConfig(), {"train.lr": 1e-5, "train.augment": "randaugment"})
    assert cfg.train.lr == 1e-5 and cfg.train.augment == "randaugment"
    with pytest.raises(ConfigError, match="train.epochs"):
        with_overrides(cfg, {"train.epochs": 0})
    with pytest.raises(ConfigError, match="nosuch"):
        with_overrides(cfg, {"nosuch.lr": 1})
