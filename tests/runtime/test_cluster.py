"""orchestrator.runtime.connect and .task: a local Ray listens on loopback only, as Ray itself reports; RAY_ADDRESS
joins the cluster it names. Each case runs in a fresh interpreter, because Ray reads the switch
once, when it is first imported."""

import json
import subprocess
import sys
import threading

import pytest
from conftest import run
from servers import RayHead, kill_owned, listening_addresses, new_mark, owned_pids

from orchestrator.runtime.connect import LOOPBACK_ENV, is_loopback

pytestmark = [pytest.mark.integration]

REPORT = """
import json, sys
from orchestrator.runtime.connect import init_ray
init_ray(log=lambda line: None)
import ray
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]}), flush=True)
sys.stdin.readline()  # hold the cluster up while the test looks at its sockets
ray.shutdown()
"""


def _user_env(hermetic, **extra) -> dict:
    """The environment of a user who never heard of the loopback switch (the suite sets it)."""
    env = {k: v for k, v in hermetic["env"].items() if k != LOOPBACK_ENV}
    return {**env, **extra}


def _start_reporter(env: dict, mark: str) -> tuple[subprocess.Popen, dict]:
    """Run REPORT with `mark` in its environment; return the process (holding its Ray up) and
    what Ray said about itself."""
    proc = subprocess.Popen([sys.executable, "-c", REPORT], env={**env, **dict([mark.split("=")])},
                            text=True, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(600, proc.kill)  # generous; a hung start must not hang the suite
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    if not line:
        kill_owned(mark, proc.pid)
        pytest.fail(f"init_ray failed: {proc.stderr.read()[-3000:]}")
    return proc, json.loads(line)


def _finish(proc: subprocess.Popen, mark: str) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    try:
        assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
    finally:
        kill_owned(mark, proc.pid)


def test_local_ray_listens_on_loopback_only(hermetic):
    mark = new_mark()
    proc, ray_says = _start_reporter(_user_env(hermetic), mark)
    try:
        host = ray_says["gcs"].rsplit(":", 1)[0]
        assert is_loopback(host), ray_says
        assert ray_says["nodes"] and all(is_loopback(ip) for ip in ray_says["nodes"]), ray_says
        listening = listening_addresses(owned_pids(mark, proc.pid))  # every server of that Ray
        assert listening and all(is_loopback(ip) for ip, _ in listening), sorted(listening)
    finally:
        _finish(proc, mark)
    assert not owned_pids(mark, proc.pid), "ray.shutdown() left processes behind"


def test_ray_address_joins_that_cluster(hermetic):
    head = RayHead(hermetic["tmp"] / "ray-head.log", hermetic["env"], num_cpus=1).start()
    mark = new_mark()
    try:
        proc, ray_says = _start_reporter(_user_env(hermetic, RAY_ADDRESS=head.address), mark)
        _finish(proc, mark)
    finally:
        head.stop()
    assert ray_says["gcs"] == head.address and ray_says["nodes"] == ["127.0.0.1"], ray_says


def test_init_ray_refuses_a_local_ray_off_loopback(hermetic):
    """Ray imported before orchestrator.runtime.connect has already chosen the network address: refuse."""
    code = "import ray\nfrom orchestrator.runtime.connect import init_ray\ninit_ray()\n"
    res = run([sys.executable, "-c", code], _user_env(hermetic), timeout=300)
    assert res.returncode != 0 and "not on loopback" in res.stderr, res.stderr[-3000:]


def test_every_entry_point_keeps_a_local_ray_on_loopback(hermetic):
    """The library's modules import ray themselves; importing any of them must already have set
    the switch (orchestrator/__init__.py importing orchestrator.runtime.connect does that)."""
    code = "import orchestrator.sweep, ray\nprint(ray.util.get_node_ip_address())\n"
    res = run([sys.executable, "-c", code], _user_env(hermetic), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert is_loopback(res.stdout.strip().splitlines()[-1]), res.stdout


STOPPED = """
import json, os, shutil, sys, tempfile, time
import psutil
from orchestrator.runtime import connect, task
connect.init_ray(log=lambda line: None)
import ray

def work(folder):
    yield ("log", os.getpid())
    while True:  # reads a file of the driver's, as the cook's build reads its checkpoints
        with open(os.path.join(folder, "input")) as f:
            f.read()
        time.sleep(0.01)

folder = tempfile.mkdtemp()
with open(os.path.join(folder, "input"), "w") as f:
    f.write("x")
pids, stopped = [], []

def log(pid):  # the stop signal's KeyboardInterrupt, once the task runs
    pids.append(pid)
    stopped.append(time.monotonic())
    raise KeyboardInterrupt

try:
    task.run_with_progress(work, (folder,), 1, 0, log)
except KeyboardInterrupt:
    took = time.monotonic() - stopped[0]
shutil.rmtree(folder)  # the cleanup that follows the interrupt
alive = psutil.pid_exists(pids[0]) and psutil.Process(pids[0]).status() != psutil.STATUS_ZOMBIE
ray.shutdown()
print(json.dumps({"alive": alive, "took": took}), flush=True)
"""


def test_a_stopped_task_has_ended_before_the_interrupt_goes_on(hermetic):
    """A stop signal during `run_with_progress` force-cancels the task and waits for its end, so
    the caller's cleanup never races with it: the task's worker is gone when the interrupt
    reaches the caller, and Ray prints no unhandled error of the task afterwards."""
    from orchestrator.runtime.task import CANCEL_WAIT_S

    mark = new_mark()
    try:
        res = run([sys.executable, "-c", STOPPED], {**hermetic["env"], **dict([mark.split("=")])},
                  timeout=600, start_new_session=True)
    finally:
        kill_owned(mark, None)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"the stopped task's worker was gone {out['took']:.2f} s after the interrupt: {not out['alive']}")
    # only a machine too busy to kill a process within CANCEL_WAIT_S would leave it running
    assert not out["alive"] or out["took"] >= CANCEL_WAIT_S, out
    assert "Unhandled error" not in res.stderr and "FileNotFoundError" not in res.stderr, res.stderr[-3000:]
