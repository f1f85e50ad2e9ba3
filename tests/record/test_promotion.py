"""`soup promote` is all or nothing: a refused promotion leaves the registry exactly as it was.

Everything the promotion will write is checked first (the alias, the version tag keys
``promoted_<alias>_at`` and ``forced_promotion`` against MLflow's 250-character key limit, the
reason against its tag value limit); then the tags are recorded; then the alias moves. If MLflow
still refuses the move (a reserved alias), the recorded tags are taken back, earlier values
restored. The registry is made by hand (three versions, no training, no Ray), copied per test.
"""

from __future__ import annotations

import re

import pytest
from conftest import HAND
from mlflow.tracking import MlflowClient

from orchestrator.cli import main

KEY_LIMIT = 250  # MLflow's limit on a model version tag key
LONGEST = KEY_LIMIT - len("promoted__at")  # 238: the longest alias whose tag key fits
WHEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def snapshot(client: MlflowClient) -> dict:
    """The whole registry: each model's tags, description and aliases; each version's tags,
    aliases, description and status."""
    models, versions = {}, {}
    for m in client.search_registered_models():
        model = client.get_registered_model(m.name)
        models[m.name] = {"aliases": dict(model.aliases), "tags": dict(model.tags),
                          "description": model.description}
        for v in client.search_model_versions(f"name = '{m.name}'"):
            full = client.get_model_version(m.name, v.version)
            versions[(m.name, str(v.version))] = {
                "tags": dict(full.tags), "aliases": sorted(full.aliases),
                "description": full.description, "status": full.status}
    return {"models": models, "versions": versions}


