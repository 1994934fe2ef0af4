"""Multimodal instruction data: the on-disk JSONL+PNG format and the synthetic generator."""
