"""Real servers for integration tests, each on loopback and stopped without touching anything a
test did not start: PostgreSQL, `mlflow server` in front of it, and a Ray head for `ray job submit`.

PostgreSQL refuses to run as root, so when the tests run as root (CI containers) its commands
run as the `postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, free_ports, venv_bin

from orchestrator.runtime.connect import LOOPBACK_ONLY

PG_WAIT_S = 300  # generous: a loaded CI machine can take minutes to start or stop a server


def pg_bindir() -> Path | None:
    """The PostgreSQL server binaries (Debian puts them under /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster listening on 127.0.0.1 only, trust auth for one user."""

    bindir: Path
    root: Path
    port: int
    user: str = "soup"

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def _run(self, *cmd: str) -> None:
        subprocess.run(_as_pg_user([str(self.bindir / cmd[0]), *cmd[1:]]), check=True,
                       capture_output=True, text=True)

    def start(self) -> "Postgres":
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8")
        # -w waits for the server to accept connections; -t: pg_ctl's own 60 s is tight on a busy box
        self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "postgres.log"), "-w", "-t", str(PG_WAIT_S),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")
        return self

    def createdb(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)

    def stop(self) -> None:
        """Stop the server, then delete its files (never under a server still running)."""
        for mode in ("fast", "immediate"):  # immediate only when a fast stop did not finish in time
            done = subprocess.run(_as_pg_user([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"),
                                               "-m", mode, "-w", "-t", str(PG_WAIT_S), "stop"]),
                                  capture_output=True)
            if done.returncode == 0 or not (self.root / "data" / "postmaster.pid").exists():
                break
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """Start PostgreSQL in a fresh directory the server user can own."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found; .ci/run installs Debian's postgresql")
    root = Path(tempfile.mkdtemp(prefix="soup-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    return Postgres(bindir, root, free_port()).start()


class MlflowServer:
    """`mlflow server` on 127.0.0.1, with artifacts served by the server (mlflow-artifacts:/), or,
    with `artifacts` None, in front of a store whose runs already name their artifact locations."""

    def __init__(self, backend_uri: str, artifacts: Path | None, log: Path, port: int | None = None,
                 extra: tuple[str, ...] = (), env: dict | None = None):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port, self.extra, self.env = port or free_port(), extra, env or dict(os.environ)
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "MlflowServer":
        """Start the server and wait for /health; generous `timeout`: a first start on PostgreSQL
        runs every schema migration, which takes minutes on a loaded machine."""
        served = ["--artifacts-destination", str(self.artifacts), "--serve-artifacts"] if self.artifacts else []
        cmd = [venv_bin("mlflow"), "server", "--backend-store-uri", self.backend_uri, *served,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *self.extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        try:
            wait_for_http(f"{self.uri}/health", self.proc, self.log, timeout, "mlflow server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc:
            stop_session(self.proc)
        self.proc = None


# --- process plumbing shared by the servers ---------------------------------------------------

def poll_until(check, proc: subprocess.Popen, log: Path, deadline: float, what: str):
    """`check()` until it returns something true (an OSError counts as not yet: refused or reset
    while a server starts); fail early, with the log, if `proc` exits, or at `deadline`
    (`time.monotonic()`)."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {what}: {_tail(log)}")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting for {what} at the deadline: {_tail(log)}")
        time.sleep(0.5)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200 (see `poll_until`)."""
    def answers() -> bool:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200

    poll_until(answers, proc, log, time.monotonic() + timeout, f"{what} answering {url}")


def stop_session(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL
    after `grace` seconds and for whatever of the group outlives its leader."""
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader that exits first
    proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def owned_pids(mark: str, session: int | None = None) -> set[int]:
    """Live processes that a test started: those whose environment holds `mark` ("NAME=value"),
    inherited by all they start, whatever process group they move to; and those still in
    `session` (the id of a leader started with start_new_session=True), which covers children
    that rewrite their environment block along with their title (setproctitle)."""
    return {int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != os.getpid() and _is_owned(int(e), mark, session)}


def _is_owned(pid: int, mark: str, session: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, _ppid, _pgrp, sid = f.read().rsplit(b")", 1)[1].split()[:4]
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except (OSError, ValueError):  # gone, or another user's
        return False
    if state == b"Z":  # already dead, its parent will reap it
        return False
    return int(sid) == session or mark.encode() in environ


def kill_owned(mark: str, session: int | None = None, timeout: float = 120) -> None:
    """SIGKILL every process `owned_pids` finds and wait until none is left.

    A pidfd pins each process while it is checked again, so a pid reused in between by somebody
    else's process is never signalled."""
    deadline = time.monotonic() + timeout
    while left := owned_pids(mark, session):
        for pid in left:
            _kill_if_owned(pid, mark, session)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {mark} survived SIGKILL: {sorted(left)}")
        time.sleep(0.2)


def _kill_if_owned(pid: int, mark: str, session: int | None) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _is_owned(pid, mark, session):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_mark(name: str = "SOUP_TEST_OWNER") -> str:
    """A unique "NAME=value" to put in the environment of the processes a test starts."""
    return f"{name}={uuid.uuid4().hex}"


def listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """The (ip, port) of every TCP socket that `pids` listen on, read from /proc."""
    inodes = set().union(*(_socket_inodes(p) for p in pids)) if pids else set()
    return {addr for inode, addr in _tcp_listeners().items() if inode in inodes}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _tcp_listeners() -> dict[str, tuple[str, int]]:
    """inode -> (ip, port) of each listening TCP socket (state 0A) in this network namespace."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A":
                ip, port = cols[1].split(":")
                found[cols[9]] = (_proc_net_ip(ip, family), int(port, 16))
    return found


def _proc_net_ip(hexip: str, family: int) -> str:
    """The kernel prints an address as 32-bit words in host byte order."""
    raw = bytes.fromhex(hexip)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


# --- Ray ----------------------------------------------------------------------------------------

class RayHead:
    """A private Ray head for one test: `ray start --head --block` on 127.0.0.1, in its own
    session, temp dir and ports, ready when a job agent accepts submissions, and stopped without
    touching any other Ray on the machine (``ray stop`` would stop them all).

    Every process it starts carries a unique environment mark: Ray moves workers and job drivers
    into process groups and sessions of their own, so the mark (and the session, for processes
    that overwrite their environment with their title) finds them at stop(), not the group.
    """

    def __init__(self, log: Path, env: dict | None = None, num_cpus: int = 2):
        self.log, self.num_cpus = log, num_cpus
        self.mark = new_mark("SOUP_TEST_RAY_HEAD")
        # Every port is chosen: Ray's defaults are fixed numbers (agent 52365, client 10001,
        # metrics 44217 and 44227) that any other Ray on the machine may hold, and an agent that
        # cannot bind its port stays up but never becomes available to the job API.
        (self.port, self.dashboard_port, self.agent_port, self.client_port, autoscaler_metrics,
         dashboard_metrics) = free_ports(6)
        self.env = {**(env or os.environ), **dict([self.mark.split("=")]), **LOOPBACK_ONLY,
                    "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
                    "DASHBOARD_METRIC_PORT": str(dashboard_metrics),
                    # stop() at once: no 30 s drain for traffic that a test cluster does not have
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.temp_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.session: int | None = None  # `ray start` leads it; kept after the leader is reaped

    @property
    def address(self) -> str:
        """The GCS address, as for ``RAY_ADDRESS``."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The job API, as for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 600) -> "RayHead":
        """Start the head and wait (up to `timeout`, generous for a loaded machine) until it takes jobs."""
        # Short and private: Ray's unix sockets live under it (108-byte limit that a pytest
        # tmp_path can pass), and `ray start` records itself there, not in the machine-wide
        # /tmp/ray where a plain ray.init() elsewhere would find and join it.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        self.session = self.proc.pid
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self) -> list[str]:
        return [venv_bin("ray"), "start", "--head", "--block", f"--temp-dir={self.temp_dir}",
                "--node-ip-address=127.0.0.1", f"--port={self.port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={self.agent_port}",
                f"--ray-client-server-port={self.client_port}", f"--num-cpus={self.num_cpus}",
                "--include-dashboard=true", "--disable-usage-stats"]

    def _wait_ready(self, deadline: float) -> None:
        """Wait for what `ray job submit` needs, in order: the dashboard's job API, the head
        node's dashboard agent, and the job head finding that agent, proven by a no-op job.

        The last is the signal that matters: until the agent has registered its address, the
        job head answers a submission with 500 "No available agent to submit job" after 10 s
        (JobHead.submit_job in ray/dashboard/modules/job/job_head.py), and nothing but a
        submission asks it that question."""
        client = self._poll(deadline, "the dashboard's job API", self._job_client)
        self._poll(deadline, "the dashboard agent's /api/healthz", self._agent_healthy)
        probe = self._poll(deadline, "a job agent accepting jobs", lambda: self._submit_probe(client))
        self._poll(deadline, "the no-op probe job", lambda: self._probe_done(client, probe))

    def _poll(self, deadline: float, what: str, check):
        return poll_until(check, self.proc, self.log, deadline, f"Ray head: {what}")

    def _job_client(self):
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.dashboard)  # checks /api/version; sends the auth token
        except RuntimeError as err:  # the job module not routed yet: 404 on /api/version
            if "404" in str(err):
                return None
            raise

    def _agent_healthy(self) -> bool:
        """The agent's own health check (raylet and GCS included); public, no token needed."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}/api/healthz", timeout=5) as r:
            return r.status == 200

    def _submit_probe(self, client) -> str | None:
        try:
            return client.submit_job(entrypoint="true", submission_id=f"readiness-{uuid.uuid4().hex[:8]}")
        except RuntimeError as err:
            if "No available agent" in str(err):  # not yet: the only answer worth waiting out
                return None
            raise

    def _probe_done(self, client, job_id: str) -> bool:
        from ray.job_submission import JobStatus

        status = client.get_job_status(job_id)
        if status.is_terminal() and status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"the readiness probe job ended {status}: {client.get_job_logs(job_id)}")
        return status == JobStatus.SUCCEEDED

    def pids(self) -> set[int]:
        """Every live process of this head: Ray's daemons, workers and job drivers."""
        return owned_pids(self.mark, self.session)

    def stop(self, grace: float = 120) -> None:
        """Stop this head and all it started, and nothing else: SIGTERM to `ray start`, whose
        handler shuts its node down in order, then SIGKILL for whatever of ours is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_owned(self.mark, self.session, grace)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.proc = None
