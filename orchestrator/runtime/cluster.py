"""The one place that knows how to connect to Ray.

`init_ray` joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), or else
starts a local Ray that listens on loopback only: a laptop or CI machine running a sweep must
not offer its Ray (which runs whatever code it is sent) to the network it sits on.

Ray 2.x picks a new node's IP itself and, on Linux, takes the machine's network address even
when told ``127.0.0.1`` (``ray start --node-ip-address`` and ``ray.init`` map "localhost" to it).
The one public switch is the documented environment variable
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: set to ``0``, Ray runs single-node on ``127.0.0.1``, as it
does on macOS and Windows by default, and every server it starts binds there. Ray reads it once,
when ``ray`` is first imported, so this module sets it on import, imports ``ray`` only inside
functions, and must be imported before anything imports ``ray``; `init_ray` refuses to start a
local Ray that would not be on loopback.

A Ray that disappears under a waiting driver (its processes killed, e.g. by another user's
``ray stop --force``) makes the driver neither fail nor return: `ray.wait` and `ray.get` with a
timeout keep timing out, without one they block; 60 s after the GCS went away Ray's core worker
ends the whole process itself, with exit status 1 and without running ``finally`` blocks or
``atexit`` handlers (temporary directories stay behind). `run_with_progress` therefore waits in
slices and, between them, checks that the GCS still accepts connections: one that has not for
`LOST_AFTER_S` is lost, Ray is disconnected within `SHUTDOWN_S` and `RayLost` is raised; a
command that then calls `prepare_to_exit` ends within `LOST_BOUND_S` of its Ray's death.

SIGINT and SIGTERM (`stop_signals`) interrupt a command at any point with ``KeyboardInterrupt``.

`detail_to` keeps a command's terminal to its own lines and sends the rest (what Ray forwards from
the workers, library logs, Tune's trial events) to a log file; ``--verbose`` leaves it all shown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import io
import ipaddress
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_ONLY = {LOOPBACK_ENV: "0"}


def _default_to_loopback() -> None:
    """Keep Ray on loopback unless the user chose otherwise or names a cluster elsewhere.

    Also with a ``RAY_ADDRESS`` on loopback: without the switch Ray rewrites 127.0.0.1 in it to
    the network address too, where a loopback-only cluster does not answer. Not for any other
    ``RAY_ADDRESS``: the switch would forbid a ``ray start --address`` run from here."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or is_loopback(_host(address)):
        os.environ.setdefault(LOOPBACK_ENV, "0")


def _host(address: str) -> str:
    """``[ray://|http://]host:port`` -> host."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP, possibly an IPv4-mapped IPv6 one) is a loopback address."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


_default_to_loopback()


def init_ray(log: Callable[[str], None] = print) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local
    Ray that listens on loopback only. A no-op when Ray is already initialized."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    with _keep_stop_handler():
        if address:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        else:
            _start_local()
    res = ray.cluster_resources()
    log(f"Ray: {'cluster at ' + address if address else 'local'}, {res.get('CPU', 0):g} CPU, "
        f"{res.get('GPU', 0):g} GPU")
    note(f"Ray resources: {res}")


def _loopback_wanted() -> bool:
    """False only when the user set the variable to allow a network-visible local Ray."""
    return os.environ.get(LOOPBACK_ENV, "0").strip().lower() in ("0", "false")


def _free_port() -> int:
    """A TCP port free on loopback now (several local Rays may run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_train_env() -> dict[str, str]:
    """Ray Train settings for a local Ray (one machine, nothing to preempt): check a trial's
    workers every 0.5 s instead of 2 s (a short trial otherwise waits seconds at each report and
    at its end) and no preemption watcher (one more actor per trial, with nothing to watch).
    Documented Ray Train environment variables; one the user set wins; a cluster keeps Ray's
    defaults."""
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    return {k: v for k, v in wanted.items() if k not in os.environ}


def _start_local() -> None:
    """A new local Ray (never one found on the machine), checked to be on loopback."""
    import ray

    wanted = _loopback_wanted()
    planned = ray.util.get_node_ip_address()  # the IP a new node would take, before starting it
    if wanted and not is_loopback(planned):
        raise RuntimeError(
            f"a local Ray would listen on {planned}, not on loopback: ray was imported before "
            f"orchestrator.cluster could set {LOOPBACK_ENV}=0. Import orchestrator.cluster before "
            f"ray, or set {LOOPBACK_ENV}=0 in the environment.")
    # "local": start our own, not attach to whatever `ray start` last left in the machine's temp dir
    # with its dashboard (on loopback): Ray Train's controller watches its actors through the
    # dashboard's state API
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), log_to_driver=True, configure_logging=False,
             runtime_env={"env_vars": local_train_env()})
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if wanted and not is_loopback(gcs_host):
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {gcs_host}, not on loopback")


