"""Domains on DLPFC re-binned onto a square grid of Visium HD-sized bins: does the smoothing reach its microns?

Usage: python benchmarks/hd_rebinned.py [--bin-um 16] [--umis 800] [--seed 0]

DLPFC 151673 (bundled) is cut into square bins of ``--bin-um`` microns over its spots (bins whose centre lies within
55 um of a spot centre); each bin takes the counts of the Visium spot it lies in, binomially thinned to about
``--umis`` UMIs (drawn anew per bin), and that spot's layer. This keeps the slide's real expression and layers with
HD geometry and depth; it is optimistic (every bin of a spot shares one expression profile). ``tl.domains``
(model-free, ``n_domains=7``) runs with its default smoothing (``n_hops=None``: hops that spread over ``radius_um``
despite the 24-neighbour cap) and with two rounds (``n_hops=2``, the Visium setting). Metric: ARI against the layers.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

import histoclip as hc


def rebinned(bin_um: float, umis: float, seed: int = 0) -> ad.AnnData:
    a = hc.datasets.dlpfc("151673")
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    um_px = 65.0 / sf["spot_diameter_fullres"]
    xy = a.obsm["spatial"] * um_px
    lo, hi = xy.min(axis=0) - 50, xy.max(axis=0) + 50
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0], bin_um), np.arange(lo[1], hi[1], bin_um))
    grid = np.c_[gx.ravel(), gy.ravel()]
    dist, nn = NearestNeighbors(n_neighbors=1).fit(xy).kneighbors(grid)
    keep = dist[:, 0] <= 55
    grid, nn = grid[keep], nn[keep, 0]
    x = sp.csr_matrix(a.X)[nn].astype(np.float32)
    p = np.minimum(1.0, umis / np.asarray(x.sum(axis=1)).ravel())
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = np.random.default_rng(seed).binomial(x.data.astype(np.int64), p[rows]).astype(np.float32)
    x.eliminate_zeros()
    out = ad.AnnData(x, var=a.var.copy())
    out.obs_names = [f"bin{i}" for i in range(out.n_obs)]
    out.obs["layer"] = a.obs["layer"].to_numpy()[nn]
    out.obsm["spatial"] = grid / um_px
    out.uns["spatial"] = {lib: {"images": a.uns["spatial"][lib]["images"],
                                "scalefactors": {**sf, "spot_diameter_fullres": bin_um / um_px},
                                "metadata": {"spot_diameter_um": bin_um}}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-um", type=float, default=16.0)
    ap.add_argument("--umis", type=float, default=800.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hc.settings.progress = False
    b = rebinned(args.bin_um, args.umis, args.seed)
    y = b.obs["layer"]
    ok = y.notna().to_numpy()
    for name, kw in (("default", {}), ("two hops", {"n_hops": 2})):
        c = b.copy()
        t = time.perf_counter()
        hc.tl.domains(c, n_domains=7, rng=args.seed, **kw)
        print(json.dumps({"bin_um": args.bin_um, "umis": args.umis, "n_bins": int(b.n_obs), "run": name,
                          "n_hops": c.uns["histoclip"]["params"]["domains"]["n_hops"],
                          "ari": adjusted_rand_score(y[ok].astype(str), c.obs["histoclip_domain"][ok].astype(str)),
                          "seconds": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
