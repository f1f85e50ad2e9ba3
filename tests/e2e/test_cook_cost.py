"""The cook's cost, counted: baselines from the trials' logged logits (no forward pass, the same
rows as scoring again), the build on the device and threads its task was given, and
`soup cook --plan`, which predicts the counts and changes nothing."""

import hashlib
import shutil

import pytest
from conftest import SPACES
from mlflow.tracking import MlflowClient

from orchestrator import cli, data
from orchestrator.config import SearchSpace, load_yaml
from orchestrator.cook.driver import CookError, cook
from orchestrator.cook.plan import plan_cook
from orchestrator.soups.recipe import default_recipes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BASELINES = ("zero-shot", "best individual", "ensemble", "greedy ensemble")


def _phases(out) -> dict[str, dict]:
    return {p["name"]: p for p in out.phases}


def _split_sizes() -> int:
    space = load_yaml(SearchSpace, SPACES / "tiny4.yaml")
    task = data.load_task(space.base.data)
    return sum(len(s) for s in (task.heldout, *task.reporting().values()))


def _copy(cooked, tmp_path) -> str:
    """A private copy of the cooked store's database (its artifacts stay shared, read only),
    holding the sweep's own trials only: other tests of the session add bad trial runs to the
    shared store, which the copy drops."""
    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    used = client.get_model_version("tiny4-soup", cooked["first"].versions["uniform"]).tags["ingredients"]
    for t in _trials(client):
        if t.info.run_id not in used.split(","):
            client.delete_run(t.info.run_id)
    return uri


def _trials(client):
    exp = client.get_experiment_by_name("tiny4").experiment_id
    return client.search_runs([exp], "tags.`soup.role` = 'trial'")


def test_baselines_come_from_logged_logits_with_no_forward_pass(cooked):
    for out in (cooked["first"], cooked["second"]):  # in a Ray task, and in this process
        phases = _phases(out)
        assert phases["baselines"]["passes"] == 0, out.phases
        assert phases["baselines"]["bytes"] > 0  # the logits were read instead
        assert phases["zero-shot"]["passes"] == _split_sizes()
        assert phases["evaluation"]["passes"] == len(default_recipes()) * _split_sizes()


def test_baselines_from_logits_equal_scoring_again(cooked, tmp_path):
    """With every trial's logits tag removed, the cook scores each checkpoint again: the same
    table rows (to within one example of float16 rounding deciding a near tie), at 4 x every
    split's forward passes, and it names each run it scores again."""
    uri = _copy(cooked, tmp_path)
    client = MlflowClient(uri)
    trials = _trials(client)
    for t in trials:
        client.delete_tag(t.info.run_id, "logits_sha256")
    lines = []
    out = cook("c4", recipes=("uniform",), tracking_uri=uri, use_ray=False, log=lines.append)
    assert _phases(out)["baselines"]["passes"] == len(trials) * _split_sizes()
    for t in trials:
        assert any(t.info.run_id in line and "scoring its checkpoint again" in line for line in lines)
    logged = {r["name"]: r for r in cooked["first"].rows}
    n = {k: len(s) for k, s in _splits().items()}
    for row in out.rows:
        if row["name"] in BASELINES:
            for split, size in n.items():
                assert abs(row[split] - logged[row["name"]][split]) * size <= 1 + 1e-6, (row["name"], split)
    assert [r["name"] for r in out.rows if r["kind"] == "baseline"] == list(BASELINES)


def _splits():
    space = load_yaml(SearchSpace, SPACES / "tiny4.yaml")
    task = data.load_task(space.base.data)
    return {"heldout": task.heldout, **task.reporting()}


def test_the_build_runs_on_its_tasks_device_and_threads(cooked, tmp_path):
    """Through a Ray task sized by `resources` (the space's cook.resources, overridden as by
    `soup cook --cpus`): the model and every input on the configured device, torch's threads
    the task's CPUs."""
    import ray

    uri = _copy(cooked, tmp_path)
    try:
        for cpus in (2, 1):
            out = cook("c4", recipes=("uniform",), tracking_uri=uri, resources={"cpu": cpus},
                       log=lambda s: None, rebuild=True)  # the same soup built again, on other threads
            assert out.where == {"device": "cpu", "precision": "fp32", "threads": cpus,
                                 "input_devices": ["cpu"]}, out.where
        versions = MlflowClient(uri).search_model_versions("name = 'tiny4-soup'")
        with pytest.raises(CookError, match=r"cook.resources asks for 1 CPU and 1 GPU, but the largest "
                                            r"node of this Ray has \d+ CPU and 0 GPU: the build could never run"):
            cook("c4", recipes=("greedy",), tracking_uri=uri, resources={"gpu": 1}, log=lambda s: None)
        assert len(MlflowClient(uri).search_model_versions("name = 'tiny4-soup'")) == len(versions)
    finally:
        ray.shutdown()


def _fingerprint(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_predicts_the_cooks_counts_and_changes_nothing(cooked, tmp_path, monkeypatch, capsys):
    uri = _copy(cooked, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = _fingerprint(tmp_path / "mlflow.db")
    assert cli.main(["cook", "--sweep", "c4", "--plan"]) == 0
    printed = capsys.readouterr().out
    assert _fingerprint(tmp_path / "mlflow.db") == before  # not a byte of the store changed
    assert "nothing is changed" in printed and "ingredients: 4 of 4 FINISHED trials" in printed, printed
    assert "device: cpu, fp32, 1 torch threads" in printed
    plan = {p["name"]: p for p in plan_cook("c4", tracking_uri=uri).phases}
    done = _phases(cooked["second"])
    assert set(plan) == set(done), (sorted(plan), sorted(done))
    for name, p in plan.items():
        if p["bound"]:
            assert done[name]["passes"] <= p["passes"], name
        else:
            assert done[name]["passes"] == p["passes"], name
    assert plan["baselines"]["passes"] == 0
    # auto: the 4 tiny ingredients fit half the host's memory, stacked: each read once for the
    # stack and once for the final soup, as the cook read them (its headers aside)
    assert "  learned: stacked (4 ingredients stacked hold" in printed, printed
    for name in ("learned", "learned-layerwise"):
        assert plan[name]["mode"].startswith("stacked") and plan[name]["held"] > 0
        assert plan[name]["bytes"] == pytest.approx(done[name]["bytes"], rel=0.05), name
