"""Spatial-domain benchmark: ARI/NMI of histoclip and baselines on DLPFC sections, over seeds.

Usage: python benchmarks/domains.py [H5AD ...] [--label layer] [--n-domains K] [--seeds 0 1 2 3 4] [--epochs 30]
Default slides: ../shared/data/dlpfc/DLPFC_151673.h5ad and DLPFC_151674.h5ad (relative to the repository).
Metric: adjusted Rand index (and NMI) of the domains against obs[label], spots without a label ignored.
Prints one JSON record per slide, method and seed, writes benchmarks/results/domains.{json,md}, and a summary table.
All methods run in this process on the same slide; one set of defaults for every slide.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

import histoclip as hc
from histoclip.pp._graph import knn_graph
from histoclip.tl._domains import smooth_features

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT.parent / "shared" / "data" / "dlpfc" / f"DLPFC_{s}.h5ad" for s in ("151673", "151674")]


def baseline(adata: ad.AnnData, k: int, seed: int, smooth: bool) -> np.ndarray:
    """log-normalise -> HVG (seurat, 2000) -> PCA(30) -> GaussianMixture; optionally neighbour-averaged PCA."""
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat")
    x = PCA(30, random_state=seed).fit_transform(a[:, a.var["highly_variable"]].X.toarray())
    if smooth:
        x = smooth_features(x, knn_graph(np.asarray(adata.obsm["spatial"], float), 6), 1)
    return GaussianMixture(k, covariance_type="full", random_state=seed).fit_predict(x).astype(str)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("h5ad", nargs="*", default=[str(x) for x in DEFAULT])
    p.add_argument("--label", default="layer")
    p.add_argument("--n-domains", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "domains"))
    args = p.parse_args()
    hc.settings.progress = False
    records = []
    for path in args.h5ad:
        adata = ad.read_h5ad(path)
        if "gene_symbol" in adata.var:
            adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
            adata.var_names_make_unique()
        slide = Path(path).stem
        truth = adata.obs[args.label]
        k = args.n_domains or int(truth.dropna().nunique())
        for seed in args.seeds:
            def rec(method, labels, seconds):
                s = hc.metrics.domain_scores(truth, labels)
                r = {"slide": slide, "method": method, "seed": seed, "ari": s["ari"], "nmi": s["nmi"],
                     "wall_s": round(seconds, 2)}
                records.append(r)
                print(json.dumps(r), flush=True)

            t = time.perf_counter()
            hc.tl.domains(adata, n_domains=k, rng=seed)
            rec("histoclip default (Moran-gene PCA, smoothed, tied GMM)", adata.obs["histoclip_domain"],
                time.perf_counter() - t)
            t = time.perf_counter()
            a = adata.copy()
            hc.pp.extract_patches(a)
            model = hc.tl.train(a, max_epochs=args.epochs, rng=seed, patch_px=16)
            hc.tl.embed(a, model)
            t_train = time.perf_counter() - t
            for rep, name in (("X_histoclip", "histoclip joint"), ("X_histoclip_expression", "histoclip expression"),
                              ("X_histoclip_image", "histoclip image")):
                t = time.perf_counter()
                hc.tl.domains(a, n_domains=k, use_rep=rep, rng=seed)
                rec(name, a.obs["histoclip_domain"], t_train + time.perf_counter() - t)
            for smooth, name in ((False, "PCA30 + GMM (non-spatial)"), (True, "neighbour-averaged PCA30 + GMM")):
                t = time.perf_counter()
                rec(name, baseline(adata, k, seed, smooth), time.perf_counter() - t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    import pandas as pd

    df = pd.DataFrame(records)
    summary = df.groupby(["method", "slide"]).agg(ari_mean=("ari", "mean"), ari_std=("ari", "std"),
                                                  nmi_mean=("nmi", "mean"), wall_s=("wall_s", "mean")).round(3)
    table = summary.reset_index().pivot(index="method", columns="slide")
    print(table.to_string())
    lines = ["# Spatial domains on DLPFC", "",
             f"ARI and NMI against `obs['{args.label}']` (unlabelled spots ignored), {k} domains, seeds "
             f"{args.seeds}, mean and standard deviation over seeds; histoclip model trained {args.epochs} epochs "
             "(patch_px=16: the lowres image's 110 um patches are 9 px). Produced by `benchmarks/domains.py`; "
             "wall time is per slide and seed on a 2-core CPU.", "",
             "| method | slide | ARI mean | ARI std | NMI mean | wall s |", "|---|---|---|---|---|---|"]
    for (method, slide), row in summary.iterrows():
        lines.append(f"| {method} | {slide} | {row.ari_mean:.3f} | {row.ari_std:.3f} | {row.nmi_mean:.3f} | "
                     f"{row.wall_s:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
