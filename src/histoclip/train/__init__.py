"""The training loop: seeded, mixed precision on CUDA, progress bar, loss history, safe interruption."""

from ._loop import TrainingResult, augment_batch, fit, pick_device

__all__ = ["TrainingResult", "augment_batch", "fit", "pick_device"]
