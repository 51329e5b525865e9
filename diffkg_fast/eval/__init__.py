"""Evaluation: full-ranking metrics and per-visit medication metrics."""
