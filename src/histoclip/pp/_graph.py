"""Sparse spatial k-nearest-neighbour graphs (never dense N x N)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from .._utils import check_coordinates_spread, write_results
from ..io._slide import check_spatial

if TYPE_CHECKING:
    from anndata import AnnData


#: most neighbours a spot keeps in the radius and Gaussian graphs (memory n x 24, never n x n)
MAX_NEIGHBORS = 24


def knn_graph(coords: np.ndarray, n_neighbors: int = 6, groups: np.ndarray | None = None) -> sp.csr_matrix:
    """Binary, symmetric k-NN graph of ``coords`` (no self loops), built separately within each group.

    Memory and time grow with ``n * n_neighbors`` (KD-tree queries), never with ``n ** 2``. Spots of one group all
    at one point are an error.
    """
    check_coordinates_spread(coords, groups)
    n = coords.shape[0]
    if groups is None:
        groups = np.zeros(n, dtype=int)
    rows, cols = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        k = min(n_neighbors, idx.size - 1)
        if k < 1:
            continue
        nn = NearestNeighbors(n_neighbors=k + 1).fit(coords[idx])
        _, nbr = nn.kneighbors(coords[idx])
        rows.append(np.repeat(idx, k))
        cols.append(idx[nbr[:, 1:]].ravel())
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    r, c = np.concatenate(rows), np.concatenate(cols)
    a = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(n, n))
    a = a.maximum(a.T).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def radius_graph(
    coords_um: np.ndarray,
    radius_um: float,
    groups: np.ndarray | None = None,
    *,
    max_neighbors: int = MAX_NEIGHBORS,
) -> sp.csr_matrix:
    """Binary, symmetric sparse graph of the spots within ``radius_um`` microns of each other.

    At most ``max_neighbors`` of the nearest per spot; never across two groups (libraries); no self loops.
    """
    g = gaussian_graph(coords_um, radius_um / 3.0, groups, max_neighbors=max_neighbors)
    g.data[:] = 1.0
    return g


def physical_hops(graph: sp.spmatrix, coords_um: np.ndarray, radius_um: float, n_hops: int,
                  *, max_neighbors: int = MAX_NEIGHBORS, max_hops: int = 128) -> int:
    """Rounds of averaging on ``graph`` (a :func:`radius_graph`) that spread as far as ``n_hops`` within ``radius_um``.

    Where the graph holds every spot within ``radius_um`` (Visium, legacy ST) this is ``n_hops``. Where the
    ``max_neighbors`` cap cuts it short (Visium HD bins: 24 neighbours of an 8 um bin lie within ~23 um), averaging
    ``n_hops`` times would smooth over a few cells instead of the ``radius_um`` asked for. The hops are then raised
    so that the spread (the mean squared distance a spot's average reaches, which adds up over hops) equals that of
    ``n_hops`` averages over a full disc of ``radius_um`` (``radius_um ** 2 / 2`` each): about 88 hops for 8 um bins
    and 22 for 16 um bins at 150 um, at most ``max_hops``.
    """
    g = sp.csr_matrix(graph)
    deg = np.diff(g.indptr)
    if n_hops <= 0 or g.nnz == 0 or np.median(deg) < max_neighbors:
        return int(n_hops)
    rows = np.repeat(np.arange(g.shape[0]), deg)
    d2 = ((coords_um[rows] - coords_um[g.indices]) ** 2).sum(axis=1)
    spread = np.bincount(rows, weights=d2, minlength=g.shape[0]) / (deg + 1)  # self + neighbours, equal weights
    per_hop = float(np.median(spread[deg > 0]))
    if per_hop <= 0:
        return int(n_hops)
    target = n_hops * radius_um**2 / 2.0
    return int(min(max_hops, max(n_hops, np.ceil(target / per_hop))))


def gaussian_graph(
    coords_um: np.ndarray,
    sigma_um: float = 100.0,
    groups: np.ndarray | None = None,
    *,
    max_neighbors: int = MAX_NEIGHBORS,
) -> sp.csr_matrix:
    """Symmetric sparse graph of spots within ``3 * sigma_um`` microns, weighted ``exp(-d^2 / (2 sigma^2))``.

    Distances are physical, so one setting means the same neighbourhood on Visium (100 um spacing: the first ring
    weighs 0.61 at ``sigma_um=100``), legacy ST (200 um spacing: 0.14) and Visium HD bins. At most
    ``max_neighbors`` nearest spots per spot are kept (memory ``n * max_neighbors``, never ``n ** 2``); graphs never
    link two groups (libraries). No self loops.
    """
    if not np.isfinite(sigma_um) or sigma_um <= 0:
        raise ValueError(f"The neighbourhood scale must be a positive number of microns, got {sigma_um!r}.")
    check_coordinates_spread(coords_um, groups)
    n = coords_um.shape[0]
    if groups is None:
        groups = np.zeros(n, dtype=int)
    rows, cols, vals = [], [], []
    for g in pd.unique(np.asarray(groups, dtype=object)):
        idx = np.flatnonzero(np.asarray(groups, dtype=object) == g)
        k = min(max_neighbors, idx.size - 1)
        if k < 1:
            continue
        dist, nbr = NearestNeighbors(n_neighbors=k + 1).fit(coords_um[idx]).kneighbors(coords_um[idx])
        dist, nbr = dist[:, 1:], nbr[:, 1:]
        keep = dist <= 3 * sigma_um
        r = np.repeat(idx, k).reshape(-1, k)[keep]
        rows.append(r)
        cols.append(idx[nbr[keep]])
        vals.append(np.exp(-0.5 * (dist[keep] / sigma_um) ** 2).astype(np.float32))
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    a = a.maximum(a.T).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a.astype(np.float32)


def row_normalize(a: sp.spmatrix, self_loops: bool = True, *, isolated_self: bool = False) -> sp.csr_matrix:
    """Row-stochastic version of ``a`` (optionally with self loops): neighbour averaging as a sparse product.

    ``isolated_self``: a spot without neighbours averages over itself (instead of a row of zeros).
    """
    a = sp.csr_matrix(a, dtype=np.float32)
    if self_loops:
        a = a + sp.identity(a.shape[0], dtype=np.float32, format="csr")
    elif isolated_self:
        lonely = np.diff(a.indptr) == 0
        if lonely.any():
            a = a + sp.diags(lonely.astype(np.float32), format="csr")
    deg = np.asarray(a.sum(axis=1)).ravel()
    deg[deg == 0] = 1.0
    return sp.diags(1.0 / deg).dot(a).tocsr().astype(np.float32)


def smooth_features(x: np.ndarray, graph: sp.spmatrix, n_hops: int) -> np.ndarray:
    """Average each spot's features with its neighbours', ``n_hops`` times (sparse products only).

    ``graph`` may be weighted (e.g. :func:`gaussian_graph`); each spot counts itself with weight 1.
    """
    a = row_normalize(graph, self_loops=True)
    for _ in range(n_hops):
        x = a @ x
    return np.asarray(x, dtype=np.float32)


def spatial_neighbors(
    adata: AnnData,
    *,
    n_neighbors: int = 6,
    library_key: str | None = None,
    key_added: str = "histoclip_spatial",
    copy: bool = False,
) -> AnnData | None:
    """Sparse k-nearest-neighbour graph of the spots, built within each library.

    Six neighbours match the Visium hexagonal grid. The graph is sparse (``n_obs * n_neighbors`` entries),
    so it scales to Visium HD-sized data.

    Parameters
    ----------
    adata
        AnnData with ``obsm["spatial"]``.
    n_neighbors
        Neighbours per spot (the graph is then symmetrised).
    library_key
        Column of ``obs`` with each spot's library; spots of different libraries are never linked.
    key_added
        Prefix of the ``obsp`` key.
    copy
        Return a copy instead of writing to ``adata``.

    Returns
    -------
    ``None`` or a copy; sets ``adata.obsp[f"{key_added}_connectivities"]``, a symmetric binary
    ``scipy.sparse.csr_matrix`` of shape ``(n_obs, n_obs)``.

    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    xy = check_spatial(adata)
    groups = None
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"library_key {library_key!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
        groups = adata.obs[library_key].astype(str).to_numpy()
    a = knn_graph(xy, n_neighbors, groups)
    target = adata.copy() if copy else adata
    write_results(target, params=("spatial_neighbors", {"n_neighbors": n_neighbors, "library_key": library_key}))
    target.obsp[f"{key_added}_connectivities"] = a
    return target if copy else None


def spot_coords_um(spots) -> np.ndarray:
    """(n_obs, 2) spot centres in microns (each slide's pixels times its microns per pixel).

    Where :func:`histoclip.pp.extract_patches` recorded the scale of the same image (with the spot diameter the user
    gave it, e.g. 100 um for legacy ST), that scale is used, so the neighbourhoods of training and domains agree with
    the patches.
    """
    from .._constants import Key

    rec = spots.adata.uns.get(Key.uns.histoclip, {}).get("params", {}).get("patches", {})
    keys, scales = rec.get("img_key", {}), rec.get("um_per_px", {})
    out = np.full((spots.n_obs, 2), np.nan)
    for s in spots.slides:
        um = float(s.um_per_px)
        if isinstance(keys, dict) and isinstance(scales, dict) and keys.get(s.library_id) == s.img_key \
                and s.library_id in scales:
            um = float(scales[s.library_id])
        out[s.index] = np.asarray(s.coords, dtype=np.float64) * um
    return out
