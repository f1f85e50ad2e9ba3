"""Weights I/O for the recipes: safetensors headers parsed by hand and tensors streamed in chunks
(`stream`), and the weighted sums every soup is built from (`weights`).

May import: torch, safetensors.
"""
