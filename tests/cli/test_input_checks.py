"""Input checks that refuse a command before Ray or MLflow start (or print a command to copy).

Each refusal is one stderr line, ``soup <command>: error: ...``, exit 2, with nothing started and
nothing created: no Ray, no Tune state, no MLflow run or experiment, no file, and a sqlite file
that was given byte for byte as it was.

| case | bad input                                                  | test                                                                   |
|------|------------------------------------------------------------|------------------------------------------------------------------------|
| 1    | a space of more trials than `sweep.max_trials`             | test_a_space_of_more_trials_than_sweep_max_trials_is_refused           |
| 1    | (how trials are counted, and the line printed before)      | test_trials_are_counted_as_tune_makes_them                             |
| 2    | a sweep id of more than 100 bytes in UTF-8                 | test_a_sweep_id_of_too_many_bytes_is_refused_before_anything_starts    |
| 3    | `--name ''` (or only spaces)                               | test_an_empty_sweep_name_is_refused                                    |
| 4    | ids and paths with spaces in the commands printed to copy  | test_printed_commands_quote_ids_and_paths_for_the_shell,               |
|      |                                                            | test_a_taken_or_missing_sweep_id_is_refused_with_a_quoted_command      |
| 5    | MLFLOW_TRACKING_URI: a path, `file:`, an unknown scheme    | test_a_tracking_uri_that_names_no_store_soup_can_use_is_refused        |
| 6    | a sqlite file of another program                           | test_a_sqlite_file_of_another_program_is_refused_and_left_as_it_was    |
| 6    | an empty database (0 bytes, or no tables)                  | test_an_empty_database_holds_no_store_to_read_but_a_sweep_may_start_one |
"""

from __future__ import annotations

import shlex
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from refusals import one_error_line, snapshot, space_is_refused, write_space

from orchestrator.cli import main

# --- 1: the number of trials a space makes --------------------------------------------------------

GRID_5000 = {"train.seed": {"grid": list(range(100))}, "train.epochs": {"grid": list(range(1, 51))}}


@pytest.mark.parametrize("change, why", [
    ({"search": GRID_5000, "sweep": {"num_samples": 100000}},
     "this space makes 500,000,000 trials (5,000 grid points × num_samples 100,000), above "
     "sweep.max_trials 10,000; lower sweep.num_samples or the grid, or raise sweep.max_trials"),
    ({"sweep": {"num_samples": 20000}},
     "this space makes 20,000 trials (num_samples 20,000), above sweep.max_trials 10,000"),
    ({"search": {"train.seed": {"grid": [0, 1, 2]}}, "sweep": {"num_samples": 2, "max_trials": 5}},
     "this space makes 6 trials (3 grid points × num_samples 2), above sweep.max_trials 5"),
], ids=["grid-times-samples", "samples", "own-cap"])
def test_a_space_of_more_trials_than_sweep_max_trials_is_refused(hermetic, capsys, change, why):
    """500 million trials used to be accepted silently; the cap names the count and how it is made."""
    space = write_space(hermetic["tmp"], change)
    space_is_refused(hermetic, capsys, space, f"{space}: key 'sweep.max_trials': {why}")


def test_trials_are_counted_as_tune_makes_them(tmp_path):
    """Tune runs every grid combination for each of num_samples samples: the count, the line a
    sweep prints before it starts, and a raised cap that lets a large space through."""
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator.config import ConfigError, SearchSpace, load_yaml, trials_made
    from orchestrator.sweep.driver import param_space

    space = load_yaml(SearchSpace, write_space(tmp_path, {"search": {
        "train.seed": {"grid": [0, 1]}, "train.epochs": {"grid": [1, 2, 3]}}, "sweep": {"num_samples": 4}}))
    per_sample = len(list(generate_variants(param_space(space))))  # Tune's own expansion of one sample
    assert space.trial_count == 4 * per_sample == 24
    assert trials_made(space) == "24 trials (6 grid points × num_samples 4)"
    plain = load_yaml(SearchSpace, write_space(tmp_path, {"sweep": {"num_samples": 1}}))
    assert trials_made(plain) == "1 trial (num_samples 1)"
    at_cap = load_yaml(SearchSpace, write_space(tmp_path, {"sweep": {"num_samples": 10000}}))
    assert at_cap.trial_count == at_cap.sweep.max_trials == 10000
    raised = load_yaml(SearchSpace, write_space(tmp_path, {
        "search": GRID_5000, "sweep": {"num_samples": 100000, "max_trials": 500_000_000}}))
    assert raised.trial_count == 500_000_000
    with pytest.raises(ConfigError, match="key 'sweep.max_trials': Input should be greater than or equal to 1"):
        load_yaml(SearchSpace, write_space(tmp_path, {"sweep": {"max_trials": 0}}))


