"""The model-soup sweep orchestrator: sweep, track, cook and promote CLIP model soups."""

__version__ = "0.1.0"
