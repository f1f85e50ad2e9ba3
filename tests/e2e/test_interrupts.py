"""Interrupts never look like success: SIGINT or SIGTERM to `soup sweep`, early or mid-sweep,
exits non-zero, ends the sweep run KILLED with the reason, leaves no trial run RUNNING, and
`soup sweep --resume` finishes the sweep."""

import os
import signal
import subprocess
import time

import pytest
from conftest import run, tiny_space, venv_bin
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _runs(uri):
    """(sweep runs, trial runs) of the tiny4 experiment; nothing yet when it does not exist."""
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name("tiny4")
    except Exception:  # noqa: BLE001 - the store may not be created yet
        return [], []
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id])
    role = lambda r: r.data.tags.get("soup.role")  # noqa: E731
    return [r for r in runs if role(r) == "sweep"], [r for r in runs if role(r) == "trial"]


def _reached(uri, moment: str) -> bool:
    """'started': a trial is training; 'mid-sweep': a trial has finished."""
    _, trials = _runs(uri)
    status = "RUNNING" if moment == "started" else "FINISHED"
    return any(t.info.status == status for t in trials)


@pytest.mark.parametrize("sig, moment", [(signal.SIGINT, "mid-sweep"), (signal.SIGTERM, "started")],
                         ids=["SIGINT-mid-sweep", "SIGTERM-started"])
def test_a_stopped_sweep_is_killed_not_finished_and_resumes(hermetic, sig, moment):
    # one trial at a time: the moments are unambiguous; "mid-sweep" needs a second trial to come
    n = 2 if moment == "mid-sweep" else 1
    space = tiny_space(hermetic["tmp"] / "tiny.yaml", n, concurrency=1)
    cmd = [venv_bin("soup"), "sweep", str(space), "--name", "stopped", "--storage-path", hermetic["storage"]]
    log = hermetic["tmp"] / "sweep.log"
    proc = subprocess.Popen(cmd, env=hermetic["env"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while not _reached(hermetic["uri"], moment) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None and _reached(hermetic["uri"], moment), log.read_text()[-3000:]
        proc.send_signal(sig)  # the driver alone, as `kill -INT PID` or `kill PID`
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 128 + sig.value, text[-3000:]
    assert f"interrupted by {sig.name}; continue it with: soup sweep" in text
    parents, trials = _runs(hermetic["uri"])
    assert [p.info.status for p in parents] == ["KILLED"]
    assert parents[0].data.tags["end_reason"] == f"interrupted by {sig.name}"
    assert not [t for t in trials if t.info.status == "RUNNING"]
    done = sum(t.info.status == "FINISHED" for t in trials)
    assert done < n
    res = run(cmd + ["--resume"], hermetic["env"], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parents, trials = _runs(hermetic["uri"])
    assert [p.info.status for p in parents] == ["FINISHED"] and "end_reason" not in parents[0].data.tags
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert len(finished) == n and len({t.data.tags["trial_key"] for t in finished}) == n
    assert not [t for t in trials if t.info.status == "RUNNING"]
