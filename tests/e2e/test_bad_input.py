"""Bad input: each case ends in one clear line and leaves MLflow as it was.

A command refused for bad input exits 2 with exactly one line on stderr,
``soup <command>: error: ...``, and no traceback. A bad run among good ones is excluded with a
line on stdout that names it (``excluded run <id> (<name>): <why>``) and the rest are cooked.
After every refusal the tracking store holds no new run, no new model version, and every alias
where it was.

| case | fault or bad input                                     | test                                                   |
|------|--------------------------------------------------------|--------------------------------------------------------|
| a    | search space with an unknown key                       | test_bad_input_space_unknown_key                       |
| a    | search space with a wrong type                         | test_bad_input_space_wrong_type                        |
| a    | search space with an empty range                       | test_bad_input_space_empty_range                       |
| a    | several errors at once, or not YAML at all             | test_bad_input_space_several_errors_stay_one_line      |
| b    | cook a sweep id that does not exist                    | test_bad_input_cook_unknown_sweep                      |
| b    | cook a sweep with no FINISHED runs                     | test_bad_input_cook_sweep_without_finished_runs        |
| c    | checkpoint artifact missing                            | test_bad_input_checkpoint_missing                      |
| c    | checkpoint corrupted (sha256 differs from its tag)     | test_bad_input_checkpoint_corrupted                    |
| c    | every run excluded                                     | test_bad_input_cook_every_run_excluded                 |
| d    | ingredient of another architecture (arch_sha256)       | test_bad_input_other_architecture                      |
| d    | ingredient of other base weights (pretrained_sha256)   | test_bad_input_other_base_weights                      |
| d    | ingredient whose tensor shapes differ                  | test_bad_input_tensor_shape_mismatch                   |
| e    | NaN weights                                            | test_bad_input_nan_weights                             |
| e    | Inf weights                                            | test_bad_input_inf_weights                             |
| f    | held-out (selection) split is also a reporting split   | test_bad_input_selection_split_is_reporting_split      |
| g    | promote to a version that does not exist               | test_bad_input_promote_unknown_version                 |
| g    | promote a model that does not exist                    | test_bad_input_promote_unknown_model                   |
| -    | the good runs beside the bad ones are still cooked     | test_bad_input_good_runs_are_still_cooked              |
| -    | unknown soup recipe                                    | test_bad_input_cook_unknown_recipe                     |
| -    | MLFLOW_TRACKING_URI names a sqlite store not there     | test_bad_input_store_that_does_not_exist               |
| -    | the installed `soup` script prints the same one line   | test_bad_input_console_script_prints_one_line          |
| h    | search space not UTF-8                                 | test_bad_input_space_not_utf8                          |
| h    | a folder given as the search space                     | test_bad_input_space_is_a_folder                       |
| h    | YAML bomb, endless alias, file over 1 MB               | test_bad_input_space_yaml_bomb_or_huge_file            |
| h    | empty search space (or finetune config)                | test_bad_input_space_empty_file                        |
| i    | MLFLOW_TRACKING_URI: a store that cannot be opened     | test_bad_input_sweep_store_cannot_be_opened            |
| i    | read-only store (file or folder)                       | test_bad_input_store_is_read_only                      |
| j    | a version's accuracy tag that is not a number          | test_bad_input_accuracy_tag_that_is_not_a_number       |
| j    | a model name with a quote                              | test_bad_input_model_name_with_a_quote                 |

Cases b-e and g share one module-scoped world (marked slow and integration): a copy of the store
of a real 3-trial sweep (shared with other modules), bad runs added beside its trials, two hand-made sweeps (for b and
c), and one in-process ``soup cook --no-ray`` over all of it. Cases a and f need no sweep; nor
do h-j: i and j use a registry made by hand (three versions, no training), copied per test.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from conftest import HAND, venv_bin
from mlflow.tracking import MlflowClient
from refusals import (  # noqa: F401
    VALID_SPACE,
    merged,
    one_error_line,
    snapshot,
    space_is_refused,
    sweep_is_refused,
    write_space,
)
from safetensors.torch import load_file, save_file

from orchestrator.cli import main

MODEL = "tiny4-soup"  # the default registered model of tests/spaces/tiny4.yaml
SWEEP, NO_FINISHED, ALL_BAD = "s3", "s3-nofinished", "s3-allbad"  # s3: conftest's `swept3`


def test_bad_input_template_space_is_valid(tmp_path):
    """The cases below each change one thing of this space, which is valid as it stands."""
    from orchestrator.config import SearchSpace, load_yaml

    assert load_yaml(SearchSpace, write_space(tmp_path, {})).sweep.num_samples == 2


@pytest.mark.parametrize("change, key", [
    ({"sweep": {"num_sample": 3}}, "sweep.num_sample"),
    ({"base": {"train": {"learning_rate": 1e-3}}}, "base.train.learning_rate"),
    ({"search": {"train.learning_rate": {"uniform": [0.1, 0.2]}}}, "search.train.learning_rate"),
    ({"search": {"train.lr": {"loguniform": [1e-4, 1e-3], "log": True}}}, "search.train.lr.log"),
    ({"trials": 4}, "trials"),
], ids=["sweep", "base", "searched", "distribution", "top"])
def test_bad_input_space_unknown_key(hermetic, capsys, change, key):
    sweep_is_refused(hermetic, capsys, change, f"key '{key}'")


@pytest.mark.parametrize("change, key, why", [
    ({"sweep": {"num_samples": "many"}}, "sweep.num_samples", "valid integer"),
    ({"search": {"train.lr": {"loguniform": ["low", "high"]}}}, "search.train.lr.loguniform.0", "valid number"),
    ({"search": {"train.epochs": {"choice": ["three", 4]}}}, "search.train.epochs",
     "choice value 'three' would make an invalid trial: Input should be a valid integer"),
    ({"search": {"train.lr": {"loguniform": [1e-4, 2.0]}}}, "search.train.lr",
     "loguniform upper bound 2.0 would make an invalid trial"),
    ({"search": {"train.mixup_alpha": {"uniform": [0.0, 0.5], "p_off": 0.5, "off_value": -1}}},
     "search.train.mixup_alpha", "off_value -1 would make an invalid trial"),
    ({"search": ["train.lr"]}, "search", "valid dictionary"),
    ({"cook": {"memory_budget": "lots"}}, "cook.memory_budget",
     "give a size (e.g. 12GiB, 500MiB) or a share of the device's free memory (e.g. 40%)"),
    ({"cook": {"learned_mode": "telepathy"}}, "cook.learned_mode", "'auto', 'stacked', 'sampled' or 'streaming'"),
    ({"sweep": {"stop": {"soup_patience": 3}}}, "sweep.stop.soup_patience",
     "the soup-patience stopper watches the online soup: set sweep.online_soup: true"),
    ({"sweep": {"online_soup": True, "stop": {"watch_best": True}}}, "sweep.stop.watch_best",
     "watching the best trial is part of the soup-patience stopper: set sweep.stop.soup_patience"),
], ids=["int", "float-range", "searched-value", "out-of-range", "off-value", "section", "budget", "mode",
        "patience", "watch-best"])
def test_bad_input_space_wrong_type(hermetic, capsys, change, key, why):
    sweep_is_refused(hermetic, capsys, change, f"key '{key}'", why)


@pytest.mark.parametrize("dist, why", [
    ({"loguniform": [1.0e-3, 1.0e-4]}, "loguniform range [0.001, 0.0001] is empty"),
    ({"uniform": [0.5, 0.5]}, "uniform range [0.5, 0.5] is empty"),
    ({"randint": [5, 4]}, "randint range [5, 4] is empty"),
    ({"choice": []}, "choice needs at least one value"),
    ({"grid": []}, "grid needs at least one value"),
], ids=["loguniform", "uniform", "randint", "choice", "grid"])
def test_bad_input_space_empty_range(hermetic, capsys, dist, why):
    key = {"loguniform": "train.weight_decay", "uniform": "train.label_smoothing",
           "randint": "train.epochs", "choice": "train.augment", "grid": "train.seed"}[next(iter(dist))]
    sweep_is_refused(hermetic, capsys, {"search": {key: dist}}, f"key 'search.{key}'", why)


def test_bad_input_space_several_errors_stay_one_line(hermetic, capsys):
    line = sweep_is_refused(hermetic, capsys, {"search": {
        "train.lr": {"loguniform": [1.0e-3, 1.0e-4]}, "train.epochs": {"randint": [5, 4]}},
        "sweep": {"num_samples": 0}}, "key 'search.train.lr'", "key 'search.train.epochs'",
        "key 'sweep.num_samples'")
    assert line.count("; key '") == 2
    sweep_is_refused(hermetic, capsys, "search: [\n", "not valid YAML", "at line 3")


@pytest.mark.parametrize("name", ["it's", "a\\b", "   "], ids=["quote", "backslash", "blank"])
def test_bad_input_sweep_id_that_mlflow_cannot_search(hermetic, capsys, name):
    """A sweep id is matched in MLflow searches, whose grammar has no escapes: refused up front."""
    import ray

    space = write_space(hermetic["tmp"], {})
    code = main(["sweep", str(space), "--name", name, "--storage-path", hermetic["storage"]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert f"sweep id {name!r}: must be non-empty, without quotes" in one_error_line(err, "sweep")
    assert not ray.is_initialized() and not Path(hermetic["storage"]).exists()


@pytest.mark.parametrize("change, key", [
    ({"base": {"data": {"selection_split": "test"}}}, "base.data.selection_split"),
    ({"base": {"data": {"reporting_splits": ["test", "heldout"]}}}, "base.data.selection_split"),
    ({"search": {"data.selection_split": {"choice": ["heldout", "test"]}}}, "search.data.selection_split"),
], ids=["selection", "reporting", "searched"])
def test_bad_input_selection_split_is_reporting_split(hermetic, capsys, change, key):
    sweep_is_refused(hermetic, capsys, change, f"key '{key}'", "is also a reporting split")
    ft = hermetic["tmp"] / "ft.yaml"  # the same refusal for one fine-tune, before any training
    ft.write_text("data:\n  selection_split: test\n")
    assert main(["finetune", "--config", str(ft)]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err, "finetune")
    assert out == "" and f"{ft}: key 'data.selection_split': selection split 'test'" in line


# --- b-e, g: a real sweep, bad runs beside its trials, one cook over all of it -----------------

def _artifact_file(client: MlflowClient, run_id: str, path: str) -> Path:
    """Where the local artifact store keeps a run's artifact (file:// beside the sqlite store)."""
    return Path(unquote(urlparse(client.get_run(run_id).info.artifact_uri).path)) / path


