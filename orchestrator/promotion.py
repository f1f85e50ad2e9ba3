"""Promotion policy: which registered soup version a registry alias (``champion``) may point at.

The gate: a version takes the alias only if its held-out accuracy is at least the current
holder's; `force` overrides it and records why. Everything goes through `tracking.Tracker`.
"""

from __future__ import annotations

import time

from .tracking import RegistryError, Tracker


class PromotionError(ValueError):
    """A promotion was refused (gate, or no such version); the alias did not move."""


def _version(tracker: Tracker, model_name: str, version: str | int):
    if tracker.registered_model(model_name) is None:
        raise PromotionError(f"no registered model {model_name!r} in {tracker.uri}")
    found = tracker.model_version(model_name, version)
    if found is None:
        known = sorted((str(v.version) for v in tracker.model_versions(model_name)), key=int)
        raise PromotionError(f"model {model_name!r} has no version {version} "
                             f"(its versions: {', '.join(known) or 'none'})")
    return found


def _heldout(mv) -> float:
    return float(mv.tags.get("heldout_acc", "nan"))


def promote(tracker: Tracker, model_name: str, version: str | int, alias: str = "champion",
            force: bool = False, reason: str = "") -> str:
    """Point `alias` at `version` if its held-out accuracy is at least the current holder's.

    `force` overrides the gate; the reason and the time are recorded in the version's tags.
    """
    cand = _version(tracker, model_name, version)
    current = tracker.version_by_alias(model_name, alias)
    if current is not None and not force and not _heldout(cand) >= _heldout(current):
        raise PromotionError(
            f"refused: version {cand.version} has held-out accuracy {_heldout(cand):.2%}, below "
            f"{alias!r} (version {current.version}, {_heldout(current):.2%}); pass --force to override")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        tracker.set_alias(model_name, alias, cand.version)
    except RegistryError as err:
        raise PromotionError(f"alias {alias!r} refused by MLflow: {err}") from None
    tracker.set_version_tag(model_name, cand.version, f"promoted_{alias}_at", now)
    if force:
        tracker.set_version_tag(model_name, cand.version, "forced_promotion",
                                f"{now}: {reason or 'no reason given'}")
    return cand.version


def list_versions(tracker: Tracker, model_name: str) -> list[dict]:
    """Each version of `model_name` with its recipe, accuracies and aliases, newest first."""
    versions = tracker.model_versions(model_name)
    if not versions:
        raise PromotionError(f"no registered model {model_name!r} (or it has no versions)")
    aliases: dict[str, list[str]] = {}  # search results carry no aliases; the model does
    for alias, ver in tracker.registered_model(model_name).aliases.items():
        aliases.setdefault(str(ver), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        rows.append({"version": v.version, "recipe": v.tags.get("recipe", ""),
                     "held-out": _heldout(v), "test": float(v.tags.get("test_acc", "nan")),
                     "mean shift": float(v.tags.get("shift_mean_acc", "nan")),
                     "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-"})
    return rows
