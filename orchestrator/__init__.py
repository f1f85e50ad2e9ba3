"""The model-soup sweep orchestrator: sweep, track, cook and promote CLIP model soups."""

__version__ = "0.1.0"

# First: makes a local Ray loopback-only (a switch Ray reads once, when it is first imported);
# connect itself imports ray only inside its functions.
from orchestrator.runtime import connect  # noqa: E402,F401
