"""Feature-extraction throughput of ViT image encoders on this machine (patches per second), printed as JSON.

What is timed: histoclip's frozen encoder (uint8 patches in, features out: scaling, normalisation, the ViT forward,
pooling) on random uint8 patches of 224 px, in float32 on CPU (bfloat16 autocast on CUDA), after one warm-up batch;
the median of ``--repeats`` timed batches. The ViTs are histoclip's own (:class:`histoclip.module.VisionTransformer`,
timm's layout) at random initialisation: speed does not depend on the weights. ViT-L/16 is built with UNI's
settings (``histoclip.module.FOUNDATION_MODELS["uni"]``), ViT-B/16 as timm's ``vit_base_patch16_224``.
Optionally (``--her2st``) ``hc.tl.image_features`` on HER2ST section C2 (its full-resolution JPEG, patches read and
resized as in use) with ViT-B, to show the cost of reading patches next to the forward pass.
The 1-minute load average before and after is recorded: other work on the machine slows every figure.

    python benchmarks/foundation_throughput.py [--threads 1 2] [--batch 16] [--repeats 3] [--her2st DATA_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from histoclip.module import FOUNDATION_MODELS, VisionTransformer
from histoclip.module._foundation import Encoder, FrozenEncoder

MODELS = {
    "ViT-B/16 (vit_base_patch16_224)": ("vit_base_patch16_224", {}),
    "ViT-L/16, UNI settings (vit_large_patch16_224)": ("vit_large_patch16_224", FOUNDATION_MODELS["uni"].model_kwargs),
}


def time_forward(arch: str, kwargs: dict, threads: int, batch: int, repeats: int, device: torch.device) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = VisionTransformer.from_arch(arch, **kwargs)
    enc = FrozenEncoder(Encoder(net, arch, "random init", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).to(device)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    amp = device.type == "cuda"

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = enc(x)
        if amp:
            torch.cuda.synchronize()
        return y

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n_params = sum(p.numel() for p in net.parameters())
    return {"threads": threads, "batch": batch, "seconds_per_batch": [round(t, 3) for t in times],
            "patches_per_s": round(batch / med, 2), "params_M": round(n_params / 1e6, 1)}



def time_her2st(data_dir: Path, threads: int) -> dict:
    """``data_dir``: the shared HER2ST folder (``HER2ST_C2.h5ad`` and ``images/C2_5714_HE_BT_C2.jpg``)."""
    import tempfile

    import anndata as ad
    from safetensors.torch import save_file

    import histoclip as hc

    hc.settings.n_jobs = threads
    hc.settings.progress = False
    a = ad.read_h5ad(data_dir / "HER2ST_C2.h5ad")
    hc.io.set_fullres_image(a, data_dir / str(a.uns["spatial"]["C2"]["metadata"]["fullres_image"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vit_b.safetensors"
        save_file(VisionTransformer.from_arch("vit_base_patch16_224").state_dict(), str(path))
        # untimed: decodes the full-resolution JPEG once into histoclip's memory-mapped cache
        hc.tl.image_features(a[:2].copy(), backbone="vit_base_patch16_224", weights=path, mean=(0.5,) * 3,
                             std=(0.5,) * 3, mpp=0.5, img_key="fullres", accelerator="cpu")
        t0 = time.perf_counter()
        hc.tl.image_features(a, backbone="vit_base_patch16_224", weights=path, mean=(0.5,) * 3, std=(0.5,) * 3,
                             mpp=0.5, img_key="fullres", accelerator="cpu", batch_size=32)
        dt = time.perf_counter() - t0
    return {"section": "C2", "spots": a.n_obs, "threads": threads, "seconds": round(dt, 1),
            "patches_per_s": round(a.n_obs / dt, 2), "what": "hc.tl.image_features, ViT-B/16, 112 um at 224 px "
            "(0.5 um/px) from the full-resolution JPEG (0.69 um/px), batch 32, tta off"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--her2st", type=Path, default=None, help="the shared HER2ST folder (HER2ST_C2.h5ad, images/)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if args.accelerator == "cuda" else "cpu")
    load0 = os.getloadavg()[0]
    rows = []
    for label, (arch, kwargs) in MODELS.items():
        for t in args.threads:
            r = time_forward(arch, kwargs, t, args.batch, args.repeats, device)
            rows.append({"model": label, "device": device.type, **r})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "what": "frozen ViT forward (uint8 -> features), 224 px, fp32 on CPU / bf16 autocast on CUDA, median batch",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()},
        "load_average_1min": {"before": round(load0, 2), "after": round(os.getloadavg()[0], 2)},
        "forward": rows,
    }
    if args.her2st is not None:
        result["image_features_her2st"] = time_her2st(args.her2st, max(args.threads))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