# How the driver notices that its Ray is gone. A live GCS on loopback accepts a connection at once
# (even when too busy to answer it), so refused or unanswered connections for LOST_AFTER_S mean the
# GCS process is gone, or the network to a remote one: past Ray's own 60 s the process could not
# even clean up. Waits are sliced (WAIT_S) so that the check, and a stop signal, come in between.
WAIT_S = 1.0
PROBE_TIMEOUT_S = 2.0
LOST_AFTER_S = 5.0
SHUTDOWN_S = 10.0  # ray.shutdown() after the GCS died takes ~5 s (it flushes task events first)
# From the death of a driver's Ray to the end of the driver: noticed within LOST_AFTER_S + WAIT_S +
# PROBE_TIMEOUT_S (8 s), disconnected within SHUTDOWN_S (10 s), then the temporary files are
# removed and the interpreter exits (`prepare_to_exit`: ~1 s); the rest is slack for a busy machine.
LOST_BOUND_S = 30.0
# A stopped task is waited for at most this long: a force-cancelled task's worker is killed at
# once, and a stop must end the command within LOST_BOUND_S even when Ray no longer answers.
CANCEL_WAIT_S = 10.0


class RayLost(RuntimeError):
    """The Ray cluster this driver waits on stopped answering; the message is one line."""


def run_with_progress(generator_fn: Callable, args: tuple, num_cpus: float, num_gpus: float,
                      log: Callable[[str], None], memory_bytes: int = 0):
    """Run ``generator_fn(*args)`` as a Ray task with these resources (`memory_bytes` reserved
    when given); it yields ``("log", line)`` pairs, relayed to `log` as they come, then one
    ``("result", value)``, whose value is returned. An error in the task is raised here;
    `RayLost` when the cluster stops answering meanwhile or this driver's node dies (Ray is then
    disconnected); a stop signal's ``KeyboardInterrupt`` cancels the task."""
    import ray

    what = getattr(generator_fn, "__name__", str(generator_fn))
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, num_returns="streaming",
                      **({"memory": memory_bytes} if memory_bytes else {}))(generator_fn)
    address = ray.get_runtime_context().gcs_address  # read while Ray is there
    stream = task.remote(*args)
    try:
        for kind, value in _items(stream, _GcsWatch(address, what)):
            if kind == "log":
                log(value)
            else:
                return value
    except KeyboardInterrupt:
        _cancel(stream)
        raise
    except ray.exceptions.LocalRayletDiedError:  # its raylet gone (the GCS may still answer)
        raise _lost(f"the Ray cluster at {address} lost this driver's node (its raylet died) during "
                    f"the Ray task {what}") from None
    raise RuntimeError(f"the Ray task {what} ended without a result")


def _items(stream, watch: _GcsWatch) -> Iterator:
    """The values the streaming task yields, each waited for in slices with `watch` checked
    between them (`ray.wait` on the generator: whether its next item is ready)."""
    import ray

    while True:
        ready, _ = ray.wait([stream], timeout=WAIT_S)
        if not ready:
            watch.check()
            continue
        try:
            ref = next(stream)
        except StopIteration:
            return
        yield _get(ref, watch)


