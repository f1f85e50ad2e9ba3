"""A cook that loses its Ray mid-build, or is sent SIGTERM mid-build, ends within
`task.LOST_BOUND_S` with one line on stderr, logs nothing to MLflow and leaves no temporary
directory or process of its Ray behind; running it again registers exactly one version per recipe.

Both tests cook copies of one 3-trial sweep's store with ``--recipes greedy,learned``: greedy's
first progress line comes early in the build and learned keeps building for a while after it,
so the stop lands mid-build."""

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
from conftest import run, venv_bin
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from orchestrator.runtime import signals
from orchestrator.runtime.task import LOST_BOUND_S

RECIPES = ("greedy", "learned")
MID_BUILD = "greedy soup:"  # the build's first greedy line (the logging phase's comes much later)
HANG_S = 900  # only bounds a hang: a loaded machine takes minutes to start Ray and build


@pytest.fixture(scope="module")
def swept(swept3):
    """One finished 3-trial sweep ("s3", shared with other modules); each test cooks a copy of its
    store."""
    return swept3["root"]


@pytest.fixture
def store(swept, hermetic):
    """The test's own copy of the sweep's store (its artifacts stay where the sweep put them)."""
    shutil.copy(swept / "mlflow.db", hermetic["tmp"] / "mlflow.db")
    return hermetic


@pytest.fixture
def tmpdir_of_cook():
    """A TMPDIR of the cook's own, short (Ray's socket paths live under it): what is left there
    after the cook ended is what it left behind."""
    path = tempfile.mkdtemp(prefix="cs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Cook:
    """``soup cook`` in its own session: stdout read line by line, stderr to a file."""

    def __init__(self, env: dict, tmp, tmpdir: str):
        self.cmd = [venv_bin("soup"), "cook", "--sweep", "s3", "--recipes", ",".join(RECIPES)]
        self.env = {**env, "PYTHONUNBUFFERED": "1", "TMPDIR": tmpdir}
        self.err_path, self.lines, self.seen = tmp / "cook.err", queue.Queue(), []
        with open(self.err_path, "w") as err:  # the cook has its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=err,
                                         text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, prefix: str) -> None:
        """Until a stdout line starts with `prefix`; fails if the cook ends first."""
        deadline = time.monotonic() + HANG_S
        while (line := self.lines.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
            self.seen.append(line)
            if line.startswith(prefix):
                return
        pytest.fail(f"the cook ended before {prefix!r}: {self.output()}")

    def ray_processes(self) -> list[psutil.Process]:
        """The cook's descendants that are Ray's (GCS, raylet, workers, dashboard, reaper)."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "ray" in " ".join(p.cmdline()).lower():
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def stderr_last_line(self) -> str:
        lines = [x for x in self.err_path.read_text().splitlines() if x.strip()]
        return lines[-1] if lines else ""

    def output(self) -> str:
        return "".join(self.seen)[-3000:] + "\n--- stderr:\n" + self.err_path.read_text()[-3000:]

    def kill(self) -> None:
        """After the test: nothing of the cook's session may outlive it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _still_running(procs: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of `procs` still running (zombies count as gone) once all are gone or `within`
    seconds have passed."""
    deadline = time.monotonic() + within
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# What Ray's processes leave in TMPDIR even after a cook that succeeds: Ray's session directory,
# and a killed worker's multiprocessing directory, torch's compile cache and the build task's own.
NOT_THE_COOKS = re.compile(r"ray|pymp-.*|torchinductor_.*|soup-build-.*")


def _left_in_tmpdir(tmpdir: str) -> list[str]:
    """The cook's own temporary files or directories still there."""
    return [n for n in os.listdir(tmpdir) if not NOT_THE_COOKS.fullmatch(n)]


def _nothing_logged(uri: str) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny4")
    soups = client.search_runs([exp.experiment_id], "tags.`soup.role` = 'soup'",
                               run_view_type=ViewType.ALL)
    assert soups == [] and client.search_model_versions("name = 'tiny4-soup'") == []


def _rerun_registers_one_version_per_recipe(cook: Cook, uri: str) -> None:
    res = run(cook.cmd, cook.env, timeout=HANG_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reported = re.findall(r"^(\S+) soup: run \S+, registered ", res.stdout, re.MULTILINE)
    versions = MlflowClient(uri).search_model_versions("name = 'tiny4-soup'")
    assert sorted(v.tags["recipe"] for v in versions) == sorted(reported) == sorted(RECIPES)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signals_interrupt_once_then_restore_the_handlers(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals.stop_signals():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(sig)
        assert signals.stop_signal() == sig
        signal.raise_signal(sig)  # a second one waits for the cleanup the first one started
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_sigterm_that_ray_init_swallows_still_stops():
    def swallow(signum, frame):  # as Ray's handler does when its SystemExit is raised in a callback
        pass

    with signals.stop_signals():
        with pytest.raises(KeyboardInterrupt), signals.keep_stop_handler():  # around ray.init
            signal.signal(signal.SIGTERM, swallow)  # ray.init puts in its own
            signal.raise_signal(signal.SIGTERM)
        assert signals.stop_signal() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signals._stop


@pytest.mark.integration
@pytest.mark.slow
def test_cook_whose_ray_is_killed_mid_build_fails_in_bounded_time(store, tmpdir_of_cook):
    cook = Cook(store["env"], store["tmp"], tmpdir_of_cook)
    try:
        cook.wait_for_line(MID_BUILD)
        ray_procs = cook.ray_processes()
        assert ray_procs, cook.output()
        for p in ray_procs:  # that cook's Ray only, as `ray stop --force` would, not the cook
            p.kill()
        killed = time.monotonic()
        code = cook.proc.wait(HANG_S)
        took = time.monotonic() - killed
    finally:
        cook.kill()
    print(f"Ray killed -> cook exited {code} in {took:.1f} s")
    assert code not in (0, None) and took <= LOST_BOUND_S, (code, took, cook.output())
    last = cook.stderr_last_line()
    assert last.startswith("soup cook: error: the Ray cluster at ") and "stopped answering" in last, \
        cook.output()
    assert _left_in_tmpdir(tmpdir_of_cook) == []
    _nothing_logged(store["uri"])
    _rerun_registers_one_version_per_recipe(cook, store["uri"])


@pytest.mark.integration
@pytest.mark.slow
def test_cook_sent_sigterm_mid_build_stops_cleanly(store, tmpdir_of_cook):
    cook = Cook(store["env"], store["tmp"], tmpdir_of_cook)
    try:
        cook.wait_for_line(MID_BUILD)
        ray_procs = cook.ray_processes()
        assert ray_procs, cook.output()
        cook.proc.send_signal(signal.SIGTERM)  # the cook alone, as `kill PID`
        sent = time.monotonic()
        code = cook.proc.wait(HANG_S)
        took = time.monotonic() - sent
        left = _still_running(ray_procs, LOST_BOUND_S - took)
    finally:
        cook.kill()
    print(f"SIGTERM -> cook exited {code} in {took:.1f} s")
    assert code == 128 + signal.SIGTERM and took <= LOST_BOUND_S, (code, took, cook.output())
    assert left == [], [p.cmdline() for p in left]
    assert cook.stderr_last_line() == "soup cook: interrupted by SIGTERM", cook.output()
    assert _left_in_tmpdir(tmpdir_of_cook) == []
    _nothing_logged(store["uri"])
    _rerun_registers_one_version_per_recipe(cook, store["uri"])
