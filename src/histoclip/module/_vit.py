"""A plain Vision Transformer whose parameter names are timm's, so timm / UNI / Phikon-style weights load without timm.

Pure torch (no timm, no torchvision): the pre-norm ViT of Dosovitskiy et al. as timm's ``VisionTransformer``
builds it (patch embedding, class and register tokens, absolute position embedding, blocks of
LayerNorm -> attention -> LayerScale and LayerNorm -> MLP -> LayerScale, final LayerNorm), with timm's defaults
(LayerNorm eps 1e-6, exact GELU, bicubic antialiased resampling of the position embedding for other input sizes).
The state dict of a ``timm.create_model(arch, num_classes=0, **kwargs)`` loads into
``VisionTransformer.from_arch(arch, **kwargs)`` with ``strict=True`` and gives the same features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

#: timm's architecture arguments (``timm/models/vision_transformer.py``) for the names histoclip builds itself.
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small_patch16_224": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base_patch16_224": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large_patch16_224": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_huge_patch14_224": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16},
    "vit_giant_patch14_224": {"patch_size": 14, "embed_dim": 1408, "depth": 40, "num_heads": 16,
                              "mlp_ratio": 48 / 11},
    "vit_base_patch14_dinov2": {"patch_size": 14, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                "init_values": 1e-5, "img_size": 518},
    "vit_large_patch14_dinov2": {"patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                                 "init_values": 1e-5, "img_size": 518},
    "vit_giant_patch14_dinov2": {"patch_size": 14, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                 "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed",
                                 "img_size": 518},
    "vit_giant_patch14_reg4_dinov2": {"patch_size": 14, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                      "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu_packed",
                                      "reg_tokens": 4, "no_embed_class": True, "img_size": 518},
}
#: keyword arguments of timm's VisionTransformer that only matter for training or do not change inference here
_IGNORED = {"num_classes", "dynamic_img_size", "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate",
            "pos_drop_rate", "patch_drop_rate", "weight_init", "act_layer"}


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1, GELU, fc2) or, with ``packed_swiglu``, its ``SwiGLUPacked`` (fc1, SiLU(a) * b, fc2)."""

    def __init__(self, dim: int, hidden: int, *, packed_swiglu: bool = False) -> None:
        super().__init__()
        if packed_swiglu and hidden % 2:
            raise ValueError(f"A packed SwiGLU needs an even hidden width, got {hidden}.")
        self.packed_swiglu = packed_swiglu
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU() if packed_swiglu else nn.GELU()
        self.fc2 = nn.Linear(hidden // 2 if packed_swiglu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.packed_swiglu:
            a, b = x.chunk(2, dim=-1)
            x = self.act(a) * b
        else:
            x = self.act(x)
        return self.fc2(x)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, qkv_bias: bool, init_values: float | None,
                 packed_swiglu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, packed_swiglu=packed_swiglu)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', C)


