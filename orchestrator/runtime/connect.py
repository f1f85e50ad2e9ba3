"""Connecting to Ray: the one place that knows how, and what the connected Ray offers.

`init_ray` joins the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), or else
starts a local Ray that listens on loopback only: a laptop or CI machine running a sweep must
not offer its Ray (which runs whatever code it is sent) to the network it sits on.

Ray 2.x picks a new node's IP itself and, on Linux, takes the machine's network address even
when told ``127.0.0.1`` (``ray start --node-ip-address`` and ``ray.init`` map "localhost" to it).
The one public switch is the documented environment variable
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: set to ``0``, Ray runs single-node on ``127.0.0.1``, as it
does on macOS and Windows by default, and every server it starts binds there. Ray reads it once,
when ``ray`` is first imported, so this module sets it on import, imports ``ray`` only inside
functions, and must be imported before anything imports ``ray`` (``orchestrator/__init__.py``
imports it first); `init_ray` refuses to start a local Ray that would not be on loopback.

`misfit` is the one check of a request against the connected Ray's nodes, for the sweep's trial
workers and the cook's build task alike.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.runtime.signals import keep_stop_handler
from orchestrator.runtime.terminal import env_default, note

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


def init_ray(log: Callable[[str], None] = print, dashboard: bool = True) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local
    Ray that listens on loopback only, with its dashboard (on loopback) when `dashboard`: Ray
    Train's controller watches its actors through the dashboard's state API, while Tune alone
    does not need it (it takes a second or two to start). A no-op when Ray is already initialized."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    with keep_stop_handler():
        if address:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        else:
            _start_local(dashboard)
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


# When the first driver connects, Ray starts one idle worker process per CPU and makes the driver
# wait for them. They are started with Ray's default runtime environment, so they can serve no task
# or actor that carries one (ray-project/ray#33621): not Tune's trainable actors (Tune always sets
# environment variables on them), nor, while `local_train_env` sets anything, any task of ours. On
# a local Ray they only cost its start (0.5 s of `ray.init` on 2 cores, and 2 processes' CPU), so
# the local Ray we start skips them with Ray's setting for that (a system config read from the
# environment); one the user set wins.
NO_PRESTART = "RAY_prestart_worker_first_driver"


def _start_local(dashboard: bool = True) -> None:
    """A new local Ray (never one found on the machine), checked to be on loopback."""
    import ray

    wanted = _loopback_wanted()
    planned = ray.util.get_node_ip_address()  # the IP a new node would take, before starting it
    if wanted and not is_loopback(planned):
        raise RuntimeError(
            f"a local Ray would listen on {planned}, not on loopback: ray was imported before "
            f"{__name__} could set {LOOPBACK_ENV}=0. Import {__name__} before "
            f"ray, or set {LOOPBACK_ENV}=0 in the environment.")
    # "local": start our own, not attach to whatever `ray start` last left in the machine's temp dir
    with env_default(NO_PRESTART, "0"):  # read by the raylet this starts
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 dashboard_port=_free_port() if dashboard else None, log_to_driver=True,
                 configure_logging=False, runtime_env={"env_vars": local_train_env()})
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if wanted and not is_loopback(gcs_host):
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {gcs_host}, not on loopback")


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


# --- does a request fit this Ray --------------------------------------------------------------

@dataclass(frozen=True)
class Misfit:
    """Why a request does not fit the connected Ray now (`misfit`), for the caller's message."""

    largest: dict[str, float]  # the largest node's resources (most GPUs, then most CPUs)
    one_fits: bool  # one bundle fits a node; it is `count` of them that this local Ray cannot hold
    local: bool  # a local Ray (`is_local`): nothing will ever add a node

    @property
    def largest_has(self) -> str:
        """``8 CPU and 1 GPU``: what the largest node has."""
        return f"{self.largest.get('CPU', 0):g} CPU and {self.largest.get('GPU', 0):g} GPU"


def misfit(cpu: float, gpu: float, count: int = 1) -> Misfit | None:
    """None when a bundle of `cpu` CPUs and `gpu` GPUs fits one live node of the connected Ray
    and, on a local Ray, `count` such bundles fit it all at once (nothing can add a node to it;
    a cluster may run them on several nodes, or gain nodes); else what does not fit. Ray would
    otherwise queue such a request for ever, without a word."""
    nodes = node_resources()
    local = is_local()
    one_fits = any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes)
    whole = (sum(n.get("CPU", 0) for n in nodes) >= count * cpu
             and sum(n.get("GPU", 0) for n in nodes) >= count * gpu)
    if one_fits and (not local or whole):
        return None
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return Misfit(largest, one_fits, local)
