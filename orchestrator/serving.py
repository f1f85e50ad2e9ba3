"""The soup as an MLflow pyfunc, logged from code (no pickled Python objects).

Input: a DataFrame with an ``image`` column of encoded image bytes (PNG or JPEG; base64 text is
also accepted, as JSON requests to ``mlflow models serve`` carry it). Output: a DataFrame with
``label`` (the class name), ``label_index`` and ``probabilities`` (one list per row).

Artifacts: ``weights`` (safetensors state dict of the classifier) and ``config`` (JSON with the
model config and the class names).
"""

from __future__ import annotations

import base64
import io
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image


def decode_image(value, size: int) -> torch.Tensor:
    """Bytes (or base64 text) of an encoded image to a (3, size, size) tensor in [0, 1]."""
    raw = base64.b64decode(value) if isinstance(value, str) else bytes(value)
    img = Image.open(io.BytesIO(raw)).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def encode_image(tensor: torch.Tensor) -> bytes:
    """A (3, H, W) tensor in [0, 1] as PNG bytes: how a client sends an image."""
    arr = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class SoupClassifier(mlflow.pyfunc.PythonModel):
    """Classifies images with a soup's weights; built from its config, never unpickled."""

    def load_context(self, context) -> None:
        from orchestrator.config import ModelConfig
        from orchestrator.models import build_classifier
        from orchestrator.soups.stream import read_weights

        with open(context.artifacts["config"]) as f:
            cfg = json.load(f)
        self.classnames = cfg["classnames"]
        self.image_size = cfg["image_size"]
        self.model = build_classifier(ModelConfig(**cfg["model"]), self.classnames,
                                      pretrained_weights=False)
        self.model.load_state_dict(read_weights(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        x = torch.stack([decode_image(v, self.image_size) for v in model_input["image"]])
        with torch.no_grad():
            probs = self.model(x).softmax(-1)
        idx = probs.argmax(-1).tolist()
        return pd.DataFrame({"label": [self.classnames[i] for i in idx], "label_index": idx,
                             "probabilities": [p.tolist() for p in probs]})


mlflow.models.set_model(SoupClassifier())
