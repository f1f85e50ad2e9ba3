"""Quiet, truthful terminal output: by default a person sees the command's own lines (each trial's
start and end, the cook's progress, the table); Ray's worker output, Ray Train's and Tune's detail
go to a log file named on the terminal; ``--verbose`` brings it all back (checked end to end on
the resumed sweep of ``test_preemption::test_driver_killed_then_resume_continues_from_the_checkpoint``)."""

import logging
import os
import re
import sys
import threading
from pathlib import Path

import pytest
from conftest import SPACES, run, venv_bin

from orchestrator.config import ModelConfig
from orchestrator.runtime import terminal
from orchestrator.train import models

RANDOM_INIT = "No pretrained weights loaded for model"


# --- open_clip's warning when no weights are wanted ------------------------------------------

def _random_init_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if RANDOM_INIT in r.getMessage()]


def test_building_without_pretrained_weights_does_not_warn(caplog):
    """The caller loads its weights next: open_clip's "initialized randomly" is not true of it."""
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        models.build_clip(ModelConfig(), pretrained_weights=False)
    assert _random_init_warnings(caplog) == []
    assert logging.getLogger().filters == filters, "the filter is gone after the call"


def test_pretrained_weights_that_are_missing_still_warn(caplog):
    """Weights wanted (pretrained_weights=True) but none named: open_clip's warning is true."""
    with caplog.at_level(logging.WARNING):
        models.build_clip(ModelConfig(pretrained=None), pretrained_weights=True)
    assert _random_init_warnings(caplog) == [
        f"{RANDOM_INIT} '{ModelConfig().arch}'. Model initialized randomly."]


def test_the_filter_drops_only_that_message_from_that_thread(caplog):
    arch = ModelConfig().arch
    message = f"{RANDOM_INIT} '{arch}'. Model initialized randomly."
    with caplog.at_level(logging.WARNING), models._no_weights_wanted(arch):
        logging.warning(message)  # noqa: LOG015 - as open_clip logs it; this thread, this model: dropped
        logging.warning(f"{RANDOM_INIT} 'ViT-B-32'. Model initialized randomly.")  # noqa: LOG015 - another model
        other = threading.Thread(target=logging.warning, args=(message,))  # another thread
        other.start()
        other.join()
    assert _random_init_warnings(caplog) == [
        f"{RANDOM_INIT} 'ViT-B-32'. Model initialized randomly.", message]


# --- where the output goes ----------------------------------------------------------------------

def test_detail_goes_to_the_log_and_own_lines_to_both(tmp_path, capsys):
    log = tmp_path / "logs" / "soup.log"
    with terminal.detail_to(log) as path:
        assert path == log.resolve() and terminal.detail_log() == path
        print("trial t00 started")  # the command's own line
        sys.stderr.write("2026/01/01 INFO mlflow.store: Creating tables\n")  # a library's log line
        worker = threading.Thread(target=print, args=("\x1b[36m(RayTrainWorker pid=1)\x1b[0m Reporting",))
        worker.start()  # as Ray's log forwarding thread prints a worker's line
        worker.join()
        terminal.note("detail only")
    out, err = capsys.readouterr()
    assert out == f"detail log: {log.resolve()}\ntrial t00 started\n" and err == ""
    assert log.read_text() == ("trial t00 started\n2026/01/01 INFO mlflow.store: Creating tables\n"
                               "(RayTrainWorker pid=1) Reporting\ndetail only\n")
    assert terminal.detail_log() is None
    print("after")
    assert capsys.readouterr().out == "after\n" and "after" not in log.read_text()


def test_no_detail_no_log_file(tmp_path, capsys):
    """A command refused before doing anything prints its one error line and leaves no file."""
    log = tmp_path / "soup.log"
    with pytest.raises(ValueError), terminal.detail_to(log):
        raise ValueError("bad input")
    assert not log.exists() and capsys.readouterr() == ("", "")


def test_an_error_after_detail_is_logged_with_its_traceback(tmp_path, capsys):
    log = tmp_path / "soup.log"
    with pytest.raises(RuntimeError), terminal.detail_to(log):
        sys.stderr.write("some detail\n")
        raise RuntimeError("it broke")
    assert "Traceback" in log.read_text() and "RuntimeError: it broke" in log.read_text()
    assert "detail log" in capsys.readouterr().out


def test_verbose_changes_nothing(capsys):
    stdout, stderr = sys.stdout, sys.stderr
    with terminal.detail_to(None) as path:
        assert path is None and terminal.detail_log() is None
        assert sys.stdout is stdout and sys.stderr is stderr
        print("everything", file=sys.stderr)
    assert capsys.readouterr().err == "everything\n"


# --- the commands, end to end -------------------------------------------------------------------

