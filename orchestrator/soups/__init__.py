"""Soup recipes and weights I/O. Recipes arrive with the cook; the primitives live here."""

from .weights import load_weights, save_weights, weighted_average

__all__ = ["load_weights", "save_weights", "weighted_average"]
