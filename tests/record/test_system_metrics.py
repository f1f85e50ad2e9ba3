"""MLflow's system metrics on trial runs (trials.system_metrics), on a real sqlite store."""

import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.record.tracking import Tracker
from orchestrator.record.trials import system_metrics


@pytest.fixture
def run(tmp_path):
    """(tracker, client, run id) of a new run in a store of the test's own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return Tracker(uri), client, client.create_run(client.create_experiment("sm")).info.run_id


def _cpu_points(client: MlflowClient, run_id: str) -> list:
    return client.get_metric_history(run_id, "system/cpu_utilization_percentage")


def test_an_attempt_shorter_than_the_interval_still_logs_a_point(run):
    """A resumed attempt with little left to train ends inside the first sampling interval;
    MLflow's monitor alone would log nothing for it."""
    tracker, client, run_id = run
    with system_metrics(tracker, run_id, interval=30.0):
        time.sleep(0.2)
    first = _cpu_points(client, run_id)
    assert len(first) == 1, first
    with system_metrics(tracker, run_id, interval=30.0):  # the next attempt appends
        time.sleep(0.2)
    steps = sorted(m.step for m in _cpu_points(client, run_id))
    assert steps == [first[0].step, first[0].step + 1], steps


def test_a_long_block_logs_points_while_it_runs(run):
    """Points are logged while the block runs (visibility on long trials), at distinct steps."""
    tracker, client, run_id = run
    with system_metrics(tracker, run_id, interval=0.5):
        deadline = time.time() + 60
        while not _cpu_points(client, run_id) and time.time() < deadline:
            time.sleep(0.1)  # until the monitor's own thread has logged a point
        assert _cpu_points(client, run_id), "nothing logged in 60 s at a 0.5 s interval"
    steps = [m.step for m in _cpu_points(client, run_id)]
    assert len(steps) >= 2 and len(set(steps)) == len(steps), steps
