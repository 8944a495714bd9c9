"""Pure torch building blocks: encoders, heads, losses. Never imports anndata."""

from ._encoders import MLP, ImageEncoder, ProjectionHead, ResNet, SmallCNN
from ._foundation import FOUNDATION_MODELS, FoundationModel
from ._loss import LossOutput, clip_loss, gather_global, pml_clip_loss
from ._module import HistoclipModule
from ._vit import VIT_ARCHS, VisionTransformer

__all__ = [
    "FOUNDATION_MODELS",
    "FoundationModel",
    "HistoclipModule",
    "ImageEncoder",
    "LossOutput",
    "MLP",
    "ProjectionHead",
    "ResNet",
    "SmallCNN",
    "VIT_ARCHS",
    "VisionTransformer",
    "clip_loss",
    "gather_global",
    "pml_clip_loss",
]
