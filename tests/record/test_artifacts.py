"""Artifacts read back from a real MLflow store: a missing one is an answer, not an outage.

`Tracker` retries every MLflow call with backoff (a tracking server may restart), so a read of an
artifact that a run simply does not hold (a sweep without an online soup, a sweep never cooked)
must not be retried: it is `FileNotFoundError` at once, and the readers built on it say "none".
"""

import pytest

from orchestrator.record.schema import ONLINE_RECORD
from orchestrator.record.soups import online_record, save_online_record
from orchestrator.record.tracking import Tracker, read_artifact_text


@pytest.fixture
def run(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.experiment_id("artifacts")
    run_id = tracker.create_run(exp, "r", {})
    tracker.log_text(run_id, "hello", "notes/a.txt")
    tracker.log_text(run_id, "top", "top.txt")
    return tracker, run_id


def test_a_held_artifact_is_found_and_read(run):
    tracker, run_id = run
    assert tracker.has_artifact(run_id, "notes/a.txt")
    assert tracker.has_artifact(run_id, "notes")  # a folder
    assert tracker.has_artifact(run_id, "top.txt")  # at the root
    assert read_artifact_text(tracker, run_id, "notes/a.txt") == "hello"


@pytest.mark.parametrize("path", ["notes/b.txt", "missing/a.txt", "nothing.txt"])
def test_a_missing_artifact_is_file_not_found_without_retries(run, path, tmp_path):
    tracker, run_id = run
    assert not tracker.has_artifact(run_id, path)
    calls = []
    real = tracker.client.download_artifacts
    tracker.client.download_artifacts = lambda *a, **k: calls.append(a) or real(*a, **k)
    with pytest.raises(FileNotFoundError, match=f"has no artifact '{path}'"):
        tracker.download(run_id, path, tmp_path / "dst")
    assert calls == []  # not attempted, so never retried


def test_the_online_record_of_a_sweep_without_one_is_empty_and_otherwise_read(run):
    tracker, run_id = run
    assert online_record(tracker, run_id) == []
    save_online_record(tracker, run_id, [{"run_id": "x", "kept": True}])
    assert online_record(tracker, run_id) == [{"run_id": "x", "kept": True}]
    assert tracker.has_artifact(run_id, ONLINE_RECORD)
