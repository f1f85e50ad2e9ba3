"""What a refused command must show and leave, shared by the bad-input tests of every package: one
line on stderr, exit 2, and MLflow's store as it was (a snapshot compared before and after)."""

from __future__ import annotations

from pathlib import Path

import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from orchestrator.cli import main


def one_error_line(err: str, command: str) -> str:
    """The single stderr line of a refused command (and proof that there is only one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"soup {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def snapshot(client: MlflowClient) -> dict:
    """Everything a refused command must leave as it was: runs, versions, models and aliases."""
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000) if exps else []
    models = {m.name: dict(client.get_registered_model(m.name).aliases)
              for m in client.search_registered_models()}
    versions = {(v.name, str(v.version)): dict(v.tags) for name in models
                for v in client.search_model_versions(f"name = '{name}'")}
    return {"experiments": sorted(exps), "runs": {r.info.run_id: r.info.status for r in runs},
            "models": models, "versions": versions}


# --- a, f: search spaces refused before MLflow and Ray -----------------------------------------

VALID_SPACE = {
    "base": {"train": {"epochs": 1, "batch_size": 128, "warmup_steps": 2}},
    "search": {"train.lr": {"loguniform": [1.0e-4, 1.0e-3]}},
    "sweep": {"num_samples": 2, "max_concurrent_trials": 2, "resources": {"cpu": 1}},
    "tracking": {"experiment_name": "bad-input"},
}


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_space(tmp: Path, change: dict | str) -> Path:
    path = tmp / "bad.yaml"
    text = change if isinstance(change, str) else yaml.safe_dump(merged(VALID_SPACE, change))
    path.write_text("# soup sweep bad.yaml\n" + text)
    return path


def sweep_is_refused(hermetic, capsys, change: dict | str, *fragments: str) -> str:
    """`soup sweep` on the changed space: exit 2, one line naming the file (and `fragments`),
    no Ray started, no Tune state, no experiment and no run in the test's MLflow store."""
    return space_is_refused(hermetic, capsys, write_space(hermetic["tmp"], change), *fragments)


def space_is_refused(hermetic, capsys, space: Path, *fragments: str) -> str:
    """`soup sweep SPACE`, for any file (or folder) `space`: refused as `sweep_is_refused` says."""
    import ray

    code = main(["sweep", str(space), "--storage-path", hermetic["storage"]])
    out, err = capsys.readouterr()
    line = one_error_line(err, "sweep")
    assert code == 2 and out == ""
    assert line.startswith(f"soup sweep: error: {space}: ")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not ray.is_initialized(), "Ray was started for a space that does not validate"
    assert not Path(hermetic["storage"]).exists()
    client = MlflowClient(hermetic["uri"])
    assert client.get_experiment_by_name("bad-input") is None
    assert snapshot(client)["runs"] == {}
    capsys.readouterr()  # MLflow's own log lines from creating the store just to look into it
    return line


