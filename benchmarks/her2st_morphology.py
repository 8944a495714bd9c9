"""Where morphology drives the domains: image weights and domains on HER2ST sections with full-resolution H&E.

    python benchmarks/her2st_morphology.py [--sections B4 C3] [--seeds 0 1 2] [--n-domains 5]

Each section (legacy ST: 100 um spots on a 200 um grid) is read from ../shared/data/her2st/ with its full-resolution
JPEG (~0.69 um/px), patches of 200 um are cut from it (32 px), and a model is trained on that section alone with
every default; then domains are found three ways with the same clustering: on the joint embedding, on the expression
latent alone, and model-free (Moran-gene expression PCA, tl.domains' default). There are no pathologist labels for these
sections here, so nothing is scored against a truth: the script reports the fusion's image weight (mean, spread and
per joint domain), how far the joint domains depart from the expression-only ones (ARI between the labellings), and
the ARI of each labelling with the authors' expression clusters (obs["cluster_label"], not a pathology annotation).
It writes benchmarks/results/her2st_morphology.{json,md} and a figure per section (H&E, image weight, joint domains,
expression-only domains), benchmarks/results/her2st_morphology_<section>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import histoclip as hc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "her2st"
RESULTS = ROOT / "benchmarks" / "results"


def load(section: str) -> ad.AnnData:
    a = ad.read_h5ad(DATA / f"HER2ST_{section}.h5ad")
    lib = next(iter(a.uns["spatial"]))
    hc.io.set_fullres_image(a, DATA / a.uns["spatial"][lib]["metadata"]["fullres_image"])
    return a


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=["B4", "C3"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-domains", type=int, default=5)
    args = p.parse_args()
    hc.settings.progress = False
    records = []
    for section in args.sections:
        base = load(section)
        hc.pp.extract_patches(base, img_key="fullres", spot_diameter_um=100)
        for seed in args.seeds:
            a = base.copy()
            t = time.perf_counter()
            model = hc.tl.train(a, rng=seed)
            hc.tl.embed(a, model)
            hc.tl.domains(a, n_domains=args.n_domains, use_rep="X_histoclip", rng=seed)
            wall = time.perf_counter() - t
            joint = a.obs["histoclip_domain"].copy()
            hc.tl.domains(a, n_domains=args.n_domains, use_rep="X_histoclip_expression", rng=seed,
                          key_added="domain_expression")
            hc.tl.domains(a, n_domains=args.n_domains, use_rep="expression_pca", rng=seed, key_added="domain_pca")
            w = a.obs["histoclip_image_weight"].to_numpy()
            cl = a.obs["cluster_label"].astype(str)
            r = {"section": section, "seed": seed, "n_spots": int(a.n_obs), "wall_s": round(wall, 1),
                 "loadavg_1min": round(os.getloadavg()[0], 2),
                 "image_weight_mean": round(float(w.mean()), 3),
                 "image_weight_p10_p90": [round(float(q), 3) for q in np.percentile(w, [10, 90])],
                 "image_weight_by_joint_domain": {d: round(float(w[joint.to_numpy() == d].mean()), 3)
                                                  for d in joint.cat.categories},
                 "ari_joint_vs_expression_latent": round(
                     hc.metrics.adjusted_rand(joint, a.obs["domain_expression"]), 3),
                 "ari_joint_vs_model_free": round(hc.metrics.adjusted_rand(joint, a.obs["domain_pca"]), 3),
                 "ari_with_author_clusters": {
                     "joint": round(hc.metrics.adjusted_rand(cl, joint), 3),
                     "expression_latent": round(hc.metrics.adjusted_rand(cl, a.obs["domain_expression"]), 3),
                     "model_free": round(hc.metrics.adjusted_rand(cl, a.obs["domain_pca"]), 3)}}
            records.append(r)
            print(json.dumps(r), flush=True)
            if seed == args.seeds[0]:
                fig, axes = plt.subplots(1, 4, figsize=(22, 5.5))
                hc.pl.domains(a, color="histoclip_domain", ax=axes[0], alpha=0.0, legend=False,
                              title=f"H&E ({section})")
                hc.pl.image_weight(a, ax=axes[1], title="weight of the image in the joint embedding")
                hc.pl.domains(a, ax=axes[2], title="domains: joint embedding")
                hc.pl.domains(a, color="domain_expression", ax=axes[3], title="domains: expression latent alone")
                fig.tight_layout()
                fig.savefig(RESULTS / f"her2st_morphology_{section}.png", dpi=90)
                plt.close(fig)
    (RESULTS / "her2st_morphology.json").write_text(json.dumps(records, indent=1))
    lines = ["# Image weights and domains on HER2ST (full-resolution H&E)", "",
             "Model trained on each section alone with every default, patches of 200 um from the full-resolution JPEG; "
             f"{args.n_domains} domains; seeds {args.seeds}. No pathologist labels here: ARIs compare labellings with "
             "each other and with the authors' expression clusters. Produced by `benchmarks/her2st_morphology.py`.", "",
             "| section | seed | image weight mean (p10-p90) | ARI joint vs expression-only | "
             "ARI joint vs model-free | ARI with author clusters: joint / expression / model-free |",
             "|---|---|---|---|---|---|"]
    for r in records:
        c = r["ari_with_author_clusters"]
        lo, hi = r["image_weight_p10_p90"]
        lines.append(f"| {r['section']} | {r['seed']} | {r['image_weight_mean']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['ari_joint_vs_expression_latent']:.2f} | "
                     f"{r['ari_joint_vs_model_free']:.2f} | {c['joint']:.2f} / {c['expression_latent']:.2f} / "
                     f"{c['model_free']:.2f} |")
    (RESULTS / "her2st_morphology.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
