"""Integration: sweep on real local Ray into a temporary MLflow store, then cook, then check MLflow."""

import json
import os

import pytest
import torch

from orchestrator.cook.driver import CookError, cook
from orchestrator.hashing import file_sha256
from orchestrator.soups.io.stream import read_weights
from orchestrator.soups.io.weights import save_weights, weighted_average
from orchestrator.soups.recipe import default_recipes

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RECIPES = default_recipes()  # uniform, greedy, learned, learned-layerwise, model-stock


def soup_runs(client, exp_id):
    runs = client.search_runs([exp_id], "tags.`soup.role` = 'soup'")
    return {r.data.tags["recipe"]: r for r in runs}


def test_every_recipe_and_baseline_is_reported(cooked):
    rows = {r["name"]: r for r in cooked["first"].rows}
    for name in ["zero-shot", "best individual", "ensemble", "greedy ensemble"] + [f"{r} soup" for r in RECIPES]:
        for col in ("heldout", "test", "rotate", "noise", "blur", "invert", "rendered", "shift_mean"):
            assert 0.0 <= rows[name][col] <= 1.0, (name, col)


def test_greedy_soup_is_at_least_the_best_individual_on_heldout(cooked):
    rows = {r["name"]: r for r in cooked["first"].rows}
    assert rows["greedy soup"]["heldout"] >= rows["best individual"]["heldout"]


def test_soup_runs_lineage_and_registered_versions(cooked):
    client, sweep = cooked["client"], cooked["sweep"]
    soups = soup_runs(client, sweep.experiment_id)
    assert set(soups) == set(RECIPES)
    trials = client.search_runs([sweep.experiment_id], "tags.`soup.role` = 'trial'")
    trial_ids = {t.info.run_id for t in trials}
    for recipe, run in soups.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
        assert set(run.data.tags["ingredients"].split(",")) == trial_ids
        assert {"heldout_acc", "test_acc", "shift_mean_acc"} <= set(run.data.metrics)
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "soup")}
        assert {"soup/coefficients.json", f"soup/{recipe}.safetensors"} <= arts
        assert client.list_artifacts(run.info.run_id, "plots")[0].path.endswith(".png")
    versions = client.search_model_versions("name = 'tiny4-soup'")
    assert sorted(v.tags["recipe"] for v in versions) == sorted(RECIPES)
    for v in versions:
        for tag in ("recipe", "sweep_id", "ingredients", "heldout_acc", "test_acc", "shift_mean_acc"):
            assert v.tags.get(tag), tag
    assert cooked["second"].versions == cooked["first"].versions
    assert sorted(cooked["second"].reused) == sorted(RECIPES)
    assert len(soup_runs(client, sweep.experiment_id)) == len(RECIPES)


def test_version_tags_hold_the_tables_figures_in_full(cooked):
    """Each version's accuracy tags are the cook's figures at full precision, so `soup models`
    shows what the cook's table shows (tags rounded to 4 places showed 53.3% for 53.35%)."""
    rows = {r["name"]: r for r in cooked["first"].rows}
    for recipe, version in cooked["first"].versions.items():
        tags = cooked["client"].get_model_version("tiny4-soup", version).tags
        row = rows[f"{recipe} soup"]
        for column in ("heldout", "test", "shift_mean", "rotate"):
            key = f"{column}_acc" if column != "rotate" else "shift_rotate_acc"
            assert float(tags[key]) == row[column], (recipe, key, tags[key], row[column])


def test_a_cooked_sweep_is_recognised_before_anything_is_built(cooked, tmp_path, monkeypatch, capsys):
    """`soup cook` of a sweep already cooked with the same trials, recipes and settings says so
    for every recipe and prints the recorded table, at no forward pass and no byte of checkpoint
    read; it registers nothing (it used to build and evaluate every soup first)."""
    import shutil

    from orchestrator import cli

    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # its artifacts stay shared
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = {str(v.version) for v in cooked["client"].search_model_versions("name = 'tiny4-soup'")}
    assert cli.main(["cook", "--sweep", "c4", "--verbose"]) == 0
    out = capsys.readouterr().out
    for recipe, version in cooked["first"].versions.items():
        assert f"{recipe} soup: already cooked as run {cooked['first'].soup_runs[recipe]}, version {version}" in out
    phase = next(line for line in out.splitlines() if line.startswith("already cooked"))
    assert phase.split()[2:4] == ["0", "0.0"], phase  # forward passes, MiB read
    assert "greedy soup" in out and "best individual" in out  # the recorded table
    from mlflow.tracking import MlflowClient

    assert {str(v.version) for v in MlflowClient(uri).search_model_versions("name = 'tiny4-soup'")} == before
    again = cook("c4", tracking_uri=uri, log=lambda s: None)
    assert sum(p["passes"] for p in again.phases) == 0
    assert json.dumps(again.rows) == json.dumps(cooked["first"].rows)  # NaN-safe, exact


