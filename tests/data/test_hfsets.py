"""The Hugging Face adapter on small `datasets` built in tmp_path: saved with ``save_to_disk``,
written as parquet files, and an image folder (no network: the hub is switched off)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.data import hfsets
from orchestrator.data.listing import Reader

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "fish"]
SIZES = {"train": 6, "validation": 3, "test": 3}


@pytest.fixture(autouse=True)
def _no_hub_and_a_private_cache(tmp_path, monkeypatch):
    """Every load_dataset caches under tmp_path and never reaches the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _image(label: int, k: int) -> Image.Image:
    return Image.new("RGB", (6, 5), (60 * label, 20 * k, 0))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dataset_dict(image="image", label="label", label_feature=None, offset=0):
    """train / validation / test, label = row % 3, image k of a split unique except train's rows 0
    and 3 (both class 0, the same image); plus a caption column."""
    feats = datasets.Features({image: datasets.Image(), label: label_feature or datasets.ClassLabel(names=CLASSES),
                               "caption": datasets.Value("string")})
    out = {}
    for s, n in SIZES.items():
        labels = [k % 3 for k in range(n)]
        ks = [0 if (s == "train" and k == 3) else k + offset for k in range(n)]
        rows = {image: [_image(c, k) for c, k in zip(labels, ks)], label: labels,
                "caption": [f"{s} {k}" for k in range(n)]}
        out[s] = datasets.Dataset.from_dict(rows, features=feats)
    return datasets.DatasetDict(out)


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(dataset="huggingface", source=str(source), **kw)


def _check(found, source):
    assert found.source == str(source)
    assert {k: len(v.reader) for k, v in found.splits().items()} == {"train": 6, "heldout": 3, "test": 3}
    for listing in found.splits().values():
        assert listing.classes == tuple(CLASSES)
        assert listing.labels == tuple(k % 3 for k in range(len(listing.labels)))
    assert found.display == tuple(CLASSES)
    reader = found.train.reader
    assert isinstance(reader, Reader)
    assert np.array_equal(np.asarray(reader.open(4).convert("RGB")), np.asarray(_image(1, 4)))
    assert reader.content(0) == reader.content(3) == _png(_image(0, 0))
    assert reader.content(0) != reader.content(1)
    assert reader.size(2) == len(reader.content(2))
    assert reader.where(5) == f"{source} train row 5"
    assert found.heldout.reader.where(1) == f"{source} validation row 1"


def test_save_to_disk_folder(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "saved")
    _check(hfsets.find(_cfg(tmp_path / "saved")), tmp_path / "saved")


