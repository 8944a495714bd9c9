"""histoclip's ViT against timm's VisionTransformer: same state-dict names and shapes, same features. Prints JSON.

For each case a timm model is built at random initialisation (weights perturbed so that LayerScale is not ~0),
its state dict is loaded with ``strict=True`` into ``histoclip.module.VisionTransformer.from_arch`` with the same
keyword arguments, and both run on the same random input (float32, CPU); then the state dicts of the foundation
models' full-size architectures are compared on the meta device (names and shapes only, no memory).

Needs timm (and so a torchvision that imports beside your torch):

    python benchmarks/vit_parity.py

On this project's machine torchvision does not import beside the CPU torch build; the figures in
docs/image_encoders.md were measured with timm 1.0.31 imported through a stand-in torchvision module on
PYTHONPATH (only timm's import-time references to torchvision; the ViT code paths do not use it).
"""

from __future__ import annotations

import json

import timm
import torch
from timm.layers import SwiGLUPacked

from histoclip.module import FOUNDATION_MODELS, VisionTransformer

SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
CASES = [
    ("vit_tiny_patch16_224", {"init_values": 1e-5}, 224),
    ("vit_tiny_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}, 160),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, 224),
    ("vit_small_patch16_224", {"reg_tokens": 4, "init_values": 1e-5, "global_pool": "", "dynamic_img_size": True,
                               **SWIGLU}, 224),
    ("vit_small_patch16_224", {"reg_tokens": 8, "no_embed_class": True, "init_values": 1e-5,
                               "mlp_ratio": 2.66667 * 2, "dynamic_img_size": True, **SWIGLU}, 112),
    ("vit_base_patch16_224", {}, 224),
]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for arch, kw, px in CASES:
        t = timm.create_model(arch, pretrained=False, num_classes=0, **kw).eval()
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        m = VisionTransformer.from_arch(arch, **kw).eval()
        same_names = list(t.state_dict()) == list(m.state_dict())
        m.load_state_dict(t.state_dict(), strict=True)
        x = torch.randn(2, 3, px, px)
        with torch.no_grad():
            a, b = t(x), m(x)
        rows.append({"arch": arch, "kwargs": {k: str(v) for k, v in kw.items()}, "input_px": px,
                     "same_names": same_names, "shape": list(a.shape), "max_abs_diff": float((a - b).abs().max())})
    for name, spec in FOUNDATION_MODELS.items():
        if spec.loader != "timm":
            continue
        kw = {k: v for k, v in spec.model_kwargs.items() if k != "mlp_layer"}
        if spec.model_kwargs.get("mlp_layer") == "swiglu_packed":
            kw.update(SWIGLU)
        with torch.device("meta"):
            t = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kw)
            m = VisionTransformer.from_arch(spec.arch, **kw)
        ts = {k: tuple(v.shape) for k, v in t.state_dict().items()}
        ms = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        rows.append({"model": name, "arch": spec.arch, "same_state_dict_shapes": ts == ms,
                     "params_M": round(sum(v.numel() for v in t.state_dict().values()) / 1e6, 1)})
    print(json.dumps({"timm": timm.__version__, "torch": torch.__version__, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