class VisionTransformer(nn.Module):
    """A ViT with timm's parameter names; the image encoder of the pathology foundation models (UNI, Virchow, ...).

    Parameters
    ----------
    img_size
        Input side the position embedding was trained for; other sides (multiples of ``patch_size``) resample it
        (bicubic, antialiased: timm's ``dynamic_img_size``).
    patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias
        The architecture (timm's names and meanings).
    init_values
        LayerScale initial value (``ls1.gamma``/``ls2.gamma`` parameters); ``None``: no LayerScale.
    class_token, reg_tokens, no_embed_class
        Prefix tokens: a class token, ``reg_tokens`` register tokens; with ``no_embed_class`` the position
        embedding covers the patch tokens only (DINOv2 with registers).
    mlp_layer
        ``"mlp"`` (GELU) or ``"swiglu_packed"`` (timm's ``SwiGLUPacked``, with ``mlp_ratio`` counting both halves).
    global_pool
        Output: ``"token"`` (the class token after the final norm, timm's default), ``"avg"`` (mean of the patch
        tokens, through ``fc_norm``, as timm does), ``"token+avg"`` (the class token and the mean of the patch tokens
        concatenated, Virchow's embedding: ``2 * embed_dim`` features) or ``""`` (all tokens, ``(B, N, embed_dim)``).

    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        mlp_layer: Literal["mlp", "swiglu_packed"] = "mlp",
        global_pool: Literal["token", "avg", "token+avg", ""] = "token",
    ) -> None:
        super().__init__()
        if mlp_layer not in ("mlp", "swiglu_packed"):
            raise ValueError(f"mlp_layer must be 'mlp' or 'swiglu_packed', got {mlp_layer!r}.")
        if global_pool not in ("token", "avg", "token+avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg', 'token+avg' or '', got {global_pool!r}.")
        if global_pool in ("token", "token+avg") and not class_token:
            raise ValueError(f"global_pool={global_pool!r} needs class_token=True.")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}.")
        self.patch_size, self.img_size, self.embed_dim = int(patch_size), int(img_size), int(embed_dim)
        self.grid = self.img_size // self.patch_size
        self.num_prefix_tokens = int(class_token) + int(reg_tokens)
        self.no_embed_class = bool(no_embed_class)
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = self.grid**2 + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, hidden, qkv_bias=qkv_bias, init_values=init_values,
                  packed_swiglu=mlp_layer == "swiglu_packed")
            for _ in range(depth)
        ])
        fc_norm = global_pool == "avg"  # timm: the final norm moves after the pooling for average pooling
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if fc_norm else nn.Identity()
        self.out_dim = embed_dim * (2 if global_pool == "token+avg" else 1)

    @classmethod
    def from_arch(cls, arch: str, **kwargs: Any) -> VisionTransformer:
        """Build timm's architecture ``arch`` (a key of :data:`VIT_ARCHS`), ``kwargs`` overriding its arguments.

        Accepts the keyword arguments that timm's ``create_model`` would take for the same weights; those that do
        not change inference (``num_classes=0``, ``dynamic_img_size``, dropout rates) are ignored, and timm's layer
        classes may be given by name (``mlp_layer="swiglu_packed"``) or as the timm objects themselves.
        """
        if arch not in VIT_ARCHS:
            raise ValueError(f"histoclip builds these ViT architectures without timm: {sorted(VIT_ARCHS)}; "
                             f"got {arch!r}. Install timm (pip install 'histoclip[foundation]') for others.")
        args = dict(VIT_ARCHS[arch])
        for key, value in kwargs.items():
            if key in _IGNORED:
                if key == "num_classes" and value:
                    raise ValueError(f"num_classes={value}: histoclip uses the ViT as a feature extractor; pass 0.")
                continue
            if key == "mlp_layer" and not isinstance(value, str):
                value = "swiglu_packed" if "SwiGLUPacked" in repr(value) or "GluMlp" in repr(value) else repr(value)
            args[key] = value
        return cls(**args)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        pos = self.pos_embed
        if (h, w) != (self.grid, self.grid):
            n_pre = 0 if self.no_embed_class else self.num_prefix_tokens
            prefix, grid = pos[:, :n_pre], pos[:, n_pre:]
            grid = grid.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
            pos = torch.cat([prefix, grid.reshape(1, h * w, c).to(pos.dtype)], dim=1)
        x = x.reshape(b, h * w, c)
        tokens = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            return torch.cat([*tokens, x + pos], dim=1)
        return torch.cat([*tokens, x], dim=1) + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``(B, prefix + patches, embed_dim)``."""
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"Input side {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}.")
        return self.norm(self.blocks(self._pos_embed(self.patch_embed(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1))
        if self.global_pool == "token+avg":
            return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        return x

    def load_weights(self, path: str | Path) -> None:
        """Load a timm-layout state dict from a ``.safetensors``, ``.bin`` or ``.pth`` file (never unpickling code).

        A classifier head (``head.*``) in the file is dropped; everything else must match exactly, and a mismatch
        names the missing, unexpected and differently shaped keys. Weights stored in half precision are cast to
        this model's dtype.
        """
        state = read_state_dict(path)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{Path(path).name} does not match this ViT (embed_dim {self.embed_dim}, depth {len(self.blocks)}, "
                f"patch {self.patch_size}, {self.num_prefix_tokens} prefix tokens): {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another "
                f"shape (file vs model, e.g. {wrong[:3]}). Check the architecture name and its keyword arguments "
                "(model_kwargs=...) against the model card."
            )
        dtype = next(iter(own.values())).dtype
        # assign: a model built on the meta device (no initialisation: seconds saved for a ViT-g) takes the tensors
        self.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``), unwrapping ``{"state_dict": ...}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} not found.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict.")
    return state