def test_parquet_folder_and_file(tmp_path):
    dd = _dataset_dict()
    for s, d in dd.items():
        d.to_parquet(str(tmp_path / "pq" / "data" / f"{s}-00000-of-00001.parquet"))
    _check(hfsets.find(_cfg(tmp_path / "pq")), tmp_path / "pq")
    one = hfsets.find(_cfg(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    assert one.heldout is None and one.test is None and len(one.train.reader) == 3  # one file: all train


def test_relative_source_under_root(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "saved")
    found = hfsets.find(DataConfig(dataset="huggingface", source="saved", root=str(tmp_path)))
    assert found.source == str((tmp_path / "saved").resolve()) and len(found.train.reader) == 6


def test_image_folder_rows_are_paths(tmp_path):
    for s, n in (("train", 4), ("test", 2)):
        for k in range(n):
            c = CLASSES[k % 2]
            (tmp_path / "imgs" / s / c).mkdir(parents=True, exist_ok=True)
            _image(k % 2, k).save(tmp_path / "imgs" / s / c / f"{k}.png")
    found = hfsets.find(_cfg(tmp_path / "imgs"))
    assert found.heldout is None and len(found.test.reader) == 2 and found.train.classes == ("cat", "dog")
    reader = found.train.reader
    i = next(i for i in range(4) if reader.where(i).endswith("2.png)"))
    assert reader.content(i) == (tmp_path / "imgs" / "train" / "cat" / "2.png").read_bytes()
    assert reader.size(i) == len(reader.content(i)) and found.train.labels[i] == 0
    assert reader.where(i).startswith(f"{tmp_path / 'imgs'} train row {i} (")


def test_custom_columns(tmp_path):
    _dataset_dict(image="img", label="y").save_to_disk(tmp_path / "saved")
    found = hfsets.find(_cfg(tmp_path / "saved", image_column="img", label_column="y"))
    assert found.test.labels == (0, 1, 2)
    assert np.array_equal(np.asarray(found.test.reader.open(2).convert("RGB")), np.asarray(_image(2, 2)))


def test_missing_column_names_the_columns(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError) as err:
        hfsets.find(_cfg(tmp_path / "saved", image_column="pixels"))
    msg = str(err.value)
    assert "\n" not in msg and "'pixels'" in msg and "data.image_column" in msg
    assert "['image', 'label', 'caption']" in msg
    with pytest.raises(ValueError, match="no column 'target' \\(data.label_column\\)"):
        hfsets.find(_cfg(tmp_path / "saved", label_column="target"))


def test_label_that_is_no_classlabel_is_refused(tmp_path):
    _dataset_dict(label_feature=datasets.Value("int64")).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError) as err:
        hfsets.find(_cfg(tmp_path / "saved"))
    msg = str(err.value)
    assert "\n" not in msg and "not a ClassLabel" in msg and "'label'" in msg


def test_image_column_that_holds_no_images_is_refused(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="column 'label' .* does not hold images"):
        hfsets.find(_cfg(tmp_path / "saved", image_column="label"))


def test_reader_pickles_small_and_reopens(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "saved")
    reader = hfsets.find(_cfg(tmp_path / "saved")).test.reader
    blob = pickle.dumps(reader)
    assert len(blob) < 2000  # the Arrow files' names, not the rows
    copy = pickle.loads(blob)
    assert len(copy) == 3 and copy.content(1) == reader.content(1) and copy.size(1) == reader.size(1)
    assert np.array_equal(np.asarray(copy.open(1).convert("RGB")), np.asarray(_image(1, 1)))
    # a reader without Arrow files loads its split again from the source
    again = hfsets.RowReader(reader.source, "test", "image", 3, (), "disk", reader.location)
    assert pickle.loads(pickle.dumps(again)).content(2) == reader.content(2)


def test_shift_reads_another_saved_sets_test_split(tmp_path):
    _dataset_dict().save_to_disk(tmp_path / "task")
    _dataset_dict(offset=7).save_to_disk(tmp_path / "other")
    cfg = _cfg(tmp_path / "task")
    shift = hfsets.find_shift(cfg, ShiftSpec(name="other", source=str(tmp_path / "other")))
    assert shift.name == "other" and shift.labels == (0, 1, 2) and shift.classes == tuple(CLASSES)
    assert shift.reader.content(1) == _png(_image(1, 8))
    assert shift.reader.where(0) == f"{tmp_path / 'other'} test row 0"
    val = hfsets.find_shift(cfg, ShiftSpec(name="v", source=str(tmp_path / "other"), split="validation"))
    assert len(val.reader) == 3
    with pytest.raises(ValueError, match="no split 'extra'"):
        hfsets.find_shift(cfg, ShiftSpec(name="x", source=str(tmp_path / "other"), split="extra"))
    _dataset_dict()["validation"].save_to_disk(tmp_path / "lone")  # a lone Dataset: read whole
    lone = hfsets.find_shift(cfg, ShiftSpec(name="lone", source=str(tmp_path / "lone")))
    assert lone.labels == (0, 1, 2) and lone.reader.where(0) == f"{tmp_path / 'lone'} train row 0"


def test_missing_path_and_unreachable_hub_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        hfsets.find(_cfg(tmp_path / "nowhere"))
    with pytest.raises(ValueError) as err:
        hfsets.find(_cfg("someone/no-such-set"))
    msg = str(err.value)
    assert "\n" not in msg and "'someone/no-such-set'" in msg and "needs the network" in msg


def test_missing_datasets_package_is_one_line(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError) as err:
        hfsets.find(_cfg(tmp_path))
    assert str(err.value) == ("data.dataset huggingface needs the datasets package: "
                              "pip install 'orchestrator[hf]'")
