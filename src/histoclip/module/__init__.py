"""Pure torch building blocks: encoders, heads, losses. Never imports anndata."""

from ._encoders import MLP, ImageEncoder, ProjectionHead, ResNet, SmallCNN
from ._loss import LossOutput, clip_loss, gather_global, pml_clip_loss
from ._module import HistoclipModule

__all__ = [
    "HistoclipModule",
    "ImageEncoder",
    "LossOutput",
    "MLP",
    "ProjectionHead",
    "ResNet",
    "SmallCNN",
    "clip_loss",
    "gather_global",
    "pml_clip_loss",
]
