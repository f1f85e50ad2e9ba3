"""Promotion policy: which registered soup version a registry alias (``champion``) may point at.

The gate: a version takes the alias only if its held-out accuracy is a number and at least the
current holder's; `force` overrides it and records why. Accuracies are version tags, which anyone
may edit in the UI, so a tag that is not a number is shown as ``-`` and never crashes a listing
or the gate. Everything goes through `tracking.Tracker`.

A promotion is all or nothing: everything it will write (the alias, the tag keys and values) is
checked against MLflow's rules first, then the tags are recorded, then the alias moves; if MLflow
still refuses the move, the tags are put back as they were.
"""

from __future__ import annotations

import math
import re
import time

from orchestrator.record.schema import (
    FORCED_PROMOTION,
    HELDOUT_ACC,
    RECIPE,
    SHIFT_MEAN_ACC,
    TEST_ACC,
    promoted_tag,
)
from orchestrator.record.tracking import (
    MAX_MODEL_REGISTRY_TAG_KEY_LENGTH,
    MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH,
    MAX_REGISTERED_MODEL_ALIAS_LENGTH,
    RegistryError,
    Tracker,
    searchable,
)

# MLflow's rule for alias names (mlflow.utils.validation._validate_model_alias_name, private, so
# restated here): non-empty, only letters, digits, underscores and dashes. Matched whole, so a
# trailing newline, which MLflow's `^...$` lets through but its tag keys do not, is refused too.
# Its other rule, reserved names ('latest' in any case, and v<number>), is left to MLflow: the
# alias then moves last, and a refusal there puts the recorded tags back.
_ALIAS = re.compile(r"[\w-]+")


class PromotionError(ValueError):
    """A promotion was refused (gate, no such version, or an alias or reason that MLflow could
    not record); nothing in the registry changed."""


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


def _figure(mv, key: str = HELDOUT_ACC) -> float | None:
    """The version's accuracy tag `key` as a finite number, or None (missing, or e.g. 'n/a')."""
    try:
        value = float(mv.tags.get(key, ""))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _not_a_number(mv) -> str:
    """How a held-out figure that is not a number is named in a refusal."""
    raw = mv.tags.get(HELDOUT_ACC)
    return f"no held-out accuracy (tag {HELDOUT_ACC} missing)" if raw is None else \
        f"held-out accuracy {raw!r} (tag {HELDOUT_ACC}), not a number"


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


def _shown(text: str, keep: int = 24) -> str:
    """`text` for a one-line message: whole if short, else its start, an ellipsis and its length."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}… ({len(text)} characters)"


def _check_request(alias: str, force: bool, reason: str) -> None:
    """Refuse, before anything is written, an alias or reason MLflow would not take: the alias
    itself, the tag keys the promotion writes (``promoted_<alias>_at``, ``forced_promotion``)
    and, with `force`, the tag value holding the reason."""
    if not alias or not _ALIAS.fullmatch(alias):
        raise PromotionError(f"alias {_shown(alias)} is not one MLflow accepts: it must be non-empty "
                             "and hold only letters, digits, underscores (_) and dashes (-)")
    limit = MAX_MODEL_REGISTRY_TAG_KEY_LENGTH - len(promoted_tag(""))  # 238 in MLflow 3
    why = (f"its promotion is recorded in the version tag {promoted_tag('<alias>')}, which MLflow "
           f"limits to {MAX_MODEL_REGISTRY_TAG_KEY_LENGTH}")
    if MAX_REGISTERED_MODEL_ALIAS_LENGTH < limit:
        limit, why = MAX_REGISTERED_MODEL_ALIAS_LENGTH, "MLflow's limit for aliases"
    if len(alias) > limit:
        raise PromotionError(f"alias {_shown(alias)} is too long: at most {limit} characters ({why})")
    for key in (promoted_tag(alias), FORCED_PROMOTION):  # both fit once the alias does; checked anyway
        if len(key) > MAX_MODEL_REGISTRY_TAG_KEY_LENGTH:
            raise PromotionError(f"version tag {_shown(key)} is too long for MLflow: at most "
                                 f"{MAX_MODEL_REGISTRY_TAG_KEY_LENGTH} characters")
    room = MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH - len(_forced_value(_now(), "")) + len(_NO_REASON)
    if force and len(reason) > room:
        raise PromotionError(f"reason is too long ({len(reason)} characters): at most {room} (it is "
                             f"recorded after the time in the version tag {FORCED_PROMOTION}, which MLflow "
                             f"limits to {MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH} characters)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_NO_REASON = "no reason given"


def _forced_value(now: str, reason: str) -> str:
    """The ``forced_promotion`` tag's value: when, and why."""
    return f"{now}: {reason or _NO_REASON}"


def _restore(tracker: Tracker, model_name: str, version: str, before: dict[str, str | None]) -> None:
    """Put version tags back as `before` holds them: its value, or no tag where it held None."""
    for key, value in before.items():
        if value is None:
            tracker.delete_version_tag(model_name, version, key)
        else:
            tracker.set_version_tag(model_name, version, key, value)


def promote(tracker: Tracker, model_name: str, version: str | int, alias: str = "champion",
            force: bool = False, reason: str = "") -> str:
    """Point `alias` at `version` if its held-out accuracy is at least the current holder's.

    The gate reads the ``heldout_acc`` tags. It refuses a version whose figure is not a finite
    number (missing, or edited to e.g. 'n/a'), naming the version and the value; and, when the
    alias has a holder whose figure is not a number, it refuses too, as nothing shows that the
    candidate is no worse. `force` overrides the gate; the reason and the time are recorded in
    the version's tags.

    All or nothing: first the alias, the tag keys and the reason are checked against MLflow's
    limits and the version and the gate are checked (`PromotionError`, nothing written); then the
    time (``promoted_<alias>_at``) and, with `force`, the reason (``forced_promotion``) are
    recorded; then the alias moves. If MLflow refuses the move (a reserved alias: 'latest',
    'v3'), or anything fails after the first write, those tags are put back as they were (removed,
    or their earlier values restored) before the error is raised.
    """
    _check_request(alias, force, reason)
    cand = _version(tracker, model_name, version)
    if not force:
        _gate(cand, tracker.version_by_alias(model_name, alias), alias)
    now = _now()
    tags = {promoted_tag(alias): now}
    if force:
        tags[FORCED_PROMOTION] = _forced_value(now, reason)
    before = {key: cand.tags.get(key) for key in tags}
    try:
        for key, value in tags.items():
            tracker.set_version_tag(model_name, cand.version, key, value)
        tracker.set_alias(model_name, alias, cand.version)
    except BaseException as err:
        left = ""
        try:
            _restore(tracker, model_name, cand.version, before)
        except Exception as undo:  # noqa: BLE001 - whatever it is, it is reported with the cause
            left = (f"; the version tags {', '.join(tags)} of version {cand.version} could not be "
                    f"put back: {undo}")
            err.add_note(left[2:])
        if isinstance(err, RegistryError):
            raise PromotionError(f"alias {alias!r} refused by MLflow: {err}{left}") from None
        raise
    return cand.version


_ACCURACY_TAGS = (("held-out", HELDOUT_ACC), ("test", TEST_ACC), ("mean shift", SHIFT_MEAN_ACC))


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
        rows.append({"version": v.version, "recipe": v.tags.get(RECIPE, ""),
                     **{col: _or_dash(_figure(v, key)) for col, key in _ACCURACY_TAGS},
                     "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or "-"})
    return rows

