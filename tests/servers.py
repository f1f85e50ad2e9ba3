"""Real servers for integration tests: PostgreSQL on loopback and `mlflow server` in front of it.

PostgreSQL refuses to run as root, so when the tests run as root (CI containers) its commands
run as the `postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, venv_bin


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
        self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "postgres.log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")
        return self

    def createdb(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)

    def stop(self) -> None:
        subprocess.run(_as_pg_user([str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"),
                                    "-m", "fast", "-w", "stop"]), capture_output=True)
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

    def start(self, timeout: float = 120) -> "MlflowServer":
        served = ["--artifacts-destination", str(self.artifacts), "--serve-artifacts"] if self.artifacts else []
        cmd = [venv_bin("mlflow"), "server", "--backend-store-uri", self.backend_uri, *served,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *self.extra]
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None