NOISE = ("Reporting training result", "Checkpoint successfully created", RANDOM_INIT, "Trial status",
         "Configuration for experiment", "View detailed results", "(RayTrainWorker", "(TrainController",
         "(run_trial pid=", "╭", "│", "INFO mlflow")
STARTED = re.compile(r"^trial (t\d+) .*started$", re.MULTILINE)
FINISHED = re.compile(r"^trial (t\d+) .*finished: held-out \d+\.\d%$", re.MULTILINE)


def _env(tmp: Path, **extra) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp / "state"), "PYTHONUNBUFFERED": "1", **extra}


def _space(tmp: Path, n: int, search: str = "") -> Path:
    path = tmp / f"space{n}.yaml"
    path.write_text((SPACES / "tiny4.yaml").read_text().replace("num_samples: 4", f"num_samples: {n}")
                    .replace("search:\n", "search:\n" + search))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One quiet `soup demo` of two tiny trials (sweep and cook), shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("quiet-demo")
    res = run([venv_bin("soup"), "demo", "--workdir", str(tmp / "w"), "--space", str(_space(tmp, 2))],
              _env(tmp), timeout=3600, cwd=tmp)
    return {"res": res, "tmp": tmp, "log": tmp / "w" / "soup.log"}


@pytest.mark.integration
@pytest.mark.slow
def test_demo_terminal_shows_trials_cook_and_table_only(demo):
    res = demo["res"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    terminal = res.stdout + res.stderr
    for noise in NOISE:
        assert noise not in terminal, (noise, terminal[-4000:])
    assert res.stderr == ""
    started, finished = STARTED.findall(res.stdout), FINISHED.findall(res.stdout)
    assert sorted(started) == sorted(finished) == ["t00", "t01"], res.stdout
    assert res.stdout.splitlines()[0] == f"detail log: {demo['log']}"
    for line in ("fetch and check: 2/2 trials", "greedy soup", "uniform soup", "demo finished in "):
        assert line in res.stdout, line
    assert res.stdout.splitlines()[-1] == f"detail log:   {demo['log']} (also on the sweep run: logs/soup.log)"


def _kept_log(uri: str, name: str, tmp: Path) -> str:
    """The text of the detail log kept on the store's one sweep run (`logs/<name>`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (sweep,) = client.search_runs([client.get_experiment_by_name("tiny4").experiment_id],
                                  "tags.`soup.role` = 'sweep'")
    return Path(client.download_artifacts(sweep.info.run_id, f"logs/{name}", str(tmp))).read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_demo_detail_is_in_the_log(demo):
    text = demo["log"].read_text()
    # the one-worker trials train in their Tune actors (`run_trial`), which report to Tune
    for detail in ("Checkpoint successfully created", "(run_trial pid=", "Ray resources:",
                   "Tune's trials at the end:"):
        assert detail in text, detail
    assert RANDOM_INIT not in text, "no untrue warning, in the log either"
    assert "\x1b[" not in text, "no terminal colour codes in a file"
    for t in ("t00", "t01"):
        assert re.search(rf"^trial {t} \(\w+_\d+\) result: .*'heldout_acc'", text, re.MULTILINE), t
    kept = _kept_log(f"sqlite:///{demo['tmp'] / 'w' / 'mlflow.db'}", "soup.log", demo["tmp"] / "kept")
    assert kept == text, "the sweep run keeps the whole log"


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_trial_is_named_on_the_terminal_with_the_log(tmp_path):
    """Quiet by default, the log in its default place: the error still reaches the terminal."""
    space = _space(tmp_path, 1, "  model.pretrained: {grid: [/nonexistent/base.safetensors]}\n")
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    res = run([venv_bin("soup"), "sweep", str(space), "--name", "bad", "--storage-path",
               str(tmp_path / "ray_results")], env, timeout=1800, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    first = res.stdout.splitlines()[0]
    assert first.startswith(f"detail log: {tmp_path / 'state' / 'soup' / 'logs'}/sweep-"), first
    log = Path(first.removeprefix("detail log: "))
    error = [line for line in res.stdout.splitlines() if line.startswith("trial t00 error: ")]
    assert len(error) == 1, res.stdout
    assert "RuntimeError: Pretrained value '/nonexistent/base.safetensors'" in error[0]
    assert f"detail: {log})" in error[0] and "/error.txt;" in error[0]
    assert "0 trials finished, 1 failed" in res.stdout
    for noise in NOISE:
        assert noise not in res.stdout + res.stderr, noise
    assert "Traceback" in log.read_text() and "(run_trial pid=" in log.read_text()
    assert f"detail log also on the sweep run: logs/{log.name}" in res.stdout.splitlines()
    kept = _kept_log(env["MLFLOW_TRACKING_URI"], log.name, tmp_path / "kept")
    assert kept == log.read_text() and "Traceback" in kept
