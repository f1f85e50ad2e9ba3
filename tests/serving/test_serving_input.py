"""What the served soup does with bad input: one readable line naming the row and the cause.

A real soup pyfunc is logged (tiny zero-shot classifier, sqlite store) and loaded through MLflow;
`invocations` is the handler behind ``mlflow models serve``'s ``/invocations``, called without a
server so that these tests stay fast.
"""

import base64
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations

from orchestrator.config import ModelConfig
from orchestrator.data import digits as tinyworld
from orchestrator.data.images import encode_image
from orchestrator.record.soups import log_soup_model
from orchestrator.record.tracking import Tracker
from orchestrator.soups import save_weights
from orchestrator.train import models

COLUMNS = ["label", "label_index", "probabilities"]
NOT_AN_IMAGE = "not an encoded image (PNG or JPEG bytes, or their base64 text)"


@pytest.fixture(scope="module")
def soup(tmp_path_factory):
    """The soup pyfunc as MLflow loads it, logged as `cook` logs one (weights of the base model)."""
    tmp = tmp_path_factory.mktemp("serving-input")
    cfg = ModelConfig()
    weights = save_weights(models.build_classifier(cfg, tinyworld.DIGITS).state_dict(),
                           tmp / "soup.safetensors")
    config = {"model": cfg.model_dump(mode="json"), "classnames": list(tinyworld.DIGITS),
              "image_size": int(models.arch_config(cfg.arch)["vision_cfg"]["image_size"])}
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}")
    run_id = tracker.create_run(tracker.experiment_id("serving-input"), "soup", {})
    logged = log_soup_model(tracker, run_id, weights, config, _png(0))
    return mlflow.pyfunc.load_model(logged.artifact_location)


def _png(seed: int) -> bytes:
    return encode_image(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def _serve(model, body: dict):
    """What ``mlflow models serve`` answers to a JSON request (raises what it answers 4xx/5xx)."""
    schema = model.metadata.get_input_schema()
    return invocations(json.dumps(body), "application/json", model, schema)


def _refusal(model, model_input) -> MlflowException:
    with pytest.raises(MlflowException) as err:
        model.predict(model_input)
    assert "\n" not in err.value.message
    return err.value


def test_serving_numpy_array_gets_the_input_hint(soup):
    pixels = np.random.default_rng(0).random((2, 32, 32, 3))
    # MLflow enforces the declared signature before the model sees the input: that refusal is
    # MLflow's own (PyFuncModel._predict -> _validate_prediction_input), not ours to reword
    with pytest.raises(MlflowException, match="^Failed to enforce schema of data"):
        soup.predict(pixels)
    # wherever the model itself is handed an array, it says what it takes instead of printing it
    with pytest.raises(MlflowException) as caught:
        soup.unwrap_python_model().predict(None, pixels)
    err = caught.value
    assert err.message == (
        "the soup takes a pandas DataFrame with an 'image' column of encoded images (PNG or JPEG "
        "bytes, or their base64 text), one per row, e.g. "
        "pd.DataFrame({'image': [open('x.png', 'rb').read()]}); "
        "got a numpy array of shape (2, 32, 32, 3) (float64)")
    assert err.error_code == "INVALID_PARAMETER_VALUE"
    # the public way to send an array of encoded images: name its column
    out = soup.predict({"image": np.array([_png(1), _png(2)], dtype=object)})
    assert list(out.columns) == COLUMNS and len(out) == 2


def test_serving_empty_dataframe_returns_an_empty_result(soup):
    out = soup.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))
    assert list(out.columns) == COLUMNS and len(out) == 0
    assert out["label_index"].dtype == "int64"
    reply = _serve(soup, {"dataframe_split": {"columns": ["image"], "data": []}})
    assert reply.status == 200 and json.loads(reply.response) == {"predictions": []}


def test_serving_undecodable_row_is_named(soup):
    junk = pd.DataFrame({"image": [_png(1), _png(2), b"not an image at all"]})
    assert _refusal(soup, junk).message == f"row 2: {NOT_AN_IMAGE}: cannot identify image file"
    text = pd.DataFrame({"image": [base64.b64encode(_png(1)).decode(), "@@ not base64 @@"]})
    assert _refusal(soup, text).message.startswith(f"row 1: {NOT_AN_IMAGE}: invalid base64 (")
    indexed = pd.DataFrame({"image": [_png(1), b"\x89PNG truncated"]}, index=[10, 20])
    assert _refusal(soup, indexed).message.startswith(f"row 20 (position 1): {NOT_AN_IMAGE}: ")
    # a client of `mlflow models serve` gets a 400 carrying the same line
    with pytest.raises(MlflowException) as err:
        _serve(soup, {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(_png(1)).decode()], [base64.b64encode(b"junk").decode()]]}})
    assert err.value.get_http_status_code() == 400
    assert f"row 1: {NOT_AN_IMAGE}: cannot identify image file" in err.value.message


def test_serving_missing_image_is_named(soup):
    missing = pd.DataFrame({"image": [_png(1), None]})
    assert _refusal(soup, missing).message == "row 1: no image (None)"
    first = pd.DataFrame({"image": [None, _png(1)]})
    assert _refusal(soup, first).error_code == "INVALID_PARAMETER_VALUE"


def test_serving_inputs_request_carries_base64_bytes(soup):
    # `{"inputs": [...]}`, the request form MLflow recommends, reaches the model as base64 bytes
    b64 = [base64.b64encode(_png(i)).decode() for i in (1, 2)]
    reply = _serve(soup, {"inputs": b64})
    served = json.loads(reply.response)["predictions"]
    direct = soup.predict(pd.DataFrame({"image": [_png(1), _png(2)]}))
    assert reply.status == 200 and [p["label"] for p in served] == direct["label"].tolist()
