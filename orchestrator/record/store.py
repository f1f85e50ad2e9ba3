"""The MLflow store a command is about to use, checked before it does any work.

`check_store` refuses, with one line naming the URI and why, a URI that names no store soup can
use (a plain path, MLflow's file store, an unknown scheme) and a local sqlite store that cannot
serve the command (missing where it is read, another program's database, read-only where it is
written). It reads a sqlite file with `sqlite3` itself; nothing here imports mlflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["StoreError", "check_store", "store_schemes", "DATABASE_SCHEMES", "SERVER_SCHEMES"]


class StoreError(ValueError):
    """An MLflow store that a command cannot use; the message names the URI and why."""


# The stores soup works with: MLflow's database stores (a scheme may name its driver, as in
# postgresql+psycopg2) and its tracking servers. MLflow's file store (a folder, `file:`) is not one:
# MLflow keeps it in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
STORES_HINT = "sqlite:///PATH, postgresql://..., http(s)://SERVER"
# Tables only an MLflow store has: `experiments` is created first, `alembic_version` when the schema
# is migrated right after (a store being created holds one without the other for a moment).
MLFLOW_TABLES = frozenset({"experiments", "alembic_version"})


def check_store(uri: str, write: bool = True, must_exist: bool = True) -> None:
    """Refuse a store that cannot be used, before a command does any work.

    A URI that names no store soup can use (a plain path, MLflow's file store, an unknown scheme)
    is refused for every command. For a local sqlite store: `must_exist`: the store is read, not
    started (a mistyped URI, or an empty database, is not made a store). A sqlite file that holds
    another program's tables is refused (MLflow would add its own beside them). `write`: the
    command logs to it, so a read-only file or folder is refused now, rather than after the work,
    as a retried error on every write. Writability is tried, not guessed from permission bits
    (which do not bind root): a write transaction is begun and rolled back. A locked store is in
    use by a writer, so it is accepted. Other stores (a tracking server, a database server) report
    their own problems on the first call.
    """
    _check_scheme(uri)
    path = _sqlite_file(uri)
    if path is None:
        return
    if path.is_dir():
        raise StoreError(f"MLflow store {uri} cannot be opened: {path} is a folder, not a sqlite file")
    if not path.exists():
        if must_exist:
            raise StoreError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI to the sweep's store)")
        _check_new_store_folder(uri, path.parent, write)
        return
    _check_sqlite(uri, path, write, must_exist)


def store_schemes() -> tuple[str, ...]:
    """The URI schemes soup accepts: MLflow's database stores and tracking servers, and any store
    plugin installed for both tracking and the registry (a `Tracker` uses one URI for both),
    found as MLflow finds plugins: by their entry points."""
    from importlib.metadata import entry_points

    groups = ("mlflow.tracking_store", "mlflow.model_registry_store")
    plugins = set.intersection(*({e.name for e in entry_points(group=g)} for g in groups))
    builtin = DATABASE_SCHEMES + SERVER_SCHEMES
    return builtin + tuple(sorted(plugins - set(builtin)))


def _check_scheme(uri: str) -> None:
    """Refuse a URI that names no store soup can use with one line, not MLflow's traceback."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if uri == "databricks" or scheme in store_schemes() or scheme.partition("+")[0] in DATABASE_SCHEMES:
        return
    if not scheme:  # MLflow takes a plain path for a file store
        raise StoreError(_path_problem(uri))
    if scheme == "file":
        raise StoreError(f"MLFLOW_TRACKING_URI {uri!r} is MLflow's file store, which soup does not "
                         "support (MLflow keeps it in maintenance mode and refuses it by default): it "
                         f"needs a database store or a tracking server: {STORES_HINT}")
    raise StoreError(_unknown_scheme(uri, scheme))


def _path_problem(uri: str) -> str:
    """Why a plain path is no tracking URI, with the URI that was probably meant."""
    if Path(uri).expanduser().is_dir():
        return (f"MLFLOW_TRACKING_URI {uri!r} is a path to a folder, not a URI: a folder is MLflow's "
                "file store, which soup does not support: it needs a database store or a tracking "
                f"server: {STORES_HINT}")
    return f"MLFLOW_TRACKING_URI {uri!r} is a path, not a URI: use sqlite:///{Path(uri).expanduser()}"


def _unknown_scheme(uri: str, scheme: str) -> str:
    """The refusal of a scheme MLflow has no store for, listing those soup accepts."""
    import difflib

    known = store_schemes()
    near = difflib.get_close_matches(scheme, known, n=1)
    guess = f" (did you mean {near[0]}?)" if near else ""
    return (f"MLFLOW_TRACKING_URI {_masked(uri)!r} has an unknown scheme {scheme!r}{guess}: soup "
            f"accepts {', '.join(known)} (a database scheme may name its driver, as in "
            "postgresql+psycopg2)")


def _masked(uri: str) -> str:
    """`uri` with its password, if any, masked: the error line may end up in a shared log."""
    from urllib.parse import urlparse

    password = urlparse(uri).password
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def _sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (without its query), or None for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    name = uri[len(prefix):].partition("?")[0]
    return Path(name) if name and name != ":memory:" else None


def _check_new_store_folder(uri: str, folder: Path, write: bool) -> None:
    """A store that MLflow will create needs an existing folder it can create files in."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StoreError(f"MLflow store {uri} cannot be opened: {existing} is a file, not a folder")
    if existing != folder:
        raise StoreError(f"MLflow store {uri} cannot be opened: folder {folder} does not exist")
    if write:
        try:  # what sqlite will do to create the store (the probe file is removed at once)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise StoreError(f"MLflow store {uri} cannot be created: folder {folder} is not "
                             f"writable ({err.strerror or err})") from None


def _check_sqlite(uri: str, path: Path, write: bool, must_exist: bool) -> None:
    """Open the file as sqlite, check what it holds, and, with `write`, begin a write and roll it
    back; nothing is written to the file."""
    import sqlite3
    from urllib.parse import quote

    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=5,
                               isolation_level=None)
    except sqlite3.Error as err:
        raise StoreError(f"MLflow store {uri} cannot be opened: {err}") from None
    try:
        _sqlite_step(uri, "cannot be opened", lambda: conn.execute("PRAGMA schema_version").fetchone())
        _check_tables(uri, path, conn, must_exist)
        if write:
            _sqlite_step(uri, "is read-only", lambda: _begin_and_roll_back(conn), path.parent)
    finally:
        conn.close()


def _check_tables(uri: str, path: Path, conn, must_exist: bool) -> None:
    """Refuse another program's database (MLflow would add its tables beside that program's) and,
    where the store is read, an empty one (it holds no store; reading would make it one)."""
    tables = _sqlite_step(uri, "cannot be opened", lambda: [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_' "
        "ORDER BY name")])
    if tables is None:  # locked by a writer: in use, as a store is
        return
    if not tables:
        if must_exist:
            raise StoreError(f"no MLflow store at {uri}: {path} is an empty database "
                             "(set MLFLOW_TRACKING_URI to the sweep's store)")
        return  # a new store: MLflow creates its tables in it
    if not MLFLOW_TABLES & set(tables):
        raise StoreError(f"MLflow store {uri} is not an MLflow database: it holds other tables "
                         f"(e.g. {tables[0]!r}); point MLFLOW_TRACKING_URI at an MLflow store or a new file")


def _begin_and_roll_back(conn) -> None:
    """A real write (a table created in a transaction that is rolled back): sqlite reports a
    read-only file at the BEGIN and a read-only folder when it creates its journal there."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE soup_write_probe (x)")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _sqlite_step(uri: str, failure: str, step: Callable[[], Any], folder: Path | None = None) -> Any:
    """Run one sqlite step and return its result; None when a writer holds a lock (the store is
    in use, so usable); any other error is a `StoreError`."""
    import sqlite3

    try:
        return step()
    except sqlite3.Error as err:
        code = getattr(err, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return None  # another process is writing to it: it is a usable store
        why = str(err)
        if folder is not None and code.startswith("SQLITE_CANTOPEN"):
            why = f"its folder {folder} is not writable (sqlite keeps its journal there)"
        raise StoreError(f"MLflow store {uri} {failure}: {why}") from None