# --- 2, 3: sweep ids that cannot name a folder, or name nothing ----------------------------------

def _sweep(hermetic, capsys, space: Path, *args: str) -> str:
    """`soup sweep SPACE ARGS` refused: exit 2, its one line; no Ray, no Tune state, no store."""
    import ray

    code = main(["sweep", str(space), *args, "--storage-path", hermetic["storage"]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert not ray.is_initialized() and not Path(hermetic["storage"]).exists()
    assert not Path(hermetic["uri"][len("sqlite:///"):]).exists(), "a refused sweep created the store"
    return one_error_line(err, "sweep")


@pytest.mark.fresh_store
def test_a_sweep_id_of_too_many_bytes_is_refused_before_anything_starts(hermetic, capsys):
    """100 characters of 3 bytes each are 300 bytes, too long for a folder name: this used to end
    in `OSError: [Errno 36] File name too long` and a FAILED sweep run."""
    from orchestrator.sweep.driver import _sweep_id

    line = _sweep(hermetic, capsys, write_space(hermetic["tmp"], {}), "--name", "€" * 100)
    assert line == (f"soup sweep: error: sweep id {'€' * 40!r}...: must be at most 100 printable "
                    "characters without '/' and at most 100 bytes in UTF-8 (it names a folder, and "
                    "folder names are limited in bytes); it has 100 characters, 300 bytes")
    assert _sweep_id(Path("s.yaml"), "é" * 50, resume=False) == "é" * 50  # 100 bytes: accepted


@pytest.mark.fresh_store
@pytest.mark.parametrize("name, resume, why", [
    ("", False, "--name '': a sweep id must not be empty"),
    ("", True, "--name '': a sweep id must not be empty"),
    ("   ", False, "sweep id '   ': must be non-empty, without quotes or backslashes"),
], ids=["empty", "empty-resume", "blank"])
def test_an_empty_sweep_name_is_refused(hermetic, capsys, name, resume, why):
    """`--name ''` used to become a generated id silently."""
    line = _sweep(hermetic, capsys, write_space(hermetic["tmp"], {}), "--name", name,
                  *(["--resume"] if resume else []))
    assert line.startswith(f"soup sweep: error: {why}"), line


# --- 4: commands printed for a person to copy -----------------------------------------------------

def _command_after(text: str, marker: str) -> list[str]:
    """The words a POSIX shell makes of what follows `marker` in `text`."""
    assert marker in text, text
    return shlex.split(text.split(marker, 1)[1])


def test_printed_commands_quote_ids_and_paths_for_the_shell():
    from orchestrator.sweep.driver import SweepInterrupted, cook_hint

    stopped = SweepInterrupted("a b", "SIGINT", Path("my spaces/it's.yaml"))
    assert _command_after(str(stopped), "continue it with: ") == [
        "soup", "sweep", "my spaces/it's.yaml", "--name", "a b", "--resume"]
    assert shlex.split(cook_hint("a b")) == ["soup", "cook", "--sweep", "a b"]
    assert cook_hint("s3") == "soup cook --sweep s3"  # a plain id is printed as it was


def test_a_taken_or_missing_sweep_id_is_refused_with_a_quoted_command(hermetic, capsys):
    """`_check_unique`'s refusals name the command that continues (or starts) the sweep, for an id
    and a space path with spaces; nothing is started or logged."""
    import ray

    folder = hermetic["tmp"] / "my spaces"
    folder.mkdir()
    space = write_space(folder, {})
    client = MlflowClient(hermetic["uri"])
    exp = client.create_experiment("bad-input")  # the space's experiment, with a sweep "a b" made by hand
    client.create_run(exp, tags={"soup.role": "sweep", "sweep_id": "a b"}, run_name="a b")
    before = snapshot(client)
    capsys.readouterr()  # MLflow's own lines from creating the store
    for name, resume, marker, words in [
        ("a b", False, "continue it with: ", ["--name", "a b", "--resume"]),
        ("c d", True, "start it with: ", ["--name", "c d"]),
    ]:
        code = main(["sweep", str(space), "--name", name, *(["--resume"] if resume else []),
                     "--storage-path", hermetic["storage"]])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert _command_after(one_error_line(err, "sweep"), marker) == ["soup", "sweep", str(space), *words]
    assert snapshot(client) == before
    assert not ray.is_initialized() and not Path(hermetic["storage"]).exists()


# --- 5, 6: stores soup cannot use, refused for every command ---------------------------------------

def _every_command(tmp: Path) -> list[list[str]]:
    """One call of each command that opens the store (what they name need not exist)."""
    return [["sweep", str(write_space(tmp, {})), "--storage-path", str(tmp / "ray_results")],
            ["cook", "--sweep", "s3", "--no-ray"], ["cook", "--sweep", "s3", "--plan"],
            ["promote", "tiny4-soup", "--version", "1"], ["models", "tiny4-soup"]]


def _refused_everywhere(tmp: Path, capsys, argvs: list[list[str]], why: str) -> None:
    """Each command: exit 2 with the line `why`, nothing started, no file added or changed."""
    import ray

    before = {p: p.read_bytes() if p.is_file() else None for p in tmp.rglob("*")}
    for argv in argvs:
        code = main(argv)
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), (argv, code, out)
        assert one_error_line(err, argv[0]) == f"soup {argv[0]}: error: {why}", argv
        assert not ray.is_initialized()
        assert {p: p.read_bytes() if p.is_file() else None for p in tmp.rglob("*")} == before, argv


@pytest.mark.parametrize("kind", ["path", "folder", "file-store", "unknown", "password"])
def test_a_tracking_uri_that_names_no_store_soup_can_use_is_refused(tmp_path, monkeypatch, capsys, kind):
    """These ended in an MlflowException traceback (a path is taken for MLflow's file store, which
    MLflow 3 refuses by default; `bogus://` has no store); now one line, for every command, with
    the URI meant or the schemes soup accepts, and a password never printed."""
    (tmp_path / "mlruns").mkdir()
    accepted = "soup accepts sqlite, postgresql, mysql, mssql, http, https, databricks"
    no_file_store = ("which soup does not support{} it needs a database store or a tracking server: "
                     "sqlite:///PATH, postgresql://..., http(s)://SERVER")
    uri, why = {
        "path": (f"{tmp_path}/x/mlflow.db", f"is a path, not a URI: use sqlite:///{tmp_path}/x/mlflow.db"),
        "folder": (f"{tmp_path}/mlruns", "is a path to a folder, not a URI: a folder is MLflow's file "
                                         "store, " + no_file_store.format(":")),
        "file-store": (f"file://{tmp_path}/fs", "is MLflow's file store, " + no_file_store.format(
            " (MLflow keeps it in maintenance mode and refuses it by default):")),
        "unknown": ("bogus://x", f"has an unknown scheme 'bogus': {accepted}"),
        "password": ("postgres://soup:s3cret@localhost/db",
                     f"has an unknown scheme 'postgres' (did you mean postgresql?): {accepted}"),
    }[kind]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shown = uri.replace("s3cret", "***")
    _refused_everywhere(tmp_path, capsys, _every_command(tmp_path), f"MLFLOW_TRACKING_URI {shown!r} {why}"
                        + ("" if kind in ("path", "folder", "file-store") else
                           " (a database scheme may name its driver, as in postgresql+psycopg2)"))


def test_a_sqlite_file_of_another_program_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """Another program's database used to be made an MLflow store (about 50 tables added beside
    its own); now every command refuses it, and it stays byte for byte as it was."""
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, total REAL)")
        conn.execute("CREATE TABLE customers (name TEXT)")
        conn.execute("INSERT INTO customers VALUES ('Ada')")
    conn.close()
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _refused_everywhere(tmp_path, capsys, _every_command(tmp_path),
                        f"MLflow store {uri} is not an MLflow database: it holds other tables "
                        "(e.g. 'customers'); point MLFLOW_TRACKING_URI at an MLflow store or a new file")


