"""Promotion policy: which registered soup version a registry alias (``champion``) may point at.

The gate: a version takes the alias only if its held-out accuracy is a number and at least the
current holder's; `force` overrides it and records why. Accuracies are version tags, which anyone
may edit in the UI, so a tag that is not a number is shown as ``-`` and never crashes a listing
or the gate. Everything goes through `tracking.Tracker`.
"""

from __future__ import annotations

import math
import time

from .tracking import RegistryError, Tracker, searchable


class PromotionError(ValueError):
    """A promotion was refused (gate, or no such version); the alias did not move."""


def _version(tracker: Tracker, model_name: str, version: str | int):
    if tracker.registered_model(model_name) is None:
        raise PromotionError(f"no registered model {model_name!r} in {tracker.uri}")
    found = tracker.model_version(model_name, version)
    if found is None:
        known = sorted((str(v.version) for v in _versions(tracker, model_name)), key=int)
        raise PromotionError(f"model {model_name!r} has no version {version} "
                             f"(its versions: {', '.join(known) or 'none'})")
    return found


def _versions(tracker: Tracker, model_name: str) -> list:
    """Every version of `model_name`; a name MLflow's search cannot hold is refused in one line."""
    if not searchable(model_name):
        raise PromotionError(f"model name {model_name!r} cannot be looked up: MLflow's search has "
                             "no escape for quotes or backslashes")
    return tracker.model_versions(model_name)


def _figure(mv, key: str = "heldout_acc") -> float | None:
    """The version's accuracy tag `key` as a finite number, or None (missing, or e.g. 'n/a')."""
    try:
        value = float(mv.tags.get(key, ""))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _not_a_number(mv) -> str:
    """How a held-out figure that is not a number is named in a refusal."""
    raw = mv.tags.get("heldout_acc")
    return "no held-out accuracy (tag heldout_acc missing)" if raw is None else \
        f"held-out accuracy {raw!r} (tag heldout_acc), not a number"


def _gate(cand, current, alias: str) -> None:
    """Refuse `cand` unless its held-out figure is a number at least that of `current`, the
    version `alias` points at now (if any). A current figure that is not a number cannot be
    compared with, so it refuses too: only a person (`--force`, with a reason) replaces it."""
    mine = _figure(cand)
    if mine is None:
        raise PromotionError(f"refused: version {cand.version} has {_not_a_number(cand)}; "
                             "pass --force to override")
    if current is None:
        return
    theirs = _figure(current)
    if theirs is None:
        raise PromotionError(f"refused: {alias!r} (version {current.version}) has "
                             f"{_not_a_number(current)}, so version {cand.version} cannot be "
                             "compared with it; pass --force to override")
    if not mine >= theirs:
        raise PromotionError(
            f"refused: version {cand.version} has held-out accuracy {mine:.2%}, below "
            f"{alias!r} (version {current.version}, {theirs:.2%}); pass --force to override")


def promote(tracker: Tracker, model_name: str, version: str | int, alias: str = "champion",
            force: bool = False, reason: str = "") -> str:
    """Point `alias` at `version` if its held-out accuracy is at least the current holder's.

    The gate reads the ``heldout_acc`` tags. It refuses a version whose figure is not a finite
    number (missing, or edited to e.g. 'n/a'), naming the version and the value; and, when the
    alias has a holder whose figure is not a number, it refuses too, as nothing shows that the
    candidate is no worse. `force` overrides the gate; the reason and the time are recorded in
    the version's tags.
    """
    cand = _version(tracker, model_name, version)
    if not force:
        _gate(cand, tracker.version_by_alias(model_name, alias), alias)
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


_ACCURACY_TAGS = (("held-out", "heldout_acc"), ("test", "test_acc"), ("mean shift", "shift_mean_acc"))


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value


def list_versions(tracker: Tracker, model_name: str) -> list[dict]:
    """Each version of `model_name` with its recipe, accuracies (``-`` where a tag is missing or
    not a number) and aliases, newest first."""
    versions = _versions(tracker, model_name)
    if not versions:
        raise PromotionError(f"no registered model {model_name!r} (or it has no versions)")
    aliases: dict[str, list[str]] = {}  # search results carry no aliases; the model does
    for alias, ver in tracker.registered_model(model_name).aliases.items():
        aliases.setdefault(str(ver), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        rows.append({"version": v.version, "recipe": v.tags.get("recipe", ""),
                     **{col: _or_dash(_figure(v, key)) for col, key in _ACCURACY_TAGS},
                     "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-"})
    return rows

