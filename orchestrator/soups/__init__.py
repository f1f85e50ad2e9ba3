"""Soup recipes and weights I/O: the recipe table (`recipe`), one file per recipe (`uniform`,
`greedy`, `learned` with `learned-layerwise`, `model_stock`, `online` for
`online-greedy`), the logit ensembles, and
streaming safetensors reads and weighted sums (`io`).

Ingredients are safetensors files (streamed chunk by chunk, never all in memory) or state dicts.
`read_weights` is the one way a whole checkpoint is read into memory; weights I/O is in `io/`.

May import: train (the held-out evaluation), and torch, safetensors.
"""

from orchestrator.soups import greedy, learned, model_stock, online, uniform  # noqa: F401 - each registers its recipe(s)
from orchestrator.soups.io.stream import read_header, read_weights, scan_file
from orchestrator.soups.io.weights import save_weights, stream_weighted_sum, weighted_average

__all__ = ["read_header", "read_weights", "save_weights", "scan_file", "stream_weighted_sum",
           "weighted_average"]
