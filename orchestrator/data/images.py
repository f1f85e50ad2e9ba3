"""Images as a client sends them: encoded bytes (PNG), from the (3, H, W) tensors the tasks hold."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_image(tensor: torch.Tensor) -> bytes:
    """A (3, H, W) tensor in [0, 1] as PNG bytes: how a client sends an image."""
    arr = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
