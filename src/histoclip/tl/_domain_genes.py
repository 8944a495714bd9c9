from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._utils import get_table, is_spatialdata, timed, write_results
from ..io._slide import check_spatial, resolve
from ..pp._genes import counts_matrix, log_normalize
from ..pp._graph import knn_graph

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def morans_i(x: np.ndarray, graph) -> np.ndarray:
    """Moran's I of each column of ``x`` on a sparse, row-normalised spatial weight matrix (squidpy's definition)."""
    import scipy.sparse as sp

    from ..pp._genes import _morans_i_sparse

    return _morans_i_sparse(sp.csr_matrix(np.asarray(x, dtype=np.float64)), graph)


def domain_genes(
    data: AnnData | SpatialData,
    *,
    groupby: str = Key.obs.domain,
    n_genes: int = 20,
    method: str = "wilcoxon",
    n_neighbors: int = 6,
    min_morans_i: float = 0.0,
    max_pval_adj: float = 0.05,
    layer: str | None = None,
    library_key: str | None = None,
    table_key: str = "table",
    key_added: str = Key.uns.domain_genes,
    copy: bool = False,
) -> AnnData | None:
    """Domain-associated spatially variable genes.

    For each domain, genes are ranked by scanpy's ``rank_genes_groups`` (domain against all other spots, on
    log-normalised counts); up-regulated genes with an adjusted p-value below ``max_pval_adj`` whose spatial
    autocorrelation (Moran's I on a ``n_neighbors`` spatial k-NN graph) is at least ``min_morans_i`` are kept, the
    top ``n_genes`` per domain.

    Parameters
    ----------
    data
        AnnData with raw counts, ``obsm["spatial"]`` and the domains in ``obs[groupby]``; or a SpatialData object
        whose table ``table_key`` holds them (spot positions from its shapes), where the results are written.
    groupby
        Categorical ``obs`` column of domains (:func:`histoclip.tl.domains` writes ``"histoclip_domain"``).
    n_genes
        Genes kept per domain.
    method
        Test of ``scanpy.tl.rank_genes_groups`` (``"wilcoxon"``, ``"t-test"``, ``"logreg"``...).
    n_neighbors
        Neighbours of the spatial graph for Moran's I.
    min_morans_i
        Smallest Moran's I kept (0 keeps every spatially positively autocorrelated gene).
    max_pval_adj
        Largest Benjamini-Hochberg adjusted p-value kept.
    layer
        Layer with raw counts (default ``X``).
    library_key
        Column of ``obs`` with each spot's library (the spatial graph never links libraries).
    table_key
        SpatialData only: the table with the counts and domains.
    key_added
        Key in ``uns`` for the table.
    copy
        Return a copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy. Sets ``adata.uns["histoclip_domain_genes"]`` (in the table, for SpatialData): a
    :class:`pandas.DataFrame` with one row per
    (domain, gene): ``domain``, ``rank`` (1 = strongest), ``gene``, ``score``, ``logfoldchange``, ``pval_adj``,
    ``morans_i``, ``frac_in_domain``, ``frac_elsewhere``; and ``uns["histoclip"]["params"]["domain_genes"]``.

    """
    import anndata as ad
    import scanpy as sc

    if copy and is_spatialdata(data):
        raise ValueError("copy=True is only supported for AnnData input.")
    adata = get_table(data, table_key)
    if groupby not in adata.obs:
        raise KeyError(
            f"adata.obs[{groupby!r}] not found (columns: {list(adata.obs.columns)}); run histoclip.tl.domains first "
            "or pass groupby=."
        )
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    if labels[keep].nunique() < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has fewer than two domains; nothing to compare.")
    if is_spatialdata(data):  # spot centres from the shapes the table annotates
        xy = resolve(data, table_key=table_key, library_key=library_key, need_image=False).coords()
    else:
        xy = check_spatial(adata)
    x = counts_matrix(adata, layer)
    with timed("domain_genes"):
        logx = log_normalize(x)
        tmp = ad.AnnData(logx[keep], obs=pd.DataFrame({"g": labels[keep].astype(str).astype("category").to_numpy()},
                                                       index=adata.obs_names[keep]))
        tmp.var_names = adata.var_names
        sc.tl.rank_genes_groups(tmp, "g", method=method, use_raw=False, pts=True)
        res = tmp.uns["rank_genes_groups"]
        groups = list(res["names"].dtype.names)
        groups_col = None
        if library_key is not None:
            if library_key not in adata.obs:
                raise KeyError(f"library_key {library_key!r} is not a column of adata.obs; columns: "
                               f"{list(adata.obs.columns)}.")
            groups_col = adata.obs[library_key].astype(str).to_numpy()
        graph = knn_graph(xy, n_neighbors, groups_col)
        rows = []
        candidates: set[str] = set()
        per_group = {}
        for g in groups:
            df = pd.DataFrame({
                "gene": res["names"][g], "score": res["scores"][g], "logfoldchange": res["logfoldchanges"][g],
                "pval_adj": res["pvals_adj"][g],
            })
            df = df[(df["logfoldchange"] > 0) & (df["pval_adj"] <= max_pval_adj)]
            per_group[g] = df
            candidates.update(df["gene"].head(max(5 * n_genes, 50)))
        cand = sorted(candidates)
        idx = adata.var_names.get_indexer(cand)
        mi = dict(zip(cand, morans_i(np.asarray(logx[:, idx].todense()), graph), strict=True)) if cand else {}
        pts, pts_rest = res["pts"], res["pts_rest"]
        for g in groups:
            df = per_group[g]
            df = df[df["gene"].isin(mi.keys())].copy()
            df["morans_i"] = df["gene"].map(mi)
            df = df[df["morans_i"] >= min_morans_i].head(n_genes)
            df.insert(0, "domain", g)
            df.insert(1, "rank", np.arange(1, len(df) + 1))
            df["frac_in_domain"] = pts.loc[df["gene"], g].to_numpy()
            df["frac_elsewhere"] = pts_rest.loc[df["gene"], g].to_numpy()
            rows.append(df)
        table = pd.concat(rows, ignore_index=True)
        table["domain"] = table["domain"].astype(str)
        table["gene"] = table["gene"].astype(str)
    target = adata.copy() if copy else adata
    params = {"groupby": groupby, "n_genes": n_genes, "method": method, "n_neighbors": n_neighbors,
              "min_morans_i": min_morans_i, "max_pval_adj": max_pval_adj, "layer": layer, "library_key": library_key}
    write_results(target, uns={key_added: table}, params=("domain_genes", params))
    return target if copy else None