def _base_state():
    """The weights every trial of tiny4 started from: the pretrained classifier, zero-shot head."""
    from conftest import SPACES

    from orchestrator import data
    from orchestrator.config import SearchSpace, load_yaml
    from orchestrator.train import models

    space = load_yaml(SearchSpace, SPACES / "tiny4.yaml")
    return models.build_classifier(space.base.model, data.load_task(space.base.data).classnames).state_dict()


def _artifact(client, run_id, path, tmp):
    return client.download_artifacts(run_id, path, str(tmp))


def test_soups_equal_their_recorded_weighted_sums(cooked, tmp_path):
    client, sweep = cooked["client"], cooked["sweep"]
    for recipe, run in soup_runs(client, sweep.experiment_id).items():
        rec = json.loads(open(_artifact(client, run.info.run_id, "soup/coefficients.json", tmp_path)).read())
        soup = read_weights(_artifact(client, run.info.run_id, f"soup/{recipe}.safetensors", tmp_path))
        states = [read_weights(_artifact(client, rid, "checkpoint/model.safetensors", tmp_path / rid))
                  for rid in rec["ingredients"]]
        coeffs = rec["coefficients"]
        if recipe == "model-stock":  # t * mean + (1 - t) * base, per tensor: the rest is the base's
            base = _base_state()
            expected = {k: sum(c * s[k] for c, s in zip(coeffs[k], states)) + (1 - sum(coeffs[k])) * base[k]
                        if k in coeffs else states[0][k] for k in soup}
        elif recipe == "uniform":
            expected = {k: torch.stack([s[k] for s in states]).mean(0) for k in soup}
        elif isinstance(coeffs, dict):  # per-layer learned coefficients
            expected = {k: sum(c * s[k] for c, s in zip(coeffs[k], states)) for k in soup}
        else:
            expected = weighted_average(states, coeffs)
        for k in soup:
            assert torch.allclose(soup[k], expected[k], atol=1e-5), (recipe, k)


def test_bad_ingredients_are_excluded_by_name(cooked, tmp_path):
    import shutil

    from orchestrator.record.tracking import Tracker

    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the shared store stays
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, sweep = Tracker(uri), cooked["sweep"]
    real = tracker.trial_runs(sweep.experiment_id, sweep.sweep_id, "FINISHED")[0]
    state = read_weights(_artifact(cooked["client"], real.info.run_id, "checkpoint/model.safetensors", tmp_path))
    wide = dict(state, **{"head.weight": torch.zeros(11, state["head.weight"].shape[1])})
    bad = {}
    for name, sd, sha in (("other-arch", wide, None), ("bad-checksum", state, "0" * 64)):
        tags = {k: v for k, v in real.data.tags.items() if not k.startswith("mlflow.")}
        tags["trial_key"] = name
        rid = tracker.create_run(sweep.experiment_id, name, tags, parent_run_id=sweep.parent_run_id)
        path = save_weights(sd, tmp_path / name / "model.safetensors")
        tracker.log_artifact(rid, path, "checkpoint")
        tracker.set_tags(rid, {"checkpoint_sha256": sha or file_sha256(path)})
        tracker.log_metrics(rid, {"heldout_acc": 0.999})  # ranked first: they must still be refused
        tracker.end_run(rid)
        bad[name] = rid
    messages = []
    out = cook(sweep.sweep_id, recipes=("uniform",), model_name="tiny4-bad", tracking_uri=uri,
               use_ray=False, log=messages.append)
    assert set(out.excluded) == set(bad.values())
    assert "head.weight" in out.excluded[bad["other-arch"]]
    assert "sha256" in out.excluded[bad["bad-checksum"]]
    assert any(bad["other-arch"] in m for m in messages) and any(bad["bad-checksum"] in m for m in messages)
    assert out.versions["uniform"]


def test_unknown_sweep_is_a_clear_error(cooked):
    with pytest.raises(CookError, match="no sweep 'nope'"):
        cook("nope", tracking_uri=cooked["uri"], use_ray=False)


def test_cooking_leaves_mlflow_process_globals_alone(cooked):
    """Soups are logged and registered through `MlflowClient` on the cook's own store: MLflow's
    process-global tracking and registry URIs (and their environment variables) stay as they were.

    Left pointed at one store, a later `MlflowClient(other_uri)` in the same process resolved its
    registry to the first store (a stopped server, in CI), and children inherited it via the env.
    """
    import mlflow

    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] != cooked["uri"]
    assert mlflow.get_registry_uri() == os.environ["MLFLOW_TRACKING_URI"]
    client = cooked["client"]
    for recipe, version in cooked["first"].versions.items():  # lineage: the version's source run
        mv = client.get_model_version("tiny4-soup", str(version))
        assert mv.run_id == cooked["first"].soup_runs[recipe]
        logged = [client.get_logged_model(o.model_id)  # the soup run's logged models
                  for o in client.get_run(mv.run_id).outputs.model_outputs]
        assert mv.source in {s for m in logged for s in (m.model_uri, m.artifact_location)}