def _get(ref, watch: _GcsWatch):
    """`ray.get` in slices: a ready item can still be lost with the node that holds it."""
    import ray

    while True:
        try:
            return ray.get(ref, timeout=WAIT_S)
        except ray.exceptions.GetTimeoutError:
            watch.check()


def _cancel(stream) -> None:
    """Stop the task on a stop signal (a remote cluster would otherwise finish it for nobody), and
    wait, up to `CANCEL_WAIT_S`, until it has ended. A force cancel is asynchronous: without the
    wait the caller's cleanup (removing the files the task reads) races with the task, which then
    fails on a missing file, and Ray prints that error as unhandled after the interrupt's message.
    What the task still yields is read and dropped here, its error included."""
    import ray

    with contextlib.suppress(Exception):  # best effort: the interrupt is what matters
        ray.cancel(stream, force=True)
    deadline = time.monotonic() + CANCEL_WAIT_S
    with contextlib.suppress(Exception):  # StopIteration (the stream ended) included
        while (left := deadline - time.monotonic()) > 0:
            ready, _ = ray.wait([stream], timeout=min(left, WAIT_S))
            if ready:
                ref = next(stream)
                with contextlib.suppress(Exception):  # the cancellation's, or the task's, error
                    ray.get(ref, timeout=max(deadline - time.monotonic(), 0.1))


class _GcsWatch:
    """Raises `RayLost` once the GCS at `address` has refused or ignored connections for
    `LOST_AFTER_S` (public API only: Ray offers no bounded liveness call of its own)."""

    def __init__(self, address: str, what: str):
        self.address, self.what, self.silent_since = address, what, None

    def check(self) -> None:
        if _answers(self.address):
            self.silent_since = None
            return
        now = time.monotonic()
        self.silent_since = self.silent_since or now
        if now - self.silent_since >= LOST_AFTER_S:
            raise _lost(f"the Ray cluster at {self.address} stopped answering during the Ray task "
                        f"{self.what} (no answer for {LOST_AFTER_S:.0f} s)")


def _answers(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


_LOST: dict[str, threading.Thread] = {}  # the disconnect from a lost Ray, while it runs


def _lost(message: str) -> RayLost:
    """`RayLost` with `message`, once Ray is disconnected: ``ray.shutdown()``, given `SHUTDOWN_S`.
    It is needed: an interpreter that exits still connected crashes (segmentation fault) in Ray's
    threads, or waits in Ray's at-exit hooks until Ray ends it. It returns after ~5 s, but that
    wait is Ray's: in a thread, so that a longer one cannot hold the driver (`prepare_to_exit`)."""
    import ray

    done = threading.Thread(target=ray.shutdown, name="ray-shutdown-lost", daemon=True)
    _LOST["shutdown"] = done
    done.start()
    done.join(SHUTDOWN_S)
    return RayLost(message)


def prepare_to_exit(code: int) -> None:
    """In a command's main, once it has caught `RayLost` or a stop signal's interrupt, right
    before its process exits with `code`: make the exit quick, so that it comes within
    `LOST_BOUND_S`. If disconnecting from a lost Ray has not returned, end the process now
    (``os._exit``): exiting normally would wait for it (Ray's at-exit shutdown takes the same
    lock) or crash in Ray's threads. Otherwise freeze the garbage collector: the interpreter's
    last collection, over the half million objects of torch, MLflow and Ray, alone takes 8-10 s
    on a busy machine (under 1 s frozen); at-exit handlers (Ray's shutdown) still run. The
    command's own state has been unwound by then (temporary directories removed)."""
    stuck = _LOST.get("shutdown")
    if stuck is not None and stuck.is_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()


# --- stop signals -----------------------------------------------------------------------------

_STOP: dict[str, int] = {}  # the stop signal received inside `stop_signals`, if any


def _stop(signum, frame) -> None:
    """SIGINT or SIGTERM: interrupt the main thread, once. Later signals only wait for the
    cleanup that the first one started (temporary files, Ray's shutdown), which is bounded."""
    if "signal" not in _STOP:
        _STOP["signal"] = signum
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread (`stop_signal` says
    which came); the process's own handlers are put back afterwards. `init_ray` keeps them while
    Ray starts (``ray.init`` puts in its own, which exits with status 15). Main thread only:
    elsewhere signals cannot be handled, and the process's defaults apply."""
    _STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, _stop)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _STOP.clear()


