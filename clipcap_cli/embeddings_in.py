"""Placeholder: captions from stored embeddings (in progress)."""
