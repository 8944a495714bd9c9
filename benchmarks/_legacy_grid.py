"""A legacy-ST-geometry copy of a Visium slide: its spots aggregated onto a square grid 200 um apart.

Legacy ST arrays hold 100 um spots on a square grid 200 um apart (centre to centre); Visium's 55 um spots lie on a
hexagonal grid 100 um apart. ``legacy_grid`` sums the counts of the Visium spots in each 200 um x 200 um cell centred
on a grid point, keeps one grid spot per cell holding at least one Visium spot, labels it by the majority label of its
spots, and keeps the image, with scale factors that say what a legacy ST reader gives: ``spot_diameter_fullres`` the
pixels of a 100 um spot, and nothing else about the platform (no ``metadata["spot_diameter_um"]``).

Usage from a benchmark (run from the repository root, or with ``benchmarks/`` on ``sys.path``)::

    from _legacy_grid import legacy_grid

    st = legacy_grid(anndata.read_h5ad("../shared/data/dlpfc/DLPFC_151673.h5ad"), label_key="layer")

``python benchmarks/_legacy_grid.py H5AD [OUT.h5ad]`` writes the copy and prints its size.
"""

from __future__ import annotations

import copy
import sys

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def fullres_um_per_px(adata: ad.AnnData, library_id: str | None = None) -> float:
    """Microns per full-resolution pixel of a slide, as histoclip reads them (the platform inferred when needed)."""
    from histoclip.io._slide import _fullres_scale

    spatial = adata.uns["spatial"]
    lib = library_id if library_id is not None else next(iter(spatial))
    entry = spatial[lib]
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    return _fullres_scale(dict(entry.get("scalefactors", {})), dict(entry.get("metadata", {}) or {}), None, lib,
                          xy)[0]


def legacy_grid(
    adata: ad.AnnData,
    *,
    spacing_um: float = 200.0,
    spot_diameter_um: float = 100.0,
    label_key: str | None = "layer",
    um_per_px: float | None = None,
    library_id: str | None = None,
    layer: str | None = None,
) -> ad.AnnData:
    """Aggregate ``adata``'s spots onto a square grid ``spacing_um`` apart (legacy ST geometry).

    Parameters
    ----------
    adata
        One section: raw counts in ``X`` (or ``layer``), ``obsm["spatial"]`` in full-resolution pixels,
        ``uns["spatial"][library_id]`` with its scale factors (and images, which are kept).
    spacing_um
        Grid spacing (and cell side) in microns.
    spot_diameter_um
        Diameter of the new spots, written as ``scalefactors["spot_diameter_fullres"]`` in full-resolution pixels.
    label_key
        ``obs`` column to carry over by majority (labelled spots only; a cell without labelled spots gets NaN).
    um_per_px
        Microns per full-resolution pixel (default: as histoclip reads the slide).
    library_id
        The library of ``uns["spatial"]`` (default: the only one).
    layer
        Layer with the counts (default ``X``).

    Returns
    -------
    A new AnnData: summed counts (float32 CSR), ``obsm["spatial"]`` the grid points in full-resolution pixels,
    ``obs["n_spots"]`` (Visium spots summed), ``obs["array_x"]``/``obs["array_y"]`` (grid indices), ``obs[label_key]``
    (majority), and ``uns["spatial"]`` with the images and ``spot_diameter_fullres`` of a ``spot_diameter_um`` spot.
    """
    spatial = adata.uns["spatial"]
    lib = library_id if library_id is not None else next(iter(spatial))
    um = float(um_per_px) if um_per_px is not None else fullres_um_per_px(adata, lib)
    step = spacing_um / um  # grid spacing in full-resolution pixels
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    origin = xy.min(axis=0)
    cell = np.round((xy - origin) / step).astype(np.int64)  # the grid point whose cell holds each spot
    keys, inverse = np.unique(cell, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n = len(keys)
    member = sp.csr_matrix((np.ones(adata.n_obs, dtype=np.float32), (inverse, np.arange(adata.n_obs))),
                           shape=(n, adata.n_obs))
    x = adata.layers[layer] if layer is not None else adata.X
    counts = sp.csr_matrix(member @ sp.csr_matrix(x, dtype=np.float32), dtype=np.float32)
    names = [f"{i}x{j}" for i, j in keys]
    obs = pd.DataFrame({"array_x": keys[:, 0], "array_y": keys[:, 1],
                        "n_spots": np.bincount(inverse, minlength=n)}, index=pd.Index(names))
    if label_key is not None and label_key in adata.obs:
        lab = pd.DataFrame({"cell": inverse, "label": adata.obs[label_key].astype(object).to_numpy()}).dropna()
        major = lab.groupby("cell")["label"].agg(lambda v: v.value_counts().index[0])
        col = pd.Series([major.get(i, np.nan) for i in range(n)], index=obs.index, dtype=object)
        obs[label_key] = pd.Categorical(col, categories=sorted(lab["label"].unique()))
    out = ad.AnnData(counts, obs=obs, var=adata.var[[]].copy())
    out.obsm["spatial"] = origin + keys.astype(np.float64) * step
    entry = copy.deepcopy(dict(spatial[lib]))
    sf = dict(entry.get("scalefactors", {}))
    sf["spot_diameter_fullres"] = spot_diameter_um / um
    sf.pop("fiducial_diameter_fullres", None)
    meta = {k: v for k, v in dict(entry.get("metadata", {}) or {}).items() if k != "spot_diameter_um"}
    meta["source"] = (f"{meta.get('source', lib)}; aggregated onto a {spacing_um:g} um square grid "
                      "(benchmarks/_legacy_grid.py)")
    out.uns["spatial"] = {f"{lib}_grid": {"images": entry.get("images", {}), "scalefactors": sf, "metadata": meta}}
    return out


if __name__ == "__main__":
    src = ad.read_h5ad(sys.argv[1])
    st = legacy_grid(src)
    print(f"{src.n_obs} spots -> {st.n_obs} grid spots, {np.median(st.obs['n_spots']):.0f} per grid spot (median)")
    if len(sys.argv) > 2:
        st.write_h5ad(sys.argv[2])
