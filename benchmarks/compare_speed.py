"""Side-by-side wall time on DLPFC 151673 (3639 spots): histoclip's domain pipeline, a MicNet-like histoclip
configuration (ResNet-18 trained end to end on 224 px patches), and GraphST.

Measured in one run, on CPU. Full runs of the slow configurations do not fit a CPU budget, so:

* histoclip domains (``hc.tl.domains`` defaults: Moran's I genes, PCA 10, two rounds of averaging over 150 um,
  tied GMM; no trained model needed), timed in full, with its ARI against the manual layers.
* histoclip's contrastive model (defaults: small CNN, automatic patch_px = 16 px here, 2000 Moran genes with
  spatial context, ``default_max_epochs(3639)`` = 30 epochs): ``--epochs`` epochs are trained and timed (default
  30; with fewer, the per-epoch time is extrapolated and the row says so); extraction and embedding are timed in
  full.
* MicNet-like (image_backbone="resnet18", patch_px=224, 30 epochs): one epoch on a random subset of
  ``--micnet-spots`` spots is timed, and training (3639 spots x 30 epochs) and embedding are extrapolated from
  the measured spots per second: stated in the row.
* GraphST 1.1.1 (needs its own venv, /work/venv-graphst, with GraphST 1.1.1 and pymclustr, so it never touches
  histoclip's): run with ``--graphst`` (default off: ~400-800 s), clustered by GraphST's own DLPFC recipe (PCA 20,
  mclust EEE, 50-neighbour refinement; mclust through pymclustr instead of R, plus scikit-misc for its
  gene selection); otherwise the row cites the ~400 s per slide measured on this machine kind in /work/shared/STACK.md
  (GraphST + pymclustr EEE + refinement).

    python benchmarks/compare_speed.py [--epochs 30] [--micnet-spots 128] [--graphst] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GRAPHST_PY = Path("/work/venv-graphst/bin/python")

_GRAPHST_SCRIPT = r"""
import sys, time
import anndata as ad, numpy as np, torch
from GraphST import GraphST
from GraphST.utils import refine_label
from mclust_py import Mclust
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
adata = ad.read_h5ad(sys.argv[1])
adata.var_names_make_unique()
t = time.perf_counter()
model = GraphST.GraphST(adata, device=torch.device("cpu"), random_seed=0)
adata = model.train()
t_train = time.perf_counter() - t
# GraphST's own DLPFC recipe (GraphST.utils.clustering): PCA 20 of the embedding, mclust EEE with 7 clusters,
# then the 50-neighbour label refinement; mclust through pymclustr (pure Python) instead of R
adata.obsm["emb_pca"] = PCA(20, random_state=42).fit_transform(adata.obsm["emb"])
adata.obs["domain"] = np.asarray(Mclust(adata.obsm["emb_pca"], G=7, model_names=["EEE"]).classification).astype(str)
adata.obs["domain"] = np.asarray(refine_label(adata, 50, key="domain")).astype(str)
seconds = time.perf_counter() - t
ok = adata.obs["layer"].notna().to_numpy()
truth = adata.obs["layer"].astype(str).to_numpy()[ok]
print(t_train, seconds, adjusted_rand_score(truth, adata.obs["domain"].to_numpy()[ok]))
"""


def histoclip_default(adata, epochs: int) -> list[dict]:
    """Two rows: the domain pipeline (its defaults need no trained model) and the contrastive model (train + embed)."""
    import histoclip as hc
    from histoclip.metrics import adjusted_rand

    ok = adata.obs["layer"].notna()
    t = time.perf_counter()
    hc.tl.domains(adata)
    t_domains = time.perf_counter() - t
    ari = float(adjusted_rand(adata.obs["layer"][ok], adata.obs["histoclip_domain"][ok]))
    t = time.perf_counter()
    hc.pp.extract_patches(adata)
    t_extract = time.perf_counter() - t
    t = time.perf_counter()
    model = hc.tl.train(adata, max_epochs=epochs, accelerator="cpu", rng=0)
    t_train = time.perf_counter() - t
    per_epoch = float(model.history["seconds"].mean())
    default = hc.model.default_max_epochs(adata.n_obs)
    t_train_default = t_train + (default - epochs) * per_epoch
    t = time.perf_counter()
    hc.tl.embed(adata, model)
    t_embed = time.perf_counter() - t
    hc.tl.domains(adata, use_rep="X_histoclip", key_added="joint_domain")
    ari_joint = float(adjusted_rand(adata.obs["layer"][ok], adata.obs["joint_domain"][ok]))
    return [
        {"method": "histoclip domains (defaults: Moran genes, PCA 10, 2 rounds of 150 um smoothing, tied GMM)",
         "seconds": t_domains, "measured": "run here", "ari_vs_manual_layers": ari},
        {"method": f"histoclip contrastive model (defaults: small CNN, {model.init_params['patch_px']} px, {default} "
                   "epochs): extract, train, embed",
         "seconds": t_extract + t_train_default + t_embed,
         "parts": {"extract": t_extract, "train": t_train_default, "seconds_per_epoch": per_epoch, "embed": t_embed},
         "measured": f"{epochs} epochs measured"
                     + ("" if epochs == default else f", training extrapolated to {default}"),
         "ari_vs_manual_layers": ari_joint if epochs == default else None,
         "ari_note": "tl.domains(use_rep='X_histoclip') on the joint embedding (not smoothed again)"},
    ]


def micnet_like(adata, n_spots: int) -> dict:
    import numpy as np

    import histoclip as hc

    hc.pp.extract_patches(adata)
    sub = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, n_spots, replace=False))].copy()
    model = hc.model.HistoCLIP(sub, image_backbone="resnet18", patch_px=224)
    model.train(1, accelerator="cpu", rng=0)
    per_epoch = float(model.history["seconds"].iloc[-1])
    train_rate = n_spots / per_epoch
    t = time.perf_counter()
    model.get_latent_representation(sub[:256].copy(), modality="image")
    embed_rate = 256 / (time.perf_counter() - t)
    train_30 = 30 * adata.n_obs / train_rate
    embed = adata.n_obs / embed_rate
    return {
        "method": "MicNet-like histoclip (ResNet-18 end to end, 224 px, 30 epochs)",
        "seconds": train_30 + embed,
        "parts": {"train_spots_per_second": train_rate, "embed_spots_per_second": embed_rate,
                  "train_30_epochs": train_30, "embed": embed},
        "measured": f"EXTRAPOLATED: one epoch on {n_spots} random spots and embedding of 256 spots measured, scaled "
                    f"to {adata.n_obs} spots x 30 epochs; domains/extract (seconds) not included",
    }


def graphst(run: bool, h5ad: Path) -> dict:
    row = {"method": "GraphST 1.1.1 (+ clustering)", "seconds": 400.0,
           "measured": "CITED, not run here: ~400 s per slide measured on this machine kind "
                       "(/work/shared/STACK.md, GraphST + pymclustr EEE + refinement)"}
    if not run:
        return row
    if not GRAPHST_PY.exists():
        row["measured"] += "; /work/venv-graphst does not exist"
        return row
    t = time.perf_counter()
    proc = subprocess.run([str(GRAPHST_PY), "-c", _GRAPHST_SCRIPT, str(h5ad)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode == 0:
        t_train, seconds, ari = (float(v) for v in proc.stdout.split()[-3:])
        return {"method": "GraphST 1.1.1 (its DLPFC recipe: PCA 20, mclust EEE via pymclustr, 50-neighbour refinement)",
                "seconds": seconds, "parts": {"train": t_train, "process_seconds": time.perf_counter() - t},
                "measured": "run here (its own venv)", "ari_vs_manual_layers": ari}
    row["measured"] += f"; running it failed: {proc.stderr.strip().splitlines()[-1:]}"
    return row


def markdown(result: dict) -> str:
    """The side-by-side table of docs/performance.md, from compare_speed.json."""
    lines = ["| method | wall time (s) | ARI vs manual layers | how |", "|---|---|---|---|"]
    for r in result["rows"]:
        ari = r.get("ari_vs_manual_layers")
        ari_txt = "" if ari is None else f"{ari:.3f}"
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {ari_txt} | {r['measured']} |")
    return (f"{result['slide']}; {result['machine']}; {result['threads']} torch thread(s).\n\n" + "\n".join(lines)
            + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--micnet-spots", type=int, default=128)
    ap.add_argument("--graphst", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    import tempfile

    import torch

    import histoclip as hc

    torch.set_num_threads(args.threads)
    hc.settings.progress = False
    rows = [*histoclip_default(hc.datasets.dlpfc(), args.epochs), micnet_like(hc.datasets.dlpfc(), args.micnet_spots)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dlpfc.h5ad"
        a = hc.datasets.dlpfc()
        a.obs = a.obs[["in_tissue", "array_row", "array_col", "layer"]]
        a.write_h5ad(path)
        rows.append(graphst(args.graphst, path))
    result = {"slide": "DLPFC 151673 (3639 spots, 5000 genes, lowres image)",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average before the run "
                         f"{load_before:.2f}",
              "threads": args.threads, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare_speed.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "compare_speed.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['method']:70s} {r['seconds']:8.0f} s  ({r['measured']})", file=sys.stderr)


if __name__ == "__main__":
    main()
