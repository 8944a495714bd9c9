"""The CUDA path end to end: train (mixed precision), embed, domains and predict on DLPFC and a 100k-spot slide.

    python benchmarks/gpu.py [--accelerator cuda] [--sizes 100000] [--out benchmarks/results/gpu.json]

Slides: the bundled DLPFC 151673 (3639 spots; ARI of the default domains against its manual layers is reported) and
DLPFC tiled to N spots as in benchmarks/speed.py. Every call uses the package defaults (precision "auto": bf16 or
fp16 autocast on CUDA). Each stage's wall time is measured around the histoclip call alone (CUDA synchronised), with
the peak GPU memory torch allocated. Prints one JSON object and writes it to --out. ``--accelerator cpu`` runs the
same script on the CPU (to check it before device time is spent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import histoclip as hc

HERE = Path(__file__).resolve().parent


def _sync(acc: str) -> None:
    if acc.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def run(adata, acc: str, label: str | None) -> dict:
    out: dict = {"n_obs": int(adata.n_obs)}
    if acc.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def stage(name, fn):
        _sync(acc)
        t = time.perf_counter()
        res = fn()
        _sync(acc)
        out[f"{name}_s"] = round(time.perf_counter() - t, 2)
        return res

    stage("extract", lambda: hc.pp.extract_patches(adata))
    model = stage("train", lambda: hc.tl.train(adata, accelerator=acc, rng=0))
    out["epochs"] = int(len(model.history))
    out["seconds_per_epoch"] = [round(float(s), 2) for s in model.history["seconds"]]
    out["device"] = str(model.device)
    out["precision"] = model.train_params.get("precision")
    stage("embed", lambda: hc.tl.embed(adata, model))
    stage("domains", lambda: hc.tl.domains(adata, n_domains=7, rng=0))
    stage("predict", lambda: hc.tl.predict_expression(adata, model))
    out["image_weight_mean"] = round(float(adata.obs["histoclip_image_weight"].mean()), 3)
    if label is not None:
        out["ari"] = round(float(hc.metrics.adjusted_rand(adata.obs[label], adata.obs["histoclip_domain"])), 3)
    if acc.startswith("cuda"):
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--accelerator", default="cuda")
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000])
    p.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    p.add_argument("--hd-depth", type=float, default=None, metavar="UMIS",
                   help="thin the tiled slides' counts to about UMIS per spot (Visium HD depth, e.g. 200)")
    p.add_argument("--skip-dlpfc", action="store_true", help="only the tiled slides")
    args = p.parse_args()
    hc.settings.progress = False
    if args.accelerator.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --accelerator cpu to check the script on the CPU.")
    result = {"torch": torch.__version__, "histoclip": hc.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "accelerator": args.accelerator, "runs": {}}
    t0 = time.perf_counter()
    if not args.skip_dlpfc:
        result["runs"]["dlpfc_151673"] = run(hc.datasets.dlpfc(), args.accelerator, "layer")
        print(json.dumps(result["runs"]["dlpfc_151673"]), flush=True)
    spec = importlib.util.spec_from_file_location("speed", HERE / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    import anndata as ad

    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiled.h5ad"
            speed.build_slide(n, path, umis_per_spot=args.hd_depth)
            adata = ad.read_h5ad(path)
            key = f"tiled_{n}" + (f"_hd{args.hd_depth:g}" if args.hd_depth else "")
            result["runs"][key] = run(adata, args.accelerator, None)
            print(json.dumps(result["runs"][key]), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
