"""A user's own data that cannot be trusted is refused by `soup init` and by `soup sweep` before
anything is logged: one line on stderr, exit 2 (the trust checks' own cases, one by one, are
tests/data/test_trust_checks.py)."""

import shutil

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from owndata import write_folder

from orchestrator.cli import main

ARGS = ["--arch", "tiny-clip-glyphs", "--pretrained", "tiny-glyphs"]
SPLITS = {"train": 8, "heldout": 3, "test": 3}


def _init(capsys, root, *extra) -> tuple[int, str, str]:
    code = main(["init", str(root), *ARGS, "--out", str(root.parent / "space.yaml"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, root, message: str, *extra) -> None:
    code, out, err = _init(capsys, root, *extra)
    assert code == 2, out
    assert err.count("\n") == 1 and err.startswith("soup init: error: ") and message in err, err
    assert not (root.parent / "space.yaml").exists()


def test_init_on_a_clean_folder_prints_what_it_found_and_writes_a_space(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", {"train": 8, "test": 3})
    code, out, _ = _init(capsys, root)
    assert code == 0
    assert f"{root}: folder, 3 classes ({root})" in out
    assert "heldout  carved: 15% of train" in out and "test" in out
    assert "data: train 24, test 9 images; 0 unreadable skipped; leakage: 33 examined" in out
    space = yaml.safe_load((tmp_path / "space.yaml").read_text())
    assert space["base"]["data"]["dataset"] == "folder" and space["base"]["data"]["root"] == str(root)
    assert space["base"]["data"]["image_size"] == 32 and space["sweep"]["resources"]["gpu"] == 0
    assert space["tracking"] == {"experiment_name": "shapes", "registered_model": "shapes-soup"}


def test_init_for_gpus_writes_the_cluster_command_and_one_trial_per_gpu(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", SPLITS)
    code, out, _ = _init(capsys, root, "--gpus", "4")
    assert code == 0 and "ray job submit --working-dir . -- soup sweep" in out
    text = (tmp_path / "space.yaml").read_text()
    assert text.splitlines()[0] == f"# ray job submit --working-dir . -- soup sweep {tmp_path / 'space.yaml'}"
    space = yaml.safe_load(text)
    assert space["sweep"]["max_concurrent_trials"] == 4 and space["sweep"]["resources"]["gpu"] == 1
    assert space["base"]["train"]["device"] == "cuda"


def test_init_refuses_held_out_images_that_are_also_in_train(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", SPLITS)
    for i in range(3):  # three held-out images copied from train
        shutil.copy(root / "train" / "red_square" / f"00{i}.png", root / "heldout" / "red_square" / f"dup{i}.png")
    code, out, err = _init(capsys, root)
    print(err)
    assert code == 2
    assert "data: 3 held-out images are also in train (same content): " in err
    for i in range(3):
        assert f"{root}/heldout/red_square/dup{i}.png = {root}/train/red_square/00{i}.png" in err


@pytest.mark.parametrize("case, message", [
    ("classes differ", "data: the test split's classes differ from train's: missing ['green_disc'], extra ['green_dsic']"),
    ("empty class", "data: class 'blue_bar' has no image in the train split; add images or remove the class"),
    ("missing from held-out", "data: class 'green_disc' has no image in the held-out split"),
    ("missing from test", "data: class 'blue_bar' has no image in the test split"),
    ("unreadable", "/train/red_square/bad.png: "),
])
def test_init_refuses_data_it_cannot_trust(tmp_path, capsys, case, message):
    root = write_folder(tmp_path / "shapes", SPLITS)
    if case == "classes differ":
        (root / "test" / "green_disc").rename(root / "test" / "green_dsic")
    elif case == "empty class":
        shutil.rmtree(root / "train" / "blue_bar")
        (root / "train" / "blue_bar").mkdir()
    elif case == "missing from held-out":
        for f in (root / "heldout" / "green_disc").iterdir():
            f.unlink()
    elif case == "missing from test":
        for f in (root / "test" / "blue_bar").iterdir():
            f.unlink()
    else:
        (root / "train" / "red_square" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    _refused(capsys, root, message)
    if case == "unreadable":
        _refused(capsys, root, "set data.skip_unreadable: true to skip such images")


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path, capsys):
    root = write_folder(tmp_path / "shapes", SPLITS)
    (root / "train" / "red_square" / "bad.png").write_bytes(b"not an image at all")
    code, out, _ = _init(capsys, root, "--skip-unreadable")
    assert code == 0 and "1 unreadable skipped (train 1)" in out
    assert yaml.safe_load((tmp_path / "space.yaml").read_text())["base"]["data"]["skip_unreadable"] is True


def test_sweep_refuses_data_that_went_bad_after_init_and_logs_nothing(tmp_path, capsys, hermetic):
    root = write_folder(tmp_path / "shapes", SPLITS)
    assert _init(capsys, root)[0] == 0
    shutil.copy(root / "train" / "blue_bar" / "000.png", root / "test" / "blue_bar" / "copy.png")
    code = main(["sweep", str(tmp_path / "space.yaml"), "--name", "bad", "--storage-path", hermetic["storage"]])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("soup sweep: error: ") and err.count("\n") == 1
    assert "data: 1 test image is also in train (same content): " in err and "test/blue_bar/copy.png" in err
    client = MlflowClient(hermetic["uri"])
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not ray.is_initialized()