def _add_run(tracker, tmp: Path, exp_id, parent_id, sweep_id, name, tags, state=None,
             status="FINISHED") -> str:
    """A trial run as a sweep logs one: trial tags, a checkpoint with its sha256, held-out
    accuracy (0.999: ranked first, so it is checked before the good ones)."""
    from orchestrator.hashing import file_sha256

    rid = tracker.create_run(exp_id, name, {**tags, "sweep_id": sweep_id, "trial_id": name,
                                            "trial_key": name}, parent_run_id=parent_id)
    if state is not None:
        local = tmp / name / "model.safetensors"
        local.parent.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(local))
        tracker.log_artifact(rid, local, "checkpoint")
        tracker.set_tags(rid, {"checkpoint_sha256": file_sha256(local)})
        tracker.log_metrics(rid, {"heldout_acc": 0.999, "test_acc": 0.999})
    tracker.end_run(rid, status)
    return rid


def _hand_made_sweep(tracker, exp_id, real_parent, sweep_id: str) -> str:
    """A sweep's parent run as `soup sweep` leaves it (tags and resolved config), with no trials."""
    from orchestrator.record.tracking import read_artifact_text

    tags = {k: v for k, v in real_parent.data.tags.items() if not k.startswith("mlflow.")}
    rid = tracker.create_run(exp_id, sweep_id, {**tags, "sweep_id": sweep_id})
    text = read_artifact_text(tracker, real_parent.info.run_id, "space/resolved_config.yaml")
    tracker.log_text(rid, text, "space/resolved_config.yaml")
    tracker.end_run(rid)
    return rid


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(255 - b for b in data[mid:mid + 64])  # same length, other bytes
    path.write_bytes(bytes(data))


