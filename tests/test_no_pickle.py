"""The data path reads checkpoints as safetensors only: no torch.load, no pickle in the package."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"


def test_package_never_unpickles():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"torch\.load\(", r"\bpickle\.loads?\(", r"\bimport pickle\b"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
    assert not offenders, offenders
