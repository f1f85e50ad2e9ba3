"""Digests that identify things across processes and runs: files, texts and JSON values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def json_sha256(value: Any, **dumps) -> str:
    """Hex sha256 of `value` as JSON (``json.dumps`` keyword arguments in `dumps`)."""
    return text_sha256(json.dumps(value, **dumps))
