"""Data: tokenizers, datasets, packing and the built-in tasks."""
