"""Cooks of one sweep that run at the same time, with or without Ray, in one process or several.

MLflow has no lock, so the rule is optimistic, and the same everywhere:

- every soup run a cook logs carries its owner (``cook_owner``: host, pid and the process's
  start time), so another cook can tell a run in progress from one left by a killed cook;
- a cook that finds another live cook logging the same soup (same key) waits for it and then
  reuses its run and version, saying so; an unfinished run whose owner is gone is replaced;
- two cooks that still register the same soup at the same moment both see both versions
  afterwards; the lower version number stands, the other cook withdraws its own version (and
  its own run, unless the standing version points at it) and reports the standing one.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from orchestrator.record.schema import COOK_OWNER, SOUP_KEY, SOUP_RUN_ID
from orchestrator.record.soups import find_version, soup_runs, stale_soups
from orchestrator.record.tracking import Tracker

# A cook on another host cannot be checked; its unfinished run counts as in progress this long
# after it started (logging one soup takes seconds to minutes), then as left behind.
REMOTE_LEASE_S = 3600.0
POLL_S = 1.0


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so that a pid reused by a
    later process is not taken for the cook; empty where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_owner() -> str:
    """This process, as its soup runs record it."""
    return f"{socket.gethostname()}/{os.getpid()}/{_start_ticks(os.getpid())}"


def _alive(owner: str, started_ms: int) -> bool:
    """Whether the cook that owns an unfinished soup run may still finish it."""
    host, _, rest = owner.partition("/")
    pid, _, ticks = rest.partition("/")
    if not pid.isdigit():
        return False  # runs of cooks from before owners were recorded: left behind
    if host != socket.gethostname():
        return time.time() - started_ms / 1000 < REMOTE_LEASE_S
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    return _start_ticks(int(pid)) == ticks


def _in_progress(tracker: Tracker, experiment_id: str, key: str, registered: bool = False) -> list:
    """Soup runs with this key that another live cook is still logging (unfinished, or finished
    but not yet registered when `registered` is False)."""
    me = this_owner()
    runs = (stale_soups if registered else soup_runs)(tracker, experiment_id, key)
    return [r for r in runs if r.data.tags.get(COOK_OWNER, "") != me
            and _alive(r.data.tags.get(COOK_OWNER, ""), r.info.start_time)]


def wait_for_other_cooks(tracker: Tracker, experiment_id: str, model_name: str, key: str, what: str,
                         log: Callable[[str], None], timeout_s: float = 6 * 3600) -> None:
    """Return once no other live cook is logging or registering the soup `key` (`what`, for
    messages): its run is finished and its version registered, or its cook is gone."""
    deadline, said = time.monotonic() + timeout_s, False

    def busy() -> list:
        registered = find_version(tracker, model_name, key) is not None
        return _in_progress(tracker, experiment_id, key, registered)

    while (others := busy()) and time.monotonic() < deadline:
        if not said:
            log(f"{what}: another cook ({others[0].data.tags.get(COOK_OWNER)}) is logging it as run "
                f"{others[0].info.run_id}; waiting for it, then reusing what it registers")
            said = True
        time.sleep(POLL_S)


def discard_left_behind(tracker: Tracker, experiment_id: str, key: str) -> None:
    """End and delete unfinished soup runs with this key whose cook is gone (killed mid-logging)."""
    busy = {r.info.run_id for r in _in_progress(tracker, experiment_id, key, registered=True)}
    tracker.discard_stale([r for r in stale_soups(tracker, experiment_id, key)
                           if r.info.run_id not in busy and r.data.tags.get(COOK_OWNER) != this_owner()])


def settle(tracker: Tracker, model_name: str, key: str, run_id: str, version, created_run: bool,
           what: str, log: Callable[[str], None]) -> tuple[str, str, bool]:
    """After registering `version` of soup `key`: (run id, version, reused) that stand.

    If another cook registered the same soup too, the lowest version stands; a higher one of
    ours is withdrawn, with our run when we created it and the standing version does not use it.
    """
    same = sorted((v for v in tracker.model_versions(model_name) if v.tags.get(SOUP_KEY) == key),
                  key=lambda v: int(v.version))
    standing = same[0] if same else version
    if str(standing.version) == str(version.version):
        return run_id, version.version, False
    tracker.delete_version(model_name, version.version)
    their_run = standing.tags.get(SOUP_RUN_ID, standing.run_id)
    if created_run and their_run != run_id:
        tracker.delete_run(run_id)
    log(f"{what}: another cook registered it at the same time as version {standing.version}; "
        f"ours (version {version.version}) withdrawn")
    return their_run, standing.version, True


__all__ = ["this_owner", "wait_for_other_cooks", "discard_left_behind", "settle"]