def test_learned_mode_stacked_is_chosen_by_config_and_is_its_own_soup(cooked, tmp_path):
    """`cook.learned_mode` (here its CLI/API override): a stacked learned soup gets a key and a
    version of its own, tagged with its mode; the default one (auto) stays as it was."""
    import shutil

    from mlflow.tracking import MlflowClient

    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the shared store stays
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cook("c4", recipes=("learned",), tracking_uri=uri, use_ray=False, learned_mode="stacked")
    client = MlflowClient(uri)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'tiny4-soup'")}
    stacked = versions[str(out.versions["learned"])]
    default = versions[str(cooked["first"].versions["learned"])]
    assert stacked.tags["learned_mode"] == "stacked" and default.tags["learned_mode"] == "auto"
    assert len(versions) == len(RECIPES) + 1 and stacked.tags["soup_key"] != default.tags["soup_key"]
    assert "learned" not in out.reused
    again = cook("c4", recipes=("learned",), tracking_uri=uri, use_ray=False, learned_mode="stacked")
    assert again.reused == ["learned"] and str(again.versions["learned"]) == str(out.versions["learned"])


def test_sampled_learned_soup_on_the_tiny_world(cooked, tmp_path):
    """`learned_mode: sampled`, 2 of the 4 tiny-world ingredients a step: a soup of its own, with a
    coefficient for every ingredient, whose held-out accuracy is within a point of the default
    (stacked) learned soup's."""
    import shutil
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the shared store stays
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cook("c4", recipes=("learned",), tracking_uri=uri, use_ray=False, learned_mode="sampled",
               learned_sample=2)
    row = {r["name"]: r for r in out.rows}["learned soup"]
    first = {r["name"]: r for r in cooked["first"].rows}
    default, uniform = first["learned soup"], first["uniform soup"]
    print(f"held-out: sampled 2 of 4 {row['heldout']:.4f}, stacked {default['heldout']:.4f}, "
          f"uniform (where both start) {uniform['heldout']:.4f}")
    assert row["heldout"] >= uniform["heldout"] and abs(row["heldout"] - default["heldout"]) <= 0.02
    client = MlflowClient(uri)
    path = client.download_artifacts(out.soup_runs["learned"], "soup/coefficients.json", str(tmp_path))
    coefficients = json.loads(Path(path).read_text())["coefficients"]
    assert len(coefficients) == 4 and sum(coefficients) == pytest.approx(1.0, abs=1e-5)
    version = client.get_model_version("tiny4-soup", str(out.versions["learned"]))
    assert version.tags["learned_mode"] == "sampled" and version.tags["soup_key"] != \
        client.get_model_version("tiny4-soup", str(cooked["first"].versions["learned"])).tags["soup_key"]


def test_doctor_prints_its_table_and_logs_it_on_the_sweep_run(cooked, tmp_path, monkeypatch, capsys):
    """`soup doctor` on the cooked tiny sweep, in a Ray task as the cook's build: one row per
    ingredient but the best, with the greedy soup's decision; findings (or "no finding"); the
    forward passes, which are the held-out images once for the best model and four times per
    other ingredient, as `soup cook --plan --doctor` said beforehand; the table, the figure and
    the findings on the sweep's run."""
    import shutil

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator import cli
    from orchestrator.cook.plan import plan_cook

    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the shared store stays
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    planned = {p["name"]: p for p in plan_cook("c4", tracking_uri=uri, doctor=True).phases}["doctor"]
    try:
        assert cli.main(["doctor", "--sweep", "c4"]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    print(printed)
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("ingredient"))
    rows = lines[head + 1:head + 4]
    assert len(rows) == 3 and all(r.split()[-1] in ("kept", "left") for r in rows), rows
    assert lines[head + 4] == "findings:" and lines[head + 5].startswith("- ")
    images = int(lines[head - 1].split("; ")[1].split()[0].replace(",", ""))
    assert images == 269  # all of held-out: fewer than the default subsample of 2,000
    cost = next(line for line in lines if line.startswith("cost: "))
    assert cost.startswith(f"cost: {(1 + 4 * 3) * images:,} forward passes, "), cost
    assert planned["passes"] == (1 + 4 * 3) * images
    read = float(cost.split(", ")[1].split()[0].replace(",", ""))  # MiB: each ingredient once
    assert read == pytest.approx(planned["bytes"] / 2**20, rel=0.02), (cost, planned)
    client = MlflowClient(uri)
    parent = cooked["sweep"].parent_run_id
    names = {a.path for a in client.list_artifacts(parent, "doctor")}
    assert names == {"doctor/table.json", "doctor/paths.png"}
    assert "**Doctor**" in client.get_run(parent).data.tags["mlflow.note.content"]
