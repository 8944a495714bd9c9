"""Pathology foundation models as frozen image encoders: a registry of the known ones, and loading them.

Three routes, tried in this order by :func:`load_encoder`:

1. A ``torch.nn.Module`` the user loaded (any package), with its normalisation.
2. A local weights file with a ViT architecture histoclip builds itself (:class:`~histoclip.module.VisionTransformer`,
   timm's parameter names): no timm, no network. A registry name (``"uni"``) supplies the architecture.
3. timm: ``"hf-hub:<org>/<model>"`` (downloaded with the user's Hugging Face token) or any timm architecture name.
   Access is checked before any network call: a gated model without a token fails at once, naming ``HF_TOKEN``,
   ``huggingface-cli login`` and route 2.

Nothing here touches the network at import, and weights are never bundled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._encoders import IMAGENET_MEAN, IMAGENET_STD
from ._vit import VIT_ARCHS, VisionTransformer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class FoundationModel:
    """What histoclip knows about a published image encoder (from its model card; check the card before relying on it).

    Attributes
    ----------
    name
        Short name, the key in :data:`FOUNDATION_MODELS`.
    hub_id
        Hugging Face repository (``"MahmoodLab/UNI"``).
    loader
        How the published weights load: ``"timm"`` (``timm.create_model("hf-hub:" + hub_id, **model_kwargs)``, or
        histoclip's own ViT from a local file), else the package named (``"conch"``, ``"transformers"``): load the
        model with it and pass the module.
    arch
        timm architecture of the weights (``loader="timm"``).
    model_kwargs
        Keyword arguments for ``timm.create_model`` (layer classes by name: ``mlp_layer="swiglu_packed"``).
    mpp
        Microns per pixel of the training tiles (0.5: 20x).
    input_px
        Input side in pixels.
    mean, std
        Normalisation of RGB in [0, 1].
    out_dim
        Embedding width.
    pool
        ``"model"``: the model's output is the embedding; ``"token+avg"``: the model returns its tokens and the
        embedding is the class token concatenated with the mean of the patch tokens (Virchow's recipe).
    licence, gated, note
        Licence of the weights, whether the hub asks users to accept terms (and a token), and how to load it.

    """

    name: str
    hub_id: str
    loader: str
    arch: str | None
    mpp: float
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dim: int
    licence: str
    gated: bool
    note: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pool: Literal["model", "token+avg"] = "model"


_SWIGLU = {"mlp_layer": "swiglu_packed"}
#: The known pathology foundation models. Add an entry (a :class:`FoundationModel`) to make a new one known by name.
FOUNDATION_MODELS: dict[str, FoundationModel] = {m.name: m for m in (
    FoundationModel(
        "uni", "MahmoodLab/UNI", "timm", "vit_large_patch16_224", 0.5, 224, IMAGENET_MEAN, IMAGENET_STD, 1024,
        "CC-BY-NC-ND-4.0", True, "ViT-L/16, DINOv2 on 100k slides (Chen et al. 2024).",
        {"init_values": 1e-5, "dynamic_img_size": True}),
    FoundationModel(
        "uni2-h", "MahmoodLab/UNI2-h", "timm", "vit_giant_patch14_224", 0.5, 224, IMAGENET_MEAN, IMAGENET_STD, 1536,
        "CC-BY-NC-ND-4.0", True, "ViT-H/14 with 8 register tokens and SwiGLU.",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU}),
    FoundationModel(
        "conch", "MahmoodLab/CONCH", "conch", None, 0.5, 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 512,
        "CC-BY-NC-ND-4.0", True,
        "Vision-language ViT-B/16 (open_clip layout, not timm): load it with the `conch` package "
        "(create_model_from_pretrained('conch_ViT-B-16', 'hf_hub:MahmoodLab/conch')) and pass a module that calls "
        "model.encode_image(x, proj_contrast=False, normalize=False)."),
    FoundationModel(
        "virchow2", "paige-ai/Virchow2", "timm", "vit_huge_patch14_224", 0.5, 224, IMAGENET_MEAN, IMAGENET_STD, 2560,
        "CC-BY-NC-ND-4.0", True, "ViT-H/14 with 4 register tokens; embedding = class token + mean patch token.",
        {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
         "dynamic_img_size": True, **_SWIGLU}, "token+avg"),
    FoundationModel(
        "h-optimus-0", "bioptimus/H-optimus-0", "timm", "vit_giant_patch14_reg4_dinov2", 0.5, 224,
        (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 1536, "Apache-2.0", True,
        "ViT-g/14 with 4 register tokens.", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}),
    FoundationModel(
        "prov-gigapath", "prov-gigapath/prov-gigapath", "timm", "vit_giant_patch14_dinov2", 0.5, 224, IMAGENET_MEAN,
        IMAGENET_STD, 1536, "Apache-2.0 (research use; see the model card)", True,
        "The tile encoder (ViT-g/16) of Prov-GigaPath.",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5,
         "mlp_ratio": 5.33334}),
    FoundationModel(
        "phikon-v2", "owkin/phikon-v2", "transformers", None, 0.5, 224, IMAGENET_MEAN, IMAGENET_STD, 1024,
        "Owkin non-commercial (see the model card)", False,
        "ViT-L/16 (DINOv2) in the transformers layout: load AutoModel.from_pretrained('owkin/phikon-v2') and pass a "
        "module returning last_hidden_state[:, 0]."),
)}

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def known_model(name: str) -> FoundationModel | None:
    """The registry entry for a short name (``"UNI"``) or a hub id (``"hf-hub:MahmoodLab/UNI"``), else ``None``."""
    key = name.strip()
    for prefix in HUB_PREFIXES:
        key = key.removeprefix(prefix)
    key = key.lower()
    for m in FOUNDATION_MODELS.values():
        if key in (m.name.lower(), m.hub_id.lower()):
            return m
    return None


@dataclass
class Encoder:
    """A loaded encoder and how to feed it."""

    net: nn.Module
    name: str
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_px: int | None = None
    mpp: float | None = None
    pool: str = "model"
    spec: FoundationModel | None = None


class FrozenEncoder(nn.Module):
    """uint8 RGB patches ``(B, 3, H, W)`` -> float features ``(B, D)``: scaled, normalised, pooled, no gradients."""

    def __init__(self, enc: Encoder) -> None:
        super().__init__()
        self.net = enc.net
        self.pool = enc.pool
        self.register_buffer("mean", torch.tensor(enc.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(enc.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.out_dim: int | None = getattr(enc.net, "out_dim", None) if enc.pool == "model" else None

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net((x.float() / 255.0 - self.mean) / self.std)
        if isinstance(y, tuple | list):
            y = y[0]
        if y.ndim == 3:
            if self.pool != "token+avg":
                raise ValueError(
                    f"The encoder returned tokens {tuple(y.shape)}, not one vector per patch; use a module that pools "
                    "them (e.g. timm's num_classes=0 with global_pool='token'), or a registry entry with "
                    "pool='token+avg'."
                )
            n_pre = int(getattr(self.net, "num_prefix_tokens", 1))
            y = torch.cat([y[:, 0], y[:, n_pre:].mean(dim=1)], dim=-1)
        if y.ndim != 2:
            raise ValueError(f"The encoder returned shape {tuple(y.shape)}; expected (batch, features).")
        return y.float()


def _offline() -> list[str]:
    return [v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def _token() -> str | None:
    """The Hugging Face token from the environment or ``huggingface-cli login``'s file; never a network call."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def _routes(spec: FoundationModel | None, hub_id: str) -> str:
    arch = f"'{spec.name}'" if spec is not None and spec.loader == "timm" else "'<timm architecture>'"
    return (
        f"To use {hub_id!r}: pip install 'histoclip[foundation]' (timm, huggingface_hub), accept the model's terms on "
        f"https://huggingface.co/{hub_id} and set HF_TOKEN=<your token> or run `huggingface-cli login`. Offline: "
        f"download the weights once elsewhere and pass the local file, backbone={arch}, weights='pytorch_model.bin' "
        "(no timm or network needed for the ViTs histoclip knows)."
    )


def _import_timm(what: str):
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - timm also fails at import when torchvision does not match torch
        raise ImportError(
            f"{what} needs timm, which could not be imported ({type(err).__name__}: {err}). "
            "pip install 'histoclip[foundation]' (timm needs a torchvision built for your torch)."
        ) from err
    return timm


def _timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if out.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        out["mlp_layer"], out["act_layer"] = SwiGLUPacked, nn.SiLU
    return out


def _from_hub(hub_id: str, spec: FoundationModel | None, model_kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model('hf-hub:...'), after checking what can be checked without the network."""
    problems = []
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        problems.append("huggingface_hub is not installed")
    try:
        _import_timm("hf-hub")
    except ImportError as err:
        problems.append(f"timm cannot be imported ({err.__cause__})")
    if problems:
        raise ImportError(f"{'; '.join(problems)}. " + _routes(spec, hub_id))
    offline = _offline()
    if spec is not None and spec.gated and not offline and _token() is None:
        raise RuntimeError(
            f"{hub_id} is gated on the Hugging Face hub and no access token was found (HF_TOKEN, "
            "HUGGING_FACE_HUB_TOKEN or `huggingface-cli login`). " + _routes(spec, hub_id)
        )
    import timm

    kwargs = _timm_kwargs({**(spec.model_kwargs if spec else {}), **model_kwargs, "num_classes": 0})
    try:
        return timm.create_model(f"hf-hub:{hub_id}", pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - network, token and cache errors all get the same actionable message
        where = f"offline ({', '.join(offline)} set) and not in the local Hugging Face cache" if offline else (
            "the download failed")
        raise RuntimeError(f"Could not load {hub_id}: {where} ({type(err).__name__}: {err}). "
                           + _routes(spec, hub_id)) from err


def _pretrained_cfg(net: nn.Module) -> dict[str, Any]:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return dict(cfg)


def load_encoder(
    backbone: str | nn.Module,
    *,
    weights: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Encoder:
    """Resolve ``backbone`` to an :class:`Encoder` (see the module docstring for the routes)."""
    model_kwargs = dict(model_kwargs or {})
    if (mean is None) != (std is None):
        raise ValueError("Pass mean= and std= together (the normalisation of RGB in [0, 1] the weights were trained "
                         "with).")
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and (len(v) != 3 or (name == "std" and min(v) <= 0)):
            raise ValueError(f"{name} must be three numbers (R, G, B){', all positive' if name == 'std' else ''}, "
                             f"got {v!r}.")
    norm = None if mean is None else (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if isinstance(backbone, nn.Module):
        if norm is None:
            raise ValueError("backbone=<torch.nn.Module> needs mean= and std=, the normalisation its weights expect "
                             f"(ImageNet: mean={IMAGENET_MEAN}, std={IMAGENET_STD}).")
        if weights is not None or model_kwargs:
            raise ValueError("weights= and model_kwargs= apply to named backbones; load them into your module.")
        return Encoder(backbone, f"module:{type(backbone).__name__}", "torch.nn.Module", *norm)
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a name or a torch.nn.Module, got {type(backbone).__name__}.")
    spec = known_model(backbone)
    is_hub = backbone.startswith(HUB_PREFIXES)
    if spec is not None and spec.loader != "timm":
        raise ValueError(f"{spec.name} does not load through timm or histoclip's ViT. {spec.note} Pass that module as "
                         f"backbone=..., with mean={spec.mean}, std={spec.std}, patch_px={spec.input_px}, "
                         f"mpp={spec.mpp}.")
    if weights is not None:
        arch = spec.arch if spec is not None else backbone
        if is_hub and spec is None:
            raise ValueError(f"weights= needs an architecture name, not {backbone!r}: pass backbone='<timm "
                             "architecture>' and model_kwargs= from the model card.")
        kwargs = {**(spec.model_kwargs if spec else {}), **model_kwargs}
        if arch in VIT_ARCHS:
            with torch.device("meta"):  # no random initialisation: every tensor comes from the file
                net: nn.Module = VisionTransformer.from_arch(arch, **kwargs)
            net.load_weights(weights)
            source = f"histoclip ViT {arch} from {Path(weights).name}"
        else:
            timm = _import_timm(f"backbone={backbone!r} (not one of histoclip's own ViTs {sorted(VIT_ARCHS)})")
            from ._vit import read_state_dict

            net = timm.create_model(arch, pretrained=False, num_classes=0, **_timm_kwargs(kwargs))
            state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("head.")}
            net.load_state_dict(state, strict=True)
            source = f"timm {arch} from {Path(weights).name}"
        if spec is not None:
            m, s = norm or (spec.mean, spec.std)
            return Encoder(net, spec.name, source, m, s, spec.input_px, spec.mpp, spec.pool, spec)
        if norm is None:
            if arch in VIT_ARCHS:
                raise ValueError(f"backbone={backbone!r} with weights= needs mean= and std=, the normalisation these "
                                 f"weights were trained with (ImageNet: mean={IMAGENET_MEAN}, std={IMAGENET_STD}).")
            cfg = _pretrained_cfg(net)
            norm = (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
        img = kwargs.get("img_size", VIT_ARCHS.get(arch, {}).get("img_size", 224))
        return Encoder(net, backbone, source, *norm, int(img))
    if is_hub or spec is not None:
        hub_id = spec.hub_id if spec is not None else backbone.split(":", 1)[1]
        net = _from_hub(hub_id, spec, model_kwargs)
        cfg = _pretrained_cfg(net)
        if spec is not None:
            m, s = norm or (spec.mean, spec.std)
            return Encoder(net, spec.name, f"timm hf-hub:{hub_id}", m, s, spec.input_px, spec.mpp, spec.pool, spec)
        m, s = norm or (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
        return Encoder(net, backbone, f"timm hf-hub:{hub_id}", m, s, int(cfg.get("input_size", (3, 224, 224))[-1]))
    return _timm_arch(backbone, model_kwargs, norm)


def _timm_arch(backbone: str, model_kwargs: dict[str, Any], norm) -> Encoder:
    """A timm architecture with timm's own pretrained weights (downloaded by timm)."""
    from ._pretrained import BACKBONES

    known = (f"backbone must be one of {BACKBONES}, a foundation model {sorted(FOUNDATION_MODELS)} (with weights= a "
             f"local file, or through timm), one of histoclip's ViTs {sorted(VIT_ARCHS)} with weights=, "
             "'hf-hub:<org>/<model>', a timm architecture name (with timm installed) or a torch.nn.Module")
    try:
        timm = _import_timm(f"backbone={backbone!r}")
    except ImportError as err:
        if backbone in VIT_ARCHS:
            raise ImportError(f"{err} Without timm, pass weights= a local file for {backbone!r}.") from err
        raise ValueError(f"{known}; got {backbone!r}. ({err})") from err
    if not timm.is_model(backbone):
        raise ValueError(f"{known}; got {backbone!r} (not a timm model either).")
    net = timm.create_model(backbone, pretrained=True, num_classes=0, **_timm_kwargs(model_kwargs))
    cfg = _pretrained_cfg(net)
    m, s = norm or (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    return Encoder(net, backbone, f"timm {backbone} (timm's pretrained weights)", m, s,
                   int(cfg.get("input_size", (3, 224, 224))[-1]))