def stop_signal() -> signal.Signals:
    """The stop signal that interrupted the `stop_signals` block being left (read it in an
    ``except KeyboardInterrupt`` inside the block); SIGINT otherwise (a plain Ctrl-C)."""
    return signal.Signals(_STOP.get("signal", signal.SIGINT))


@contextlib.contextmanager
def _keep_stop_handler():
    """Around ``ray.init`` inside `stop_signals`: a SIGTERM that comes meanwhile still stops the
    command, and our handler is back afterwards. ``ray.init`` replaces the SIGTERM handler with
    its own (``sys.exit(15)``), whose ``SystemExit`` is taken for ours, or lost: raised inside a
    callback whose exceptions Python ignores (seen: logging's after-fork hook), and then the cook
    ran to its end. The signal's wakeup fd records every signal, whichever handler took it."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not _stop:
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # as set_wakeup_fd requires
    previous = signal.set_wakeup_fd(write)
    try:
        yield
    except SystemExit as err:
        if err.code == signal.SIGTERM:
            _stop(signal.SIGTERM, None)
        raise
    finally:
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGTERM, _stop)
        came = _drain(read)
        os.close(read)
        os.close(write)
    if signal.SIGTERM in came:
        _stop(signal.SIGTERM, None)


def _drain(fd: int) -> bytes:
    """What a signal wakeup fd holds: one byte per signal number."""
    os.set_blocking(fd, False)
    got = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 512):
            got += chunk
    return got


def shutdown() -> None:
    """Disconnect from Ray, stopping the local Ray this process started (if any)."""
    import ray

    ray.shutdown()


def is_local() -> bool:
    """Whether this process runs its own local Ray (no ``RAY_ADDRESS``): then nothing can add nodes."""
    return not os.environ.get("RAY_ADDRESS")


def node_resources() -> list[dict[str, float]]:
    """The total resources (``CPU``, ``GPU``, ...) of each live node of the connected Ray."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


# --- where a command's output goes ------------------------------------------------------------
# A sweep's driver prints little of its own; Tune's status tables, the lines Ray forwards from
# every worker (``log_to_driver``: Ray Train's reports and checkpoints, library logging, warnings)
# and MLflow's log lines are detail. Ray and MLflow write them to ``sys.stdout``/``sys.stderr`` as
# they are when writing (documented for Ray's log forwarding; Ray's and MLflow's log handlers look
# them up at emit time by design), so `detail_to` routes those two streams, and nothing else.

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its worker prefixes


class _DetailLog:
    """The detail log file: whole lines from any thread (a thread's unfinished line waits for its
    end), without terminal colour codes, flushed line by line (``tail -f`` follows it). Created,
    and named on `terminal`, at the first output of the block: a command refused before it says
    anything prints its one error line and leaves no file."""

    def __init__(self, path: Path, terminal):
        self.path, self.terminal = path.resolve(), terminal
        self._file = None
        self._done = False
        self._lock = threading.Lock()
        self._partial: dict[int, str] = {}

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def begun(self) -> bool:
        return self._file is not None

    def write(self, text: str) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._done or not text:
                return
            file = self._open()  # named before any of it shows on the terminal
            head, newline, tail = (self._partial.pop(me, "") + text).rpartition("\n")
            if tail:
                self._partial[me] = tail
            if newline:
                file.write(_ANSI.sub("", head) + "\n")
                file.flush()

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by `close`
            self.terminal.write(f"detail log: {self.path}\n")
            self.terminal.flush()
        return self._file

    def close(self) -> None:
        with self._lock:
            self._done = True
            rest = "".join(line + "\n" for line in self._partial.values())
            if rest:
                self._open().write(_ANSI.sub("", rest))
            if self._file is not None:
                self._file.close()


