import pytest

from orchestrator.config import ConfigError, FinetuneConfig, SearchSpace, load_yaml, validate, with_overrides


def write(tmp_path, text, name="ft.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load_and_are_frozen(tmp_path):
    cfg = load_yaml(FinetuneConfig, write(tmp_path, "train:\n  lr: 1.0e-4\n"))
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == FinetuneConfig().train.epochs
    with pytest.raises(Exception):
        cfg.train.lr = 3.0


@pytest.mark.parametrize("schema, text, key", [
    (FinetuneConfig, "train:\n  lr: 1.0e-4\n  learning_rate: 3\n", "train.learning_rate"),
    (FinetuneConfig, "train:\n  label_smoothing: 1.5\n", "train.label_smoothing"),
    (SearchSpace, "sweep:\n  num_sample: 3\n", "sweep.num_sample"),
    (SearchSpace, "sweep:\n  max_concurrent_trials: two\n", "sweep.max_concurrent_trials"),
    (SearchSpace, "search:\n  train.lr: {loguniform: [1.0e-3, 1.0e-4]}\n", "search.train.lr"),
    (SearchSpace, "search:\n  train.epochs: {randint: [5, 2]}\n", "search.train.epochs"),
    (SearchSpace, "search:\n  train.augment: {choice: []}\n", "search.train.augment"),
    (SearchSpace, "search:\n  train.lr: {loguniform: [0, 1]}\n", "search.train.lr"),
    (SearchSpace, "search:\n  train.lr: {uniform: [0, 1], loguniform: [1, 2]}\n", "search.train.lr"),
    (SearchSpace, "search:\n  train.learning_rate: {uniform: [0, 1]}\n", "train.learning_rate"),
    (SearchSpace, "sweep:\n  search_alg: bayes\n", "sweep.search_alg"),
    (SearchSpace, "sweep:\n  resources: {gpu: -1}\n", "sweep.resources.gpu"),
    (SearchSpace, "sweep:\n  resources: {launcher: ray}\n", "sweep.resources.launcher"),
    (SearchSpace, "sweep:\n  resources: {workers: 2, launcher: trial}\n", "sweep.resources.launcher"),
])
def test_a_bad_key_names_the_file_and_the_dotted_key(tmp_path, schema, text, key):
    """Unknown, out of range, wrong type or an empty range, in a fine-tuning config or a search
    space: the error names the file and the dotted key. (The CLI's one line and exit 2 are
    tests/cli/test_cli.py's and tests/e2e/test_bad_input.py's.)"""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_yaml(schema, p)
    assert str(p) in str(e.value) and key in str(e.value)


def test_who_launches_a_trials_loop():
    """One worker trains in the Tune trial's actor unless told to use a TorchTrainer; several
    always use one."""
    res = [validate(SearchSpace, {"sweep": {"resources": r}}).sweep.resources.in_trial
           for r in ({}, {"launcher": "torch_trainer"}, {"workers": 2}, {"launcher": "trial"})]
    assert res == [True, False, False, True]


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
