"""Image and expression encoders (pure torch; no AnnData here)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Four conv blocks (32-64-128-256 channels) and global average pooling; trains from scratch."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in widths:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC activations whatever the caller passed: oneDNN's max-pooling is ~4x faster on them on x86 CPUs
        # (training already sends channels-last batches; embedding and feature extraction did not)
        return self.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))


# ResNet with torchvision's parameter names, so torchvision checkpoints load into it unchanged.
class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c * 4:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c * 4, 1, stride, bias=False), nn.BatchNorm2d(c * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


_RESNETS = {
    "resnet18": (_BasicBlock, (2, 2, 2, 2)),
    "resnet34": (_BasicBlock, (3, 4, 6, 3)),
    "resnet50": (_Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """A torchvision-compatible ResNet backbone (no classifier); ``out_dim`` is 512 or 2048."""

    def __init__(self, arch: str = "resnet18") -> None:
        super().__init__()
        if arch not in _RESNETS:
            raise ValueError(f"arch must be one of {list(_RESNETS)}, got {arch!r}.")
        block, counts = _RESNETS[arch]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (c, n) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, c, 2 if (j == 0 and i > 0) else 1))
                c_in = c * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision checkpoint (``resnet18-f37072fd.pth`` etc.) without unpickling code."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ResNet weights {str(path)!r} not found.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path.name} does not match this ResNet: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
                f"(e.g. {wrong[:3]})."
            )
        self.load_state_dict(state, strict=True)


class ImageEncoder(nn.Module):
    """Turns uint8 RGB patches (or precomputed features) into a feature vector.

    Parameters
    ----------
    backbone
        ``"cnn"`` (small CNN from scratch), ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"features"``
        (inputs are precomputed feature vectors of size ``in_features``).
    weights
        Path to torchvision weights for a ResNet backbone.
    freeze
        Keep the backbone's weights fixed (only the heads train).

    """

    def __init__(
        self,
        backbone: str = "cnn",
        *,
        weights: str | Path | None = None,
        freeze: bool = False,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        if backbone == "cnn":
            self.backbone = SmallCNN()
        elif backbone in _RESNETS:
            self.backbone = ResNet(backbone)
            if weights is not None:
                self.backbone.load_torchvision_weights(weights)
        elif backbone == "features":
            if in_features is None:
                raise ValueError("backbone='features' needs in_features.")
            self.backbone = nn.Identity()
            self.backbone.out_dim = in_features  # type: ignore[attr-defined]
        else:
            raise ValueError(
                f"backbone must be 'cnn', 'resnet18', 'resnet34', 'resnet50' or 'features', got {backbone!r}.")
        if backbone == "cnn" and weights is not None:
            raise ValueError("weights= applies to ResNet backbones only.")
        self.out_dim = int(self.backbone.out_dim)
        self.freeze = freeze
        if freeze:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_name == "features":
            return x.float()
        x = (x.float() / 255.0 - self.mean) / self.std
        if self.freeze:
            self.backbone.eval()
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)


class MLP(nn.Module):
    """Linear-LayerNorm-GELU-Dropout blocks."""

    def __init__(self, dims: tuple[int, ...], dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProjectionHead(nn.Module):
    """BLEEP's projection: linear, then a residual GELU-linear-dropout block and LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.norm(h + self.drop(self.fc(nn.functional.gelu(h))))
