"""Stop signals: the one handler of SIGINT and SIGTERM, for `soup sweep` and `soup cook` alike.

The behaviour is **interrupt once, then a bounded cleanup**. Inside `stop_signals` the first
SIGINT or SIGTERM interrupts the command (``KeyboardInterrupt`` in the main thread) and is kept
(`stop_signal`: the command exits ``128 + its number``, 130 or 143, as a shell reports death by
a signal). Later signals do nothing but wait for the cleanup that the first one started.

Why once: the cleanup is what makes a stop safe to act on. It removes the cook's temporary
files and cancels its Ray task, saves Tune's experiment state (without it ``--resume`` cannot
continue the sweep's trials) and ends the sweep's MLflow runs KILLED with the reason. People
press Ctrl-C twice, and process managers repeat SIGTERM; a second interrupt used to abort the
sweep's cleanup halfway (a sweep run left RUNNING, a state not saved). Waiting is only safe
because every cleanup is bounded: the cook's by `task.CANCEL_WAIT_S` and `task.LOST_BOUND_S`;
Tune's stop by Tune's own timeouts (its trials get 5 s, then are killed; the last upload of its
state, to a remote ``storage_path`` only, by its sync timeout); the sweep's MLflow calls, which
retry with backoff for minutes when the server does not answer, by `bounded`
(``sweep.driver.END_SWEEP_S``). SIGKILL stays the way out that no code outlives.

One difference is where the first signal goes, not what it does: while Tune runs a sweep it is
handed to Tune's own Ctrl-C handler (`hand_first_to`, inside `handing_over`), the one way to have
Tune stop its trials and save its state for ``Tuner.restore``.

Signals can only be handled in the main thread; elsewhere these functions change nothing and the
process's defaults apply.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

STOPS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class _Stops:
    """The state of the `stop_signals` blocks of this process (main thread only)."""

    depth: int = 0  # blocks open: an inner one shares the outer one's signal and handlers
    signal: int | None = None  # the first stop signal received inside the outermost block
    handing: bool = False  # inside `handing_over`


_STOP = _Stops()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _first(signum: int) -> bool:
    """Keep `signum` if it is the block's first stop signal; whether it was."""
    if _STOP.signal is not None:
        return False
    _STOP.signal = signum
    return True


def _stop(signum, frame) -> None:
    """SIGINT or SIGTERM: interrupt the main thread, once. Later signals only wait for the
    cleanup that the first one started (which is bounded)."""
    if _first(signum):
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread, once (`stop_signal` says
    which came); the process's own handlers are put back afterwards. A block inside another (the
    sweep's inside ``soup sweep``'s) changes nothing: the outer one keeps the signal, so the
    command's ``except KeyboardInterrupt`` reads it. `connect.init_ray` keeps the handler while
    Ray starts (``ray.init`` puts in its own, which exits with status 15)."""
    if not _main_thread():
        yield
        return
    if _STOP.depth:
        _STOP.depth += 1
        try:
            yield
        finally:
            _STOP.depth -= 1
        return
    saved = {s: signal.getsignal(s) for s in STOPS}
    _STOP.depth, _STOP.signal = 1, None
    _install(_stop)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _STOP.depth, _STOP.signal = 0, None


def _install(handler) -> None:
    for s in STOPS:
        signal.signal(s, handler)


def stop_signal() -> signal.Signals:
    """The stop signal that interrupted the `stop_signals` block being left (read it in an
    ``except KeyboardInterrupt`` inside the block); SIGINT otherwise (a plain Ctrl-C)."""
    return received() or signal.SIGINT


def received() -> signal.Signals | None:
    """The stop signal the running `stop_signals` block received, if any."""
    return None if _STOP.signal is None else signal.Signals(_STOP.signal)


@contextlib.contextmanager
def handing_over() -> Iterator[None]:
    """A block inside `stop_signals` during which `hand_first_to` may give the first signal to a
    library's own handler (Tune's, while ``Tuner.fit`` runs); left, the signals interrupt again
    (that handler means nothing once the library has returned)."""
    inside = _main_thread() and _STOP.depth > 0
    if inside:
        _STOP.handing = True
    try:
        yield
    finally:
        if inside:
            _STOP.handing = False
            _install(_stop)


def hand_first_to(handler) -> None:
    """Inside `handing_over`: the first SIGINT or SIGTERM is kept, as always, and then handed to
    `handler` as a SIGINT instead of interrupting (Tune's own Ctrl-C handler: Tune stops its trials
    and saves its state, and ``fit`` returns); later ones still only wait. Nothing changes outside
    a block, outside the main thread, or when `handler` is no function (``SIG_DFL``) or is ours
    (the library installed none): then the first signal interrupts."""
    if not (_main_thread() and _STOP.handing and callable(handler)) or handler is _stop:
        return

    def hand_over(signum, frame) -> None:
        if _first(signum):
            handler(signal.SIGINT, frame)

    _install(hand_over)


def bounded(seconds: float, cleanup: Callable[[], object], name: str) -> bool:
    """Run `cleanup()` in a daemon thread and wait for it at most `seconds`: a cleanup after a stop
    signal must not hold the command for ever, since later signals only wait for it. True when it
    returned (an exception it raised is raised here); False when it still runs, left to finish in
    the background (a daemon thread does not hold the process's exit)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            cleanup()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            raised.append(err)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        return False
    if raised:
        raise raised[0]
    return True


@contextlib.contextmanager
def keep_stop_handler() -> Iterator[None]:
    """Around ``ray.init`` inside `stop_signals`: a SIGTERM that comes meanwhile still stops the
    command, and our handler is back afterwards. ``ray.init`` replaces the SIGTERM handler with
    its own (``sys.exit(15)``), whose ``SystemExit`` is taken for ours, or lost: raised inside a
    callback whose exceptions Python ignores (seen: logging's after-fork hook), and then the cook
    ran to its end. The signal's wakeup fd records every signal, whichever handler took it."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not _stop:
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
