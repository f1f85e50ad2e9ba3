"""A Ray task that streams its progress, and fails within a bound when its Ray disappears.

A Ray that disappears under a waiting driver (its processes killed, e.g. by another user's
``ray stop --force``) makes the driver neither fail nor return: `ray.wait` and `ray.get` with a
timeout keep timing out, without one they block; 60 s after the GCS went away Ray's core worker
ends the whole process itself, with exit status 1 and without running ``finally`` blocks or
``atexit`` handlers (temporary directories stay behind). `run_with_progress` therefore waits in
slices and, between them, checks that the GCS still accepts connections: one that has not for
`LOST_AFTER_S` is lost, Ray is disconnected within `SHUTDOWN_S` and `RayLost` is raised; a
command that then calls `prepare_to_exit` ends within `LOST_BOUND_S` of its Ray's death. A stop
signal's ``KeyboardInterrupt`` (`signals`) cancels the task and waits, bounded, for its end.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

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