# A header that is valid JSON but not a safetensors layout, as a hand-edited or foreign file has.
MALFORMED_HEADERS = {
    "offsets-number": lambda h: {**h, next(iter(h)): {**h[next(iter(h))], "data_offsets": 0}},
    "header-list": lambda h: list(h.items()),
    "shape-null": lambda h: {**h, next(iter(h)): {**h[next(iter(h))], "shape": None}},
}


def _malform_header(path: Path, how: str) -> None:
    """Rewrite the file's JSON header with `MALFORMED_HEADERS[how]` (the tensor bytes stay)."""
    import json
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    raw = json.dumps(MALFORMED_HEADERS[how](header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _add_bad_runs(tracker, client, tmp, exp_id, parent_id, sweep_id, tags, state, kinds) -> dict[str, str]:
    runs = {}
    for kind in kinds:
        t, sd = dict(tags), dict(state)
        if kind == "other-arch":
            t["arch_sha256"] = "a" * 64
        elif kind == "other-base":
            t["pretrained_sha256"] = "b" * 64
        elif kind == "other-shape":
            pos = sd["visual.positional_embedding"]
            sd["visual.positional_embedding"] = torch.cat([pos, pos[:1]])  # one token too many
        elif kind == "nan-weights":
            w = sd["visual.transformer.resblocks.1.mlp.c_fc.weight"].clone()
            w[3, 7] = float("nan")
            sd["visual.transformer.resblocks.1.mlp.c_fc.weight"] = w
        elif kind == "inf-weights":
            b = sd["visual.ln_pre.bias"].clone()
            b[0] = float("inf")
            sd["visual.ln_pre.bias"] = b
        name = f"{sweep_id}-{kind}"
        rid = _add_run(tracker, tmp, exp_id, parent_id, sweep_id, name, t, sd)
        if kind == "missing-checkpoint":
            _artifact_file(client, rid, "checkpoint/model.safetensors").unlink()
        elif kind == "corrupt-checkpoint":
            _corrupt(_artifact_file(client, rid, "checkpoint/model.safetensors"))
        elif kind.startswith("malformed-"):  # malformed-<how>[-tagged]: tagged = sha256 tag updated
            from orchestrator.hashing import file_sha256

            path = _artifact_file(client, rid, "checkpoint/model.safetensors")
            _malform_header(path, kind.removeprefix("malformed-").removesuffix("-tagged"))
            if kind.endswith("-tagged"):
                tracker.set_tags(rid, {"checkpoint_sha256": file_sha256(path)})
        runs[kind] = rid
    return runs


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` with its stdout and stderr (a module-scoped fixture cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


MALFORMED_KINDS = tuple(f"malformed-{how}{tagged}" for how in MALFORMED_HEADERS for tagged in ("", "-tagged"))
BAD_KINDS = ("missing-checkpoint", "corrupt-checkpoint", "other-arch", "other-base", "other-shape",
             "nan-weights", "inf-weights", *MALFORMED_KINDS)


@pytest.fixture(scope="module")
def world(swept3, tmp_path_factory):
    """A copy of the shared real 3-trial sweep's store (conftest's `swept3`; its artifacts stay
    where the sweep put them); a bad run of every kind added to it; two hand-made sweeps (one with
    no FINISHED trial, one whose every trial is bad); one cook of the real sweep."""
    from orchestrator.record.schema import CHECKPOINT_PATH
    from orchestrator.record.tracking import Tracker

    tmp = tmp_path_factory.mktemp("bad-input")
    shutil.copy(swept3["root"] / "mlflow.db", tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = swept3["outcome"]
    assert (sweep.finished, sweep.failed) == (3, 0) and swept3["sweep"] == SWEEP

    tracker, client = Tracker(uri), MlflowClient(uri)
    exp_id = sweep.experiment_id
    good = tracker.trial_runs(exp_id, SWEEP, "FINISHED")
    tags = {k: v for k, v in good[0].data.tags.items()
            if not k.startswith("mlflow.") and k not in ("checkpoint_sha256",)}
    state = load_file(str(tracker.download(good[0].info.run_id, CHECKPOINT_PATH, tmp / "good")))
    bad = _add_bad_runs(tracker, client, tmp, exp_id, sweep.parent_run_id, SWEEP, tags, state, BAD_KINDS)

    parent = client.get_run(sweep.parent_run_id)
    nofin = _hand_made_sweep(tracker, exp_id, parent, NO_FINISHED)
    for status in ("FAILED", "KILLED", "RUNNING"):
        _add_run(tracker, tmp, exp_id, nofin, NO_FINISHED, f"{NO_FINISHED}-{status.lower()}", tags,
                 state if status == "FAILED" else None, status=status)
    allbad = _hand_made_sweep(tracker, exp_id, parent, ALL_BAD)
    all_bad = _add_bad_runs(tracker, client, tmp, exp_id, allbad, ALL_BAD, tags, state,
                            ("missing-checkpoint", "corrupt-checkpoint", "nan-weights"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        code, out, err = _cli(["cook", "--sweep", SWEEP, "--recipes", "uniform", "--no-ray"])
    client.set_registered_model_alias(MODEL, "champion", "1")  # the alias the promote cases keep
    yield {"uri": uri, "client": client, "tracker": tracker, "sweep": sweep, "bad": bad,
           "all_bad": all_bad, "good": [r.info.run_id for r in good],
           "cook": {"code": code, "out": out, "err": err}}


@pytest.fixture
def store(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    return world


def cook_is_refused(store, capsys, argv: list[str], *fragments: str) -> tuple[str, str]:
    before = snapshot(store["client"])
    code = main(["cook", *argv])
    out, err = capsys.readouterr()
    line = one_error_line(err, "cook")
    assert code == 2
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(store["client"]) == before, "a refused cook changed what MLflow holds"
    return line, out


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_cook_unknown_sweep(store, capsys):
    line, out = cook_is_refused(store, capsys, ["--sweep", "nope", "--no-ray"], "no sweep 'nope' in sqlite:")
    assert out == ""
    line, out = cook_is_refused(store, capsys, ["--sweep", "it's", "--no-ray"], "no sweep \"it's\"")
    assert out == ""


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_cook_sweep_without_finished_runs(store, capsys):
    line, out = cook_is_refused(store, capsys, ["--sweep", NO_FINISHED, "--no-ray"],
                                f"sweep '{NO_FINISHED}' has no FINISHED trial runs to cook")
    assert out == ""


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_cook_unknown_recipe(store, capsys):
    line, out = cook_is_refused(store, capsys, ["--sweep", SWEEP, "--recipes", "uniform,gredy", "--no-ray"],
                                "unknown soup recipe 'gredy'",
                                "known: greedy, learned, learned-layerwise, model-stock, online-greedy, uniform")
    assert out == ""


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_cook_every_run_excluded(store, capsys):
    line, out = cook_is_refused(store, capsys, ["--sweep", ALL_BAD, "--no-ray"],
                                f"sweep '{ALL_BAD}': every run was excluded")
    for kind, rid in store["all_bad"].items():
        assert rid in line, kind
        assert sum(f"excluded run {rid} ({ALL_BAD}-{kind}): " in o for o in out.splitlines()) == 1
    assert not store["client"].search_runs([store["sweep"].experiment_id],
                                           f"tags.`soup.role` = 'soup' and tags.sweep_id = '{ALL_BAD}'")


def excluded_line(world, kind: str) -> str:
    """The cook's one stdout line about the bad run `kind`; the run itself is left untouched."""
    assert world["cook"]["code"] == 0, world["cook"]["err"][-3000:]
    rid = world["bad"][kind]
    lines = [o for o in world["cook"]["out"].splitlines() if rid in o]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"excluded run {rid} ({SWEEP}-{kind}): "), lines[0]
    run = world["client"].get_run(rid)
    assert run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"
    version = world["client"].get_model_version(MODEL, "1")
    assert rid not in version.tags["ingredients"]
    return lines[0]


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_good_runs_are_still_cooked(world, tmp_path):
    assert world["cook"]["code"] == 0 and "soup cook: error" not in world["cook"]["err"]
    versions = world["client"].search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert sorted(versions[0].tags["ingredients"].split(",")) == sorted(world["good"])
    assert "uniform soup" in world["cook"]["out"]
    excluded = [o for o in world["cook"]["out"].splitlines() if o.startswith("excluded run ")]
    assert len(excluded) == len(BAD_KINDS)
    # the cook's detail log is kept on the sweep run, beside the sweep's own
    lines = world["cook"]["out"].splitlines()
    log = Path(lines[0].removeprefix("detail log: "))
    assert lines[0].startswith("detail log: ") and log.name.startswith("cook-"), lines[0]
    assert lines[-1] == f"detail log also on the sweep run: logs/{log.name}", lines[-1]
    kept = world["client"].download_artifacts(world["sweep"].parent_run_id, f"logs/{log.name}", str(tmp_path))
    assert Path(kept).read_text() == log.read_text() and all(e in log.read_text() for e in excluded)


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_checkpoint_missing(world):
    assert "checkpoint artifact missing" in excluded_line(world, "missing-checkpoint")


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_checkpoint_corrupted(world):
    assert "checkpoint sha256 does not match its tag" in excluded_line(world, "corrupt-checkpoint")


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_other_architecture(world):
    assert "arch_sha256 aaaaaaaaaaaa differs from the sweep's base" in excluded_line(world, "other-arch")


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_other_base_weights(world):
    line = excluded_line(world, "other-base")
    assert "pretrained_sha256 bbbbbbbbbbbb differs from the sweep's base" in line


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_tensor_shape_mismatch(world):
    line = excluded_line(world, "other-shape")
    assert "'visual.positional_embedding'" in line and "18, 64" in line and "17, 64" in line


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_nan_weights(world):
    line = excluded_line(world, "nan-weights")
    assert "tensor 'visual.transformer.resblocks.1.mlp.c_fc.weight' has NaN or Inf values" in line


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_inf_weights(world):
    assert "tensor 'visual.ln_pre.bias' has NaN or Inf values" in excluded_line(world, "inf-weights")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_bad_input_malformed_checkpoint_header(world, kind):
    """A header that is JSON but no safetensors layout (offsets a number, a list, a null shape),
    with its sha256 tag updated or not: that run excluded by name, the others cooked (the cook
    used to end in a TypeError traceback)."""
    line = excluded_line(world, kind)
    why = {"offsets-number": "has a corrupt data_offsets 0", "header-list": "a JSON list, not an object",
           "shape-null": "has a corrupt shape None"}[kind.removeprefix("malformed-").removesuffix("-tagged")]
    assert why in line, line


def promote_is_refused(store, capsys, argv: list[str], *fragments: str) -> str:
    before = snapshot(store["client"])
    code = main(["promote", *argv])
    out, err = capsys.readouterr()
    line = one_error_line(err, "promote")
    assert code == 2 and out == ""
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(store["client"]) == before, "a refused promotion changed the registry"
    assert str(store["client"].get_model_version_by_alias(MODEL, "champion").version) == "1"
    return line


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_promote_unknown_version(store, capsys):
    promote_is_refused(store, capsys, [MODEL, "--version", "99"],
                       f"model '{MODEL}' has no version 99 (its versions: 1)")
    promote_is_refused(store, capsys, [MODEL, "--version", "99", "--force", "--reason", "r"], "no version 99")
    promote_is_refused(store, capsys, [MODEL, "--version", "one"], "no version one")
    promote_is_refused(store, capsys, [MODEL, "--version", "1", "--alias", "latest"],
                       "alias 'latest' refused by MLflow")


@pytest.mark.integration
@pytest.mark.slow
def test_bad_input_promote_unknown_model(store, capsys):
    promote_is_refused(store, capsys, ["nosuch-soup", "--version", "1"],
                       "no registered model 'nosuch-soup' in sqlite:")
    promote_is_refused(store, capsys, ["nosuch-soup", "--version", "1", "--alias", "champion", "--force"],
                       "no registered model 'nosuch-soup'")


@pytest.mark.fresh_store
def test_bad_input_console_script_prints_one_line(hermetic):
    """The installed `soup` script, not just `main`: one line on stderr, exit 2, no run."""
    space = write_space(hermetic["tmp"], {"search": {"train.lr": {"loguniform": [1.0e-3, 1.0e-4]},
                                                     "train.epochs": {"randint": [5, 4]}}})
    res = subprocess.run([venv_bin("soup"), "sweep", str(space)], env=hermetic["env"], text=True,
                         capture_output=True, timeout=300, cwd=hermetic["tmp"])
    assert res.returncode == 2 and res.stdout == ""
    line = one_error_line(res.stderr, "sweep")
    assert "search.train.lr" in line and "search.train.epochs" in line
    assert not (hermetic["tmp"] / "mlflow.db").exists() and not (hermetic["tmp"] / "mlruns").exists()


@pytest.mark.parametrize("argv", [["cook", "--sweep", SWEEP, "--no-ray"], ["promote", MODEL, "--version", "1"],
                                  ["models", MODEL]], ids=["cook", "promote", "models"])
def test_bad_input_store_that_does_not_exist(tmp_path, monkeypatch, capsys, argv):
    """A mistyped store is refused, not created empty (and MLflow's creation logs never printed)."""
    db = tmp_path / "typo" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"no MLflow store at sqlite:///{db}" in one_error_line(err, argv[0])
    assert not db.exists() and not db.parent.exists()


# --- h: files that are no usable config, refused before MLflow and Ray -------------------------

def test_bad_input_space_not_utf8(hermetic, capsys):
    space = hermetic["tmp"] / "latin1.yaml"
    text = "# soup sweep latin1.yaml\ntracking:\n  experiment_name: café\n"
    space.write_bytes(text.encode("latin-1"))  # as an editor set to Latin-1 saves it
    space_is_refused(hermetic, capsys, space,
                     f"not UTF-8 text (byte 0xe9 at offset {text.index('é')}); save it as UTF-8")


def test_bad_input_space_is_a_folder(hermetic, capsys):
    space = hermetic["tmp"] / "spaces"
    space.mkdir()
    space_is_refused(hermetic, capsys, space, "is a folder, not a YAML file")


def billion_laughs(levels: int = 9) -> tuple[str, int]:
    """A few hundred bytes of nested aliases, and the YAML nodes they expand to (10**levels
    strings, gigabytes once built)."""
    lines, node = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], 11
    total = 1 + 1 + node  # the top mapping, the first key, its sequence
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
        node = 1 + 10 * node
        total += 1 + node
    return "\n".join(lines) + "\n", total


@pytest.mark.parametrize("text, why", [
    (billion_laughs()[0], f"refused: its aliases expand it to {billion_laughs()[1]:,} YAML nodes "
                          "(limit 100,000)"),
    ("search: &s\n  train.lr: *s\n", "refused: an alias refers to its own anchor (an endless structure)"),
    ("#" * (1 << 20) + "\n", "refused: larger than 1 MB (a config is a few KB)"),
], ids=["billion-laughs", "endless", "over-1MB"])
def test_bad_input_space_yaml_bomb_or_huge_file(hermetic, capsys, monkeypatch, text, why):
    """Refused from the file's size, or from the node graph before any object is built."""
    from orchestrator.config import ConfigError, parse_yaml

    space = hermetic["tmp"] / "bomb.yaml"
    space.write_text(text)
    with monkeypatch.context() as mp:  # proof that the expansion is never built
        mp.setattr(yaml.SafeLoader, "construct_document", lambda *a: pytest.fail("bomb was built"))
        space_is_refused(hermetic, capsys, space, why)
        if len(text) < 1000:  # the same guard for a value given on the command line
            assert main(["finetune", "--set", f"train.lr={text}"]) == 2
            assert why in one_error_line(capsys.readouterr().err, "finetune")
            with pytest.raises(ConfigError, match="refused"):
                parse_yaml(text, "text")


@pytest.mark.parametrize("text", ["", "# soup sweep empty.yaml\n\n# nothing yet\n", "~\n"],
                         ids=["empty", "only-comments", "null"])
def test_bad_input_space_empty_file(hermetic, capsys, text):
    """An empty space is not the default sweep; an empty `--config` is not the defaults either
    (leave `--config` out, or write `{}`, to mean them)."""
    from orchestrator.config import FinetuneConfig, load_yaml

    space = hermetic["tmp"] / "empty.yaml"
    space.write_text(text)
    why = "no settings in it (the file is empty, only comments, or null)"
    space_is_refused(hermetic, capsys, space, why)
    assert main(["finetune", "--config", str(space)]) == 2
    assert one_error_line(capsys.readouterr().err, "finetune") == f"soup finetune: error: {space}: {why}"
    space.write_text("{}\n")
    assert load_yaml(FinetuneConfig, space) == FinetuneConfig()


# --- i: a store that cannot be opened or written, refused before any work ----------------------

@pytest.mark.parametrize("where, why", [
    ("no-such-folder/mlflow.db", "cannot be opened: folder {tmp}/no-such-folder does not exist"),
    ("a-file/mlflow.db", "cannot be opened: {tmp}/a-file is a file, not a folder"),
    ("a-folder", "cannot be opened: {tmp}/a-folder is a folder, not a sqlite file"),
    ("not-sqlite.db", "cannot be opened: file is not a database"),
], ids=["missing-folder", "under-a-file", "a-folder", "not-sqlite"])
def test_bad_input_sweep_store_cannot_be_opened(hermetic, capsys, monkeypatch, where, why):
    """`soup sweep` starts a store where none is, but not in a folder that is not there (or is a
    file), and not over a folder or a file that is not sqlite; nothing is created."""
    import ray

    tmp = hermetic["tmp"]
    (tmp / "a-file").write_text("a file, not a folder\n")
    (tmp / "a-folder").mkdir()
    (tmp / "not-sqlite.db").write_text("not a database\n" * 100)
    uri = f"sqlite:///{tmp / where}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    space = write_space(tmp, {})
    before = sorted(tmp.rglob("*"))
    code = main(["sweep", str(space), "--storage-path", hermetic["storage"]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_error_line(err, "sweep") == f"soup sweep: error: MLflow store {uri} {why.format(tmp=tmp)}"
    assert not ray.is_initialized()
    assert sorted(tmp.rglob("*")) == before, "a refused sweep created files or folders"


def _unwritable(path: Path) -> bool:
    try:
        if path.is_dir():
            tempfile.TemporaryFile(dir=path).close()
        else:
            path.open("ab").close()
    except PermissionError:
        return True
    return False


@contextlib.contextmanager
def writes_denied(path: Path):
    """`path` (a file or a folder) made unwritable for this process, root included: permission
    bits do not bind root, the immutable attribute (`chattr +i`) does. Skips where it cannot be
    set (no CAP_LINUX_IMMUTABLE, or a file system without it)."""
    root, mode = os.geteuid() == 0, path.stat().st_mode
    try:
        if root:
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode:
                pytest.skip("as root, only `chattr +i` denies writes, and it cannot be set here")
        else:
            path.chmod(mode & ~0o222)
        if not _unwritable(path):
            pytest.skip(f"could not make {path} unwritable for this process")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(mode)


def refused(client: MlflowClient, capsys, argv: list[str], *fragments: str) -> str:
    """`soup ARGV`: exit 2, one stderr line holding `fragments`, the store as it was."""
    before = snapshot(client)
    code = main(argv)
    out, err = capsys.readouterr()
    line = one_error_line(err, argv[0])
    assert code == 2 and out == ""
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(client) == before, f"a refused `soup {argv[0]}` changed what MLflow holds"
    return line


@pytest.mark.parametrize("command, denied", [
    (command, denied) for command in ("sweep", "cook", "promote") for denied in ("file", "folder")
] + [("sweep", "folder-of-a-new-store")])
def test_bad_input_store_is_read_only(registry, capsys, command, denied):
    """A store the command would write to, read-only: one line before any work (no Ray, no
    build), not retried write errors after it. Listing, which only reads, still works."""
    import ray

    db, tmp, uri = registry["db"], registry["tmp"], registry["uri"]
    if denied == "folder-of-a-new-store":
        db.unlink()
    argv = {"sweep": ["sweep", str(write_space(tmp, {})), "--storage-path", str(tmp / "ray_results")],
            "cook": ["cook", "--sweep", "any", "--no-ray"],
            "promote": ["promote", HAND, "--version", "3"]}[command]
    why = {"file": "is read-only: attempt to write a readonly database",
           "folder": f"is read-only: its folder {db.parent} is not writable (sqlite keeps its journal there)",
           "folder-of-a-new-store": f"cannot be created: folder {db.parent} is not writable ("}[denied]
    before = snapshot(registry["client"]) if db.exists() else None
    files = sorted(db.parent.iterdir())
    with writes_denied(db if denied == "file" else db.parent):
        code, out, err = _cli(argv)
        if command == "promote":
            assert _cli(["models", HAND])[0] == 0, "a read-only store can still be listed"
    assert code == 2 and out == ""
    assert one_error_line(err, command).startswith(f"soup {command}: error: MLflow store {uri} {why}")
    assert not ray.is_initialized() and not (tmp / "ray_results").exists()
    assert sorted(db.parent.iterdir()) == files, "a refused command left files beside the store"
    assert (snapshot(registry["client"]) if db.exists() else None) == before


# --- j: what a person may have typed into the registry -----------------------------------------

def _listing(capsys) -> dict[str, list[str]]:
    """`soup models HAND`'s rows by version: version, recipe, held-out, test, shift, aliases."""
    assert main(["models", HAND]) == 0
    return {row.split()[0]: row.split() for row in capsys.readouterr().out.splitlines()[2:]}


def test_bad_input_accuracy_tag_that_is_not_a_number(registry, capsys):
    """A held-out figure edited to 'n/a' shows as '-'; the gate refuses that version, and refuses
    to compare with a holder whose figure it is, unless --force."""
    client = registry["client"]
    client.set_model_version_tag(HAND, "2", "heldout_acc", "n/a")  # as a person may, in the UI
    rows = _listing(capsys)
    assert rows["2"][2:5] == ["-", "50.0%", "40.0%"] and rows["1"][2] == "90.0%"
    refused(client, capsys, ["promote", HAND, "--version", "2"],
            "refused: version 2 has held-out accuracy 'n/a' (tag heldout_acc), not a number; "
            "pass --force to override")
    client.set_model_version_tag(HAND, "1", "heldout_acc", "n/a")  # now the champion's own figure
    assert _listing(capsys)["1"][2] == "-"
    refused(client, capsys, ["promote", HAND, "--version", "3"],
            "refused: 'champion' (version 1) has held-out accuracy 'n/a' (tag heldout_acc), not a "
            "number, so version 3 cannot be compared with it; pass --force to override")
    assert main(["promote", HAND, "--version", "3", "--force", "--reason", "v1's figure was lost"]) == 0
    assert str(client.get_model_version_by_alias(HAND, "champion").version) == "3"


@pytest.mark.parametrize("name", ["it's", 'a "soup"', "a\\b"], ids=["quote", "double-quote", "backslash"])
def test_bad_input_model_name_with_a_quote(registry, capsys, name):
    refused(registry["client"], capsys, ["models", name], f"model name {name!r} cannot be looked up: "
            "MLflow's search has no escape for quotes or backslashes")
    refused(registry["client"], capsys, ["promote", name, "--version", "1"], f"no registered model {name!r}")