class _Routed(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` inside `detail_to`: everything written goes to the detail
    log; what the command's own thread writes also goes to `terminal` when `shows` (stdout).
    Still usable when held past the block (e.g. by a logging handler made inside it): then it
    writes to `terminal` only, as the restored stream would."""

    def __init__(self, terminal, detail: _DetailLog, owner: int, shows: bool):
        super().__init__()
        self.terminal, self.detail, self.owner, self.shows = terminal, detail, owner, shows

    def write(self, text: str) -> int:
        if self.detail.closed:
            return self.terminal.write(text)
        self.detail.write(text)
        if self.shows and threading.get_ident() == self.owner:
            self.terminal.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.shows and self.terminal.isatty()

    def fileno(self) -> int:
        """The terminal's: what is written to the descriptor itself (by a child process, or by
        faulthandler, which may outlive the block) is not routed."""
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", None) or "utf-8"


_DETAILS: list[_DetailLog] = []  # the detail logs of the `detail_to` blocks being run, innermost last


@contextlib.contextmanager
def detail_to(path: str | Path | None) -> Iterator[Path | None]:
    """Inside this block the terminal shows only the command's own lines and every detail goes to
    the log file `path`: what the block's thread prints on stdout is shown and logged; what it
    writes on stderr, and what any other thread writes on either (Ray's forwarded worker output,
    above all), is logged only. The file is appended to, and named on the terminal at the block's
    first output (no output, no file); its absolute path is yielded. The sweep's Tune run sees the
    block (`detail_log`) and draws no status tables, writing its trial events to the log instead
    (`note`). With `path` None nothing changes (``--verbose``): everything shows, as Ray and Tune
    print it.

    A block left normally disconnects from Ray first (``ray.shutdown()``: a local Ray started by
    this process stops, as it would at exit): Ray still forwards workers' last lines for a moment
    after their work ends, and they belong in the log. A block left by an exception logs its
    traceback (if the log was begun) and leaves Ray alone (a lost Ray or a stop signal has its own
    way out)."""
    if path is None:
        yield None
        return
    saved = sys.stdout, sys.stderr
    detail = _DetailLog(Path(path), saved[0])
    owner = threading.get_ident()
    routed = _Routed(saved[0], detail, owner, shows=True), _Routed(saved[1], detail, owner, shows=False)
    sys.stdout, sys.stderr = routed
    _DETAILS.append(detail)
    try:
        yield detail.path
        _disconnect()
    except BaseException:
        if detail.begun:
            detail.write(traceback.format_exc())
        raise
    finally:
        _DETAILS.remove(detail)
        if sys.stdout is routed[0]:  # unless someone else replaced it meanwhile
            sys.stdout = saved[0]
        if sys.stderr is routed[1]:
            sys.stderr = saved[1]
        detail.close()


def _disconnect() -> None:
    if "ray" in sys.modules:  # never import ray only to find it unused
        import ray

        if ray.is_initialized():
            ray.shutdown()


def detail_log() -> Path | None:
    """The log file the running `detail_to` block writes its detail to; None outside one."""
    return _DETAILS[-1].path if _DETAILS else None


def note(line: str) -> None:
    """Write `line` to the detail log of the running `detail_to` block, if any (nowhere else)."""
    if _DETAILS:
        _DETAILS[-1].write(line + "\n")


def default_log_file(command: str) -> Path:
    """Where ``soup <command>`` writes its detail unless told (``--log-file``): a new file under
    ``$XDG_STATE_HOME/soup/logs`` (by default ``~/.local/state/soup/logs``), named by the command,
    the time and the process."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state, "soup", "logs", f"{command}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log")


@contextlib.contextmanager
def env_default(key: str, value: str, when: bool = True) -> Iterator[None]:
    """Inside the block, environment variable `key` is `value` (when `when`), unless the user set
    it: for documented switches that Ray or MLflow read when they start a piece of work."""
    if not when or key in os.environ:
        yield
        return
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)

