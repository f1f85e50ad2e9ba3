"""The soup as an MLflow pyfunc, logged from code (no pickled Python objects).

Input: a DataFrame with an ``image`` column of encoded image bytes (PNG or JPEG; base64 text is
also accepted, as JSON requests to ``mlflow models serve`` carry it). Output: a DataFrame with
``label`` (the class name), ``label_index`` and ``probabilities`` (one list per row); an empty
input gets an empty output with these columns.

Bad input is refused with one line naming the row and what is wrong with it, raised as an
`MlflowException` (INVALID_PARAMETER_VALUE) so that ``mlflow models serve`` answers 400 with that
line rather than a generic error. One input never reaches this code: a bare numpy array (or list)
given to ``mlflow.pyfunc.load_model(...).predict`` is refused first by MLflow's own enforcement of
the declared signature, with MLflow's message; pass ``{"image": array}`` or
``pd.DataFrame({"image": list(array)})`` instead.

Artifacts: ``weights`` (safetensors state dict of the classifier) and ``config`` (JSON with the
model config and the class names).
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

ENCODED = "PNG or JPEG bytes, or their base64 text"
INPUT_HINT = ("the soup takes a pandas DataFrame with an 'image' column of encoded images "
              f"({ENCODED}), one per row, "
              "e.g. pd.DataFrame({'image': [open('x.png', 'rb').read()]})")
NOT_AN_IMAGE = f"not an encoded image ({ENCODED})"


def decode_image(value, size: int) -> torch.Tensor:
    """Bytes (or base64 text) of an encoded image to a (3, size, size) tensor in [0, 1].

    Anything else raises ValueError saying what is wrong (the caller names the row)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        raise ValueError(f"no image ({value})")
    if not isinstance(value, (bytes, bytearray, memoryview, str)):
        raise ValueError(f"{NOT_AN_IMAGE}: got {type(value).__name__}")
    try:
        img = _open(value).convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{NOT_AN_IMAGE}: {_cause(err)}") from err
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _open(value) -> Image.Image:
    raw = base64.b64decode(value) if isinstance(value, str) else bytes(value)
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        if isinstance(value, str) or not _is_base64(raw):
            raise
        # `mlflow models serve` hands `inputs`/`instances` JSON over as undecoded base64 bytes
        return Image.open(io.BytesIO(base64.b64decode(raw)))


def _is_base64(raw: bytes) -> bool:
    try:
        base64.b64decode(raw, validate=True)
        return True
    except binascii.Error:
        return False


def _cause(err: Exception) -> str:
    """An error from decoding, in words (PIL's message ends in an object's address)."""
    if isinstance(err, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(err, binascii.Error):
        return f"invalid base64 ({err})"
    return str(err) or type(err).__name__




def bad_input(message: str) -> MlflowException:
    """The error for a bad request: MLflow's scoring server answers 400 with `message`."""
    return MlflowException.invalid_parameter_value(message)


def image_column(model_input) -> pd.Series:
    """The ``image`` column of a request; anything else is refused with `INPUT_HINT`, naming what
    it got but never printing it (an array of pixels would fill the screen)."""
    if isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
        return model_input["image"]
    raise bad_input(f"{INPUT_HINT}; got {_describe(model_input)}")


def _describe(model_input) -> str:
    if isinstance(model_input, np.ndarray):
        return f"a numpy array of shape {model_input.shape} ({model_input.dtype})"
    if isinstance(model_input, pd.DataFrame):
        return f"a DataFrame with columns {[str(c) for c in model_input.columns][:5]}"
    return f"a {type(model_input).__module__}.{type(model_input).__qualname__}"


def decode_rows(images: pd.Series, size: int) -> list[torch.Tensor]:
    """Every row decoded (`decode_image`); the first bad one raises `bad_input` naming it."""
    out = []
    for pos, (label, value) in enumerate(images.items()):
        try:
            out.append(decode_image(value, size))
        except ValueError as err:
            row = f"row {label}" if label == pos else f"row {label!r} (position {pos})"
            raise bad_input(f"{row}: {err}") from err
    return out


def predictions(classnames: list[str], probs: torch.Tensor) -> pd.DataFrame:
    """The output frame for `probs` (n, classes); typed columns even when n is 0."""
    idx = probs.argmax(-1).tolist() if len(probs) else []
    return pd.DataFrame({"label": pd.Series([classnames[i] for i in idx], dtype=object),
                         "label_index": pd.Series(idx, dtype="int64"),
                         "probabilities": pd.Series([p.tolist() for p in probs], dtype=object)})


class SoupClassifier(mlflow.pyfunc.PythonModel):
    """Classifies images with a soup's weights; built from its config, never unpickled."""

    def load_context(self, context) -> None:
        from orchestrator.config import ModelConfig
        from orchestrator.record.schema import PYFUNC_CONFIG, PYFUNC_WEIGHTS
        from orchestrator.soups.io.stream import read_weights
        from orchestrator.train.models import build_classifier

        with open(context.artifacts[PYFUNC_CONFIG]) as f:
            cfg = json.load(f)
        self.classnames = cfg["classnames"]
        self.image_size = cfg["image_size"]
        self.model = build_classifier(ModelConfig(**cfg["model"]), self.classnames,
                                      pretrained_weights=False)
        self.model.load_state_dict(read_weights(context.artifacts[PYFUNC_WEIGHTS]))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = decode_rows(image_column(model_input), self.image_size)
        if not images:  # an empty request gets an empty answer (torch.stack refuses no tensors)
            return predictions(self.classnames, torch.empty(0, len(self.classnames)))
        with torch.no_grad():
            probs = self.model(torch.stack(images)).softmax(-1)
        return predictions(self.classnames, probs)


mlflow.models.set_model(SoupClassifier())