def one_error_line(err: str) -> str:
    """The single stderr line of a refused `soup promote` (and proof that there is only one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("soup promote: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def refused(client: MlflowClient, capsys, argv: list[str], *fragments: str) -> str:
    """`soup promote ARGV`: exit 2, one stderr line holding `fragments`, the registry as it was."""
    before = snapshot(client)
    code = main(["promote", *argv])
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert code == 2 and out == "", (code, out)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(client) == before, "a refused promotion changed the registry"
    return line


def promoted(client: MlflowClient, capsys, argv: list[str]) -> dict:
    """`soup promote ARGV`: exit 0, one line on stdout; the promoted version's tags."""
    code = main(["promote", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    version = argv[argv.index("--version") + 1]
    alias = argv[argv.index("--alias") + 1]
    assert out == f"{HAND}@{alias} -> version {version}\n"
    assert str(client.get_model_version_by_alias(HAND, alias).version) == version
    return dict(client.get_model_version(HAND, version).tags)


@pytest.mark.parametrize("force", [False, True], ids=["gated", "forced"])
@pytest.mark.parametrize("length", [LONGEST + 6, KEY_LIMIT, 255])
def test_promotion_alias_too_long_for_its_tag_is_refused_before_any_change(registry, capsys, length, force):
    """An alias of 239-255 characters passes MLflow's alias limit (255) but not its limit on the
    tag key promoted_<alias>_at (250): refused up front, alias unmoved, no tag written."""
    client, alias = registry["client"], "a" * length
    argv = [HAND, "--version", "2", "--alias", alias, "--force", "--reason", "r"] if force else \
        [HAND, "--version", "3", "--alias", alias]  # 3 passes the gate: only the alias is wrong
    line = refused(client, capsys, argv)
    assert line == (f"soup promote: error: alias {'a' * 24!r}… ({length} characters) is too long: "
                    f"at most {LONGEST} characters (its promotion is recorded in the version tag "
                    f"promoted_<alias>_at, which MLflow limits to {KEY_LIMIT})")
    assert alias not in client.get_registered_model(HAND).aliases


def test_promotion_longest_alias_that_fits_is_promoted_and_recorded(registry, capsys):
    client, alias = registry["client"], "a" * LONGEST
    tags = promoted(client, capsys, [HAND, "--version", "3", "--alias", alias])
    key = f"promoted_{alias}_at"
    assert len(key) == KEY_LIMIT and WHEN.fullmatch(tags[key]) and "forced_promotion" not in tags
    forced = "b" * LONGEST  # and with --force, to a worse version, with its reason
    tags = promoted(client, capsys, [HAND, "--version", "2", "--alias", forced, "--force",
                                     "--reason", "canary"])
    assert WHEN.fullmatch(tags[f"promoted_{forced}_at"])
    assert tags["forced_promotion"] == f"{tags[f'promoted_{forced}_at']}: canary"
    assert str(client.get_model_version_by_alias(HAND, "champion").version) == "1"


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v3"])
def test_promotion_reserved_alias_leaves_no_tag_behind(registry, capsys, alias):
    """MLflow refuses a reserved alias only when it is moved, after the tags are recorded: they
    are taken back, and a tag that was there before (an earlier forced promotion) gets its
    earlier value back."""
    client = registry["client"]
    earlier = promoted(client, capsys, [HAND, "--version", "2", "--alias", "canary", "--force",
                                        "--reason", "shadow traffic"])["forced_promotion"]
    line = refused(client, capsys, [HAND, "--version", "2", "--alias", alias, "--force", "--reason", "r"],
                   f"alias {alias!r} refused by MLflow: ")
    assert "reserved" in line
    tags = client.get_model_version(HAND, "2").tags
    assert tags["forced_promotion"] == earlier and f"promoted_{alias}_at" not in tags
    refused(client, capsys, [HAND, "--version", "3", "--alias", alias], f"alias {alias!r} refused by MLflow")
    assert f"promoted_{alias}_at" not in client.get_model_version(HAND, "3").tags


@pytest.mark.parametrize("alias", ["my champ", "", "champion\n", "a/b", "ünïcode-ok"],
                         ids=["space", "empty", "newline", "slash", "unicode"])
def test_promotion_alias_characters(registry, capsys, alias):
    """MLflow's alias rule (letters, digits, _ and -; non-empty), checked before any write."""
    client = registry["client"]
    if alias == "ünïcode-ok":  # letters of any script are letters to MLflow too
        assert WHEN.fullmatch(promoted(client, capsys, [HAND, "--version", "3", "--alias", alias])
                              [f"promoted_{alias}_at"])
        return
    refused(client, capsys, [HAND, "--version", "3", "--alias", alias, "--force"],
            f"alias {alias!r} is not one MLflow accepts: it must be non-empty and hold only "
            "letters, digits, underscores (_) and dashes (-)")


def test_promotion_reason_too_long_for_its_tag_is_refused(registry, capsys):
    """The reason is recorded after the time ('2025-01-01T00:00:00Z: ') in forced_promotion,
    whose value MLflow limits to 100,000 characters: the longest that fits is recorded whole."""
    client, room = registry["client"], 100_000 - len("2025-01-01T00:00:00Z: ")
    refused(client, capsys, [HAND, "--version", "2", "--alias", "canary", "--force",
                             "--reason", "r" * (room + 1)],
            f"reason is too long ({room + 1} characters): at most {room} (it is recorded after the "
            "time in the version tag forced_promotion, which MLflow limits to 100000 characters)")
    tags = promoted(client, capsys, [HAND, "--version", "2", "--alias", "canary", "--force",
                                     "--reason", "r" * room])
    assert len(tags["forced_promotion"]) == 100_000


def test_promotion_store_failure_while_moving_takes_the_tags_back(registry, monkeypatch):
    """Not only a refusal: any failure after the tags are written (here the store, as the alias
    moves) puts them back before the error goes on."""
    from orchestrator.record.promotion import promote
    from orchestrator.record.tracking import Tracker

    client = registry["client"]
    client.set_model_version_tag(HAND, "2", "promoted_canary_at", "2020-01-01T00:00:00Z")  # earlier
    before = snapshot(client)

    def store_gone(self, name, alias, version):
        raise OSError("disk I/O error")

    monkeypatch.setattr(Tracker, "set_alias", store_gone)
    with pytest.raises(OSError, match="disk I/O error"):
        promote(Tracker(registry["uri"]), HAND, 2, "canary", force=True, reason="r")
    assert snapshot(client) == before
    assert client.get_model_version(HAND, "2").tags["promoted_canary_at"] == "2020-01-01T00:00:00Z"
