"""A user's own task end to end, once per adapter: made-up images in the adapter's layout,
`soup init` writes the space, `soup sweep` runs it on a real local Ray into a real MLflow store,
`soup cook` registers the soups, `soup promote` sets the alias, and the soup loaded by alias
answers with the task's class names."""

import io

import mlflow
import pandas as pd
import pytest
import torchvision
import yaml
from mlflow.tracking import MlflowClient
from owndata import CLASSES, DISPLAY, shape, write_fashion_mnist, write_folder, write_hf

from orchestrator.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _fashion(tmp):
    write_fashion_mnist(tmp / "fmnist", train=12, test=6)
    return ["torchvision:FashionMNIST", "--root", str(tmp / "fmnist")], None


def _folder(tmp):
    write_folder(tmp / "shapes", {"train": 16, "heldout": 6, "test": 6})
    return [str(tmp / "shapes")], tuple(DISPLAY[CLASSES.index(c)] for c in sorted(CLASSES))  # folders sorted


def _hf(tmp):
    write_hf(tmp / "shapes_hf", {"train": 16, "validation": 6, "test": 6})
    return [str(tmp / "shapes_hf")], DISPLAY


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("make", [_folder, _fashion, _hf], ids=["folder", "torchvision", "huggingface"])
def test_init_sweep_cook_promote_and_serve_class_names(make, hermetic, capsys):
    tmp = hermetic["tmp"]
    args, names = make(tmp)
    names = names or tuple(torchvision.datasets.FashionMNIST.classes)
    space = tmp / "space.yaml"
    assert main(["init", *args, "--arch", "tiny-clip-glyphs", "--pretrained", "tiny-glyphs",
                 "--out", str(space)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"wrote {space}" in out and "soup sweep" in out
    written = yaml.safe_load(space.read_text())
    assert tuple(written["base"]["data"]["classnames"]) == names
    assert space.read_text().splitlines()[0] == f"# soup sweep {space}"
    # a test's budget: two one-epoch trials (the written space searches 6-13 epochs of 8 trials)
    written["base"]["train"]["epochs"] = 1
    written["search"].pop("train.epochs")
    written["sweep"]["num_samples"] = 2
    space.write_text(yaml.safe_dump(written))

    assert main(["sweep", str(space), "--name", "own", "--storage-path", hermetic["storage"]]) == 0
    assert main(["cook", "--sweep", "own", "--recipes", "uniform,greedy"]) == 0
    model = written["tracking"]["registered_model"]
    client = MlflowClient(hermetic["uri"])
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == 2
    v = versions[0]
    assert yaml.safe_load(v.tags["classes"]) == list(names) and v.tags["n_classes"] == str(len(names))
    assert set(yaml.safe_load(v.tags["data_digests"])) >= {"heldout", "test", "rotate", "noise", "blur", "invert"}
    assert main(["promote", model, "--version", str(v.version), "--alias", "champion", "--force",
                 "--reason", "test"]) == 0

    served = mlflow.pyfunc.load_model(f"models:/{model}@champion")
    images = [_png(shape(k % 3, 1000 + k, 40)) for k in range(6)]
    pred = served.predict(pd.DataFrame({"image": images}))
    print(pred)
    assert set(pred["label"]) <= set(names) and len(pred) == 6
    assert list(served.metadata.get_input_schema().input_names()) == ["image"]
