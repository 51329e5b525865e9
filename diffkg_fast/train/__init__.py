"""Training loop: DiffKG's epoch order, validation-based selection, one final test."""

from diffkg_fast.train.trainer import TrainResult, sample_negatives, train

__all__ = ["TrainResult", "sample_negatives", "train"]
