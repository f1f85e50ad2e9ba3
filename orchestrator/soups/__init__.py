"""Soup recipes and weights I/O. Recipes arrive with the cook; the primitives live here.

Ingredients are safetensors files (streamed chunk by chunk, never all in memory) or state dicts.
"""

from .stream import read_header, read_weights, scan_file
from .weights import load_weights, save_weights, stream_weighted_sum, weighted_average

__all__ = ["load_weights", "save_weights", "weighted_average", "stream_weighted_sum", "read_header",
           "read_weights", "scan_file"]
