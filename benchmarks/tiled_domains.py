"""Domains of a tiled slide against the untiled slide's: does the large-N path (sampling, one epoch) cost accuracy?

Usage: python benchmarks/tiled_domains.py [--tiles 1 3 5] [--seeds 0 1 2] [--section 151673] [--hd-depth UMIS]

DLPFC 151673 (bundled) is tiled k x k as in ``benchmarks/speed.py`` (lowres image tiled, coordinates offset per tile and
jittered by N(0, 2 px), counts repeated, or thinned per tile with ``--hd-depth``), with every tile keeping the manual
layers. For each k and seed, with package defaults and ``n_domains=7``: ``tl.train`` + ``tl.embed`` + ``tl.domains``
(the joint embedding) and ``tl.domains(use_rep="expression_pca")`` (model-free) on the same object. Above 50 000 spots
histoclip fits gene ranking, PCA and the mixture on a sample and trains ``default_max_epochs(N)`` epochs (1 from
~80k spots), so the tiled rows measure what that costs. Metric: adjusted Rand index against the layers over all
labelled spots (every tile). Writes ``results/tiled_domains.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import thin  # noqa: E402

import histoclip as hc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def tiled(section: str, k: int, seed: int = 0, umis: float | None = None) -> ad.AnnData:
    """Section ``section`` tiled ``k x k`` with its layers (k = 1: the slide itself)."""
    a = hc.datasets.dlpfc(section)
    if k == 1 and umis is None:
        return a
    lib = next(iter(a.uns["spatial"]))
    entry = a.uns["spatial"][lib]
    img = entry["images"]["lowres"]
    scalef = entry["scalefactors"]["tissue_lowres_scalef"]
    h, w = img.shape[:2]
    gen = np.random.default_rng(seed)
    coords, blocks = [], []
    x = sp.csr_matrix(a.X)
    for ty in range(k):
        for tx in range(k):
            xy = a.obsm["spatial"].astype(np.float64) + np.array([tx * w / scalef, ty * h / scalef])
            coords.append(xy + gen.normal(0, 2.0, size=xy.shape))
            blocks.append(thin(x, umis, gen) if umis else x)
    out = ad.AnnData(X=sp.vstack(blocks).tocsr(), var=a.var.copy())
    out.obs_names = [f"t{t}_{b}" for t in range(k * k) for b in a.obs_names]
    out.obs["layer"] = np.tile(a.obs["layer"].astype(object).to_numpy(), k * k)
    out.obsm["spatial"] = np.concatenate(coords)
    out.uns["spatial"] = {lib: {"images": {"lowres": np.tile(img, (k, k, 1))},
                                "scalefactors": dict(entry["scalefactors"]),
                                "metadata": dict(entry.get("metadata", {}))}}
    return out


def ari(adata: ad.AnnData) -> float:
    lab = adata.obs["layer"]
    ok = lab.notna().to_numpy()
    return float(adjusted_rand_score(lab[ok].astype(str), adata.obs["histoclip_domain"][ok].astype(str)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--section", default="151673")
    ap.add_argument("--hd-depth", type=float, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "tiled_domains")
    args = ap.parse_args()
    hc.settings.progress = False
    records = []
    for k in args.tiles:
        for seed in args.seeds:
            a = tiled(args.section, k, umis=args.hd_depth)
            hc.pp.extract_patches(a)
            t = time.perf_counter()
            hc.tl.domains(a, n_domains=7, rng=seed, use_rep="expression_pca")
            rec = {"tiles": k, "n_obs": a.n_obs, "seed": seed, "model_free": ari(a),
                   "model_free_seconds": time.perf_counter() - t}
            t = time.perf_counter()
            model = hc.tl.train(a, rng=seed)
            hc.tl.embed(a, model)
            hc.tl.domains(a, n_domains=7, rng=seed)
            rec.update({"joint": ari(a), "joint_seconds": time.perf_counter() - t,
                        "epochs": int(model.train_params["epochs_completed"])})
            print(json.dumps(rec), flush=True)
            records.append(rec)
    summary = {}
    for k in args.tiles:
        rows = [r for r in records if r["tiles"] == k]
        summary[str(k)] = {"n_obs": rows[0]["n_obs"], "epochs": rows[0]["epochs"],
                           **{f"{m}_{s}": float(getattr(np, s)([r[m] for r in rows])) for m in ("model_free", "joint")
                              for s in ("mean", "std")}}
    result = {"what": "ARI against the layers of DLPFC tiled k x k, defaults, n_domains=7",
              "section": args.section, "hd_depth": args.hd_depth, "seeds": args.seeds, "summary": summary,
              "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| tiles | spots | epochs | model-free ARI | joint ARI |", "|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} x {k} | {s['n_obs']:,} | {s['epochs']} | {s['model_free_mean']:.3f} +- "
                     f"{s['model_free_std']:.3f} | {s['joint_mean']:.3f} +- {s['joint_std']:.3f} |")
    lines.append(f"\nDLPFC {args.section}" + (f", counts thinned to ~{args.hd_depth:g} UMIs per spot" if args.hd_depth
                                                else ", full depth") + f"; seeds {args.seeds}; mean +- sd over seeds.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
