"""Where a command's output goes: its own lines on the terminal, the detail in a log file.

`detail_to` keeps a command's terminal to its own lines and sends the rest (what Ray forwards from
the workers, library logs, Tune's trial events) to a log file; ``--verbose`` leaves it all shown.
`env_default` sets a documented switch of Ray or MLflow for one block, unless the user set it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

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

