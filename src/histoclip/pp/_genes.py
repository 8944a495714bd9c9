"""Gene selection and the log-normalisation the expression encoder sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData

TARGET_SUM = 1e4


def counts_matrix(adata: AnnData, layer: str | None = None) -> sp.csr_matrix:
    """Raw counts (spots x genes) as float32 CSR, checked to be non-negative."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; adata.layers has {list(adata.layers.keys())}.")
    x = adata.layers[layer] if layer is not None else adata.X
    if x is None:
        raise ValueError("adata.X is None: histoclip needs raw counts in adata.X or in a layer (layer=...).")
    x = sp.csr_matrix(x, dtype=np.float32)
    if x.nnz and not np.isfinite(x.data).all():
        raise ValueError("The counts contain NaN or inf values; histoclip expects raw, finite counts.")
    if x.nnz and x.data.min() < 0:
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        raise ValueError(
            f"{where} has negative values; histoclip expects raw counts. Pass layer='counts' (or the layer holding "
            "raw counts), or keep raw counts in adata.X."
        )
    return x


def log_normalize(x: sp.csr_matrix, totals: np.ndarray | None = None) -> sp.csr_matrix:
    """``log1p(counts / total * 1e4)`` per spot; spots with zero counts stay zero."""
    if totals is None:
        totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    y = sp.diags(scale.astype(np.float32)).dot(x).tocsr()
    y.data = np.log1p(y.data)
    return y


def select_genes(adata: AnnData, n_top_genes: int = 3000, *, layer: str | None = None) -> list[str]:
    """The ``n_top_genes`` most variable genes (scanpy's ``seurat`` dispersion ranking on log-normalised counts).

    Genes detected in fewer than three spots are never chosen. When the data hold fewer genes than asked,
    all detected genes are returned.
    """
    import scanpy as sc
    from anndata import AnnData

    x = counts_matrix(adata, layer)
    detected = np.asarray((x > 0).sum(axis=0)).ravel() >= 3
    if detected.sum() == 0:
        raise ValueError("No gene is detected in at least three spots; check that adata holds counts.")
    names = np.asarray(adata.var_names)[detected]
    if detected.sum() <= n_top_genes:
        return list(names)
    tmp = AnnData(log_normalize(x)[:, detected])
    tmp.var_names = names
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
    ranked = tmp.var.sort_values("dispersions_norm", ascending=False).index[:n_top_genes]
    keep = set(ranked)
    return [g for g in names if g in keep]


def expression_matrix(adata: AnnData, genes: Sequence[str], *, layer: str | None = None) -> np.ndarray:
    """Dense float32 log-normalised expression of ``genes`` (normalised by each spot's total over all genes).

    Spots with zero counts are kept (their expression is all zeros) and a warning gives their number.
    """
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} of the model's {len(genes)} genes are absent from adata.var_names (first: {missing[:5]}; "
            f"adata has e.g. {list(adata.var_names[:5])}). Subset or reorder the data to the model's genes "
            "(model.genes), or predict without counts with histoclip.tl.predict_expression."
        )
    x = counts_matrix(adata, layer)
    totals = np.asarray(x.sum(axis=1)).ravel()
    empty = totals <= 0
    if empty.any():  # kept, not dropped: results stay aligned with adata's rows
        logger.warning(
            "%d of %d spots have zero counts (first: %s); they are kept and their log-normalised expression is zero. "
            "Drop them first (e.g. sc.pp.filter_cells(adata, min_counts=1)) if they are not tissue.",
            int(empty.sum()), len(totals), list(adata.obs_names[empty][:5]),
        )
    idx = adata.var_names.get_indexer(list(genes))
    return np.asarray(log_normalize(x[:, idx], totals).todense(), dtype=np.float32)
