"""`make demo`: sweep and cook a tiny world end to end in a private, temporary workspace:
Fashion-MNIST when its files are here (Debian's dataset-fashion-mnist) or downloadable, else the
embedded digits."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
WORLDS = {"fashion": SPACES / "tiny_fashion.yaml", "digits": SPACES / "tiny_digits.yaml"}
SPACE = WORLDS["digits"]  # the world that needs nothing but the package


class WorldUnavailable(RuntimeError):
    """The world asked for by name cannot run here (its data is missing); one line."""


def choose_world(world: str | None, log: Callable[[str], None] = print) -> Path:
    """The space of `world`; with none, Fashion-MNIST's when its data is here (or downloadable),
    else the digits world's, with one line that says why."""
    if world is not None and world not in WORLDS:
        raise WorldUnavailable(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    if world == "digits":
        return WORLDS["digits"]
    from orchestrator.data import fashion

    missing = fashion.missing()
    if missing is None:
        return WORLDS["fashion"]
    if world == "fashion":
        raise WorldUnavailable(missing)
    log(f"demo: {missing}; running the digits world instead")
    return WORLDS["digits"]


def hermetic_env(workdir: Path) -> dict[str, str]:
    """Environment for a self-contained run: MLflow store, Ray token and caches inside `workdir`.

    Must be applied before Ray is imported: Ray reads its auth mode and token once per process.
    """
    token = workdir / "ray_auth_token"
    if not token.exists():
        token.write_text(uuid.uuid4().hex)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
            "XDG_CACHE_HOME": str(workdir / "cache")}  # the built tiny world, shared by the trials


def run_demo(workdir: str | Path | None = None, space: str | Path | None = None,
             log: Callable[[str], None] = print, verbose: bool = False, world: str | None = None) -> dict:
    """Sweep `space` (default: `world`'s, see `choose_world`), cook it, and return the table, the
    plot, the store's location and the log.

    The terminal shows the demo's own lines (each trial's start and end, the cook's progress);
    the detail (Ray's worker output, Ray Train's and Tune's lines) goes to ``<workdir>/soup.log``,
    named on the terminal first (`terminal.detail_to`). With `verbose` it all shows, as Ray prints it,
    and there is no log file."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="soup-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(hermetic_env(workdir))
    os.environ.pop("RAY_ADDRESS", None)
    space = space or choose_world(world, log)
    from orchestrator.cook.driver import cook
    from orchestrator.runtime import connect, terminal
    from orchestrator.sweep.driver import run_sweep

    log_file = None if verbose else workdir / "soup.log"
    t0 = time.perf_counter()
    with terminal.detail_to(log_file):
        try:
            out = run_sweep(space, name="demo", storage_path=str(workdir / "ray_results"), log=log)
            cooked = cook(out.sweep_id, log=log)
        finally:
            connect.shutdown()
    plot = workdir / "soups.png"
    plot.write_bytes(cooked.plot_png)
    return {"rows": cooked.rows, "plot": str(plot), "workdir": str(workdir), "versions": cooked.versions,
            "uri": os.environ["MLFLOW_TRACKING_URI"], "seconds": time.perf_counter() - t0,
            "log": str(log_file) if log_file else None, "sweep_run": out.parent_run_id}