def _empty_database(db: Path, kind: str) -> None:
    if kind == "zero-bytes":
        db.write_bytes(b"")
    else:  # a sqlite file with a header and no table
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 7")
        conn.close()


@pytest.mark.parametrize("kind", ["zero-bytes", "no-tables"])
def test_an_empty_database_holds_no_store_to_read_but_a_sweep_may_start_one(tmp_path, monkeypatch,
                                                                               capsys, kind):
    """The commands that read a store (cook, cook --plan, promote, models) refuse an empty
    database, unchanged; `soup sweep`, which starts a store, may use it."""
    from orchestrator.record.store import check_store

    db = tmp_path / "mlflow.db"
    _empty_database(db, kind)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _refused_everywhere(tmp_path, capsys, _every_command(tmp_path)[1:],
                        f"no MLflow store at {uri}: {db} is an empty database "
                        "(set MLFLOW_TRACKING_URI to the sweep's store)")
    check_store(uri, write=True, must_exist=False)  # what `soup sweep` checks: accepted
    MlflowClient(uri).create_experiment("started")  # and MLflow starts its store in the file
    capsys.readouterr()  # MLflow's own lines from creating its tables
    assert main(["models", "tiny4-soup"]) == 2  # a store now: the model, not the store, is missing
    assert "no MLflow store" not in one_error_line(capsys.readouterr().err, "models")
