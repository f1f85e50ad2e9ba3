"""What a person finds in MLflow after a sweep and a cook: every trial and soup a logged model
with its metrics on named datasets, readable run names, descriptions, source tags."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.record.schema import DESCRIPTION, metric_split
from orchestrator.record.tracking import model_name
from orchestrator.sweep.trial import trial_label

ROOT = Path(__file__).resolve().parents[2]


# --- unit: the naming rules --------------------------------------------------------------------

def test_trial_label_is_index_then_searched_values_in_order():
    params = {"train.lr": 3.1234e-05, "train.weight_decay": 0.01234, "train.epochs": 10,
              "train.augment": "none", "model.head_init": "zeroshot"}
    assert trial_label("91e50_00007", params) == "t07 lr=3.1e-05 wd=0.012 ep=10 aug=none head=zeroshot"
    assert trial_label("91e50_00123", {}) == "t123"
    rand = {"train.augment": "randaugment", "train.randaug_magnitude": 9, "train.seed": 4}
    assert trial_label("x_00001", rand) == "t01 aug=randaugment ram=9"
    assert trial_label("x_00001", {**rand, "train.augment": "light"}) == "t01 aug=light"
    assert trial_label("x_00002", {"train.seed": 4}) == "t02 seed=4"


def test_logged_model_names_drop_what_mlflow_forbids():
    assert model_name("t07 lr=3.1e-05 wd=0.012 ep=10") == "t07-lr3_1e-05-wd0_012-ep10"
    assert not set("/:.%\"'") & set(model_name("a/b:c.d%e\"f'g"))


def test_each_accuracy_names_its_split():
    assert [metric_split(k) for k in ("heldout_acc", "test_acc", "shift_rotate_acc", "rotate_acc",
                                      "shift_mean_acc", "train_loss")] == \
        ["heldout", "test", "rotate", "rotate", None, None]


# --- integration: the cooked store --------------------------------------------------------------

def _runs(client, exp_id, role):
    return client.search_runs([exp_id], f"tags.`soup.role` = '{role}'")


@pytest.mark.integration
@pytest.mark.slow
def test_every_trial_and_soup_run_is_described_and_has_its_datasets(cooked):
    client, exp = cooked["client"], cooked["sweep"].experiment_id
    runs = _runs(client, exp, "trial") + _runs(client, exp, "soup")
    assert len(runs) >= 4 + 5
    for run in runs:
        name = run.info.run_name
        assert run.data.tags.get(DESCRIPTION, "").strip(), f"{name}: no description"
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in inputs.values()}
        assert {"tiny_digits/heldout", "tiny_digits/test", "tiny_digits/rotate",
                "tiny_digits/rendered"} <= set(inputs), (name, sorted(inputs))
        assert {"heldout", "test", "shift"} <= contexts, (name, contexts)
        assert run.data.tags.get("mlflow.user"), name
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags.get("mlflow.source.git.commit", "")), name
    # the same split has the same digest on every run: a trial's and a soup's figures compare
    digests = {(d.dataset.name, d.dataset.digest) for r in runs for d in r.inputs.dataset_inputs}
    assert len(digests) == len({n for n, _ in digests})


@pytest.mark.integration
@pytest.mark.slow
def test_trial_runs_are_named_by_index_and_searched_values(cooked):
    client, exp = cooked["client"], cooked["sweep"].experiment_id
    names = sorted(r.info.run_name for r in _runs(client, exp, "trial"))
    assert [n.split(" ")[0] for n in names] == ["t00", "t01", "t02", "t03"], names
    assert all(re.fullmatch(r"t\d\d lr=\S+ mix=\S+ aug=(none|light)", n) for n in names), names


@pytest.mark.integration
@pytest.mark.slow
def test_trials_and_soups_are_logged_models_ranked_by_heldout(cooked):
    client, exp = cooked["client"], cooked["sweep"].experiment_id
    models = client.search_logged_models([exp], order_by=[{"field_name": "metrics.heldout_acc",
                                                           "ascending": False}])
    by_role = {}
    for m in models:
        by_role.setdefault(m.tags.get("soup.role"), []).append(m)
    trials = {r.info.run_id: r for r in _runs(client, exp, "trial")}
    assert {m.source_run_id for m in by_role["trial"]} == set(trials)
    for m in by_role["trial"]:
        assert m.name == model_name(trials[m.source_run_id].info.run_name)
        assert str(m.status) in ("READY", "LoggedModelStatus.READY"), (m.name, m.status)
    assert {"greedy-soup", "uniform-soup", "learned-soup"} <= {m.name for m in by_role["soup"]}
    heldout = []
    for m in models:
        metrics = {x.key: x for x in sorted(m.metrics, key=lambda x: (x.timestamp, x.step))}
        for key, dataset in (("heldout_acc", "tiny_digits/heldout"), ("test_acc", "tiny_digits/test")):
            assert metrics[key].dataset_name == dataset and metrics[key].model_id == m.model_id, (m.name, key)
        assert "shift_mean_acc" in metrics, m.name
        heldout.append(metrics["heldout_acc"].value)
    assert heldout == sorted(heldout, reverse=True)  # MLflow ranks them by the final held-out figure
    # a soup's figures are the same as on its run (which the sweep's table shows)
    greedy = next(m for m in by_role["soup"] if m.name == "greedy-soup")
    run = client.get_run(greedy.source_run_id)
    assert {x.key: x.value for x in greedy.metrics}["test_acc"] == run.data.metrics["test_acc"]


@pytest.mark.integration
@pytest.mark.slow
def test_registered_model_and_versions_are_described(cooked):
    client = cooked["client"]
    assert "champion" in client.get_registered_model("tiny4-soup").description
    models = client.search_logged_models([cooked["sweep"].experiment_id])
    for v in client.search_model_versions("name = 'tiny4-soup'"):
        assert v.tags["recipe"] in v.description and "Lineage" in v.description, v.version
        # the version is a soup's logged model (its source: the model's URI or its artifacts)
        model = next(m for m in models if v.source in (m.model_uri, m.artifact_location))
        assert model.name == f"{v.tags['recipe']}-soup", (v.version, model.name)
    sweep = client.get_run(cooked["sweep"].parent_run_id)
    assert "greedy soup" in sweep.data.tags[DESCRIPTION] and "| name |" in sweep.data.tags[DESCRIPTION]


@pytest.mark.integration
@pytest.mark.slow
def test_rank_models_example_lists_trials_and_soups_with_datasets(cooked):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "rank_models.py"), "tiny4"],
                         env={**os.environ, "MLFLOW_TRACKING_URI": cooked["uri"]},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = out.stdout.splitlines()[1:]
    assert any(r.startswith("greedy-soup ") for r in rows) and any(r.startswith("t00-") for r in rows), out.stdout
    assert all(re.search(r"tiny_digits/{heldout,.*test", r) for r in rows), out.stdout
