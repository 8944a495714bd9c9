"""Gene selection and the log-normalisation the expression encoder sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

from .._settings import logger
from ..io._slide import check_counts_table, check_in_memory

if TYPE_CHECKING:
    from anndata import AnnData

TARGET_SUM = 1e4
FIT_SAMPLE = 50_000  # above this many spots, gene ranking, PCA and mixtures are fitted on a seeded sample of them


def fit_rows(n: int, seed: int = 0, max_n: int | None = None) -> np.ndarray | None:
    """Sorted rows of a seeded sample of ``max_n`` (default :data:`FIT_SAMPLE`) of ``n`` spots, if ``n > max_n``.

    ``None`` means: fit on all spots, exactly as without sampling.
    At Visium HD scale (a capture area holds ~1M 8 um bins) statistics that only need the shape of the data (which
    genes vary in space, the principal axes, a mixture's components) are fitted on the sample; every spot is then
    assigned (projected, predicted), so nothing of size spots x genes or spots x spots is ever dense.
    """
    max_n = FIT_SAMPLE if max_n is None else int(max_n)
    if n <= max_n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))


def counts_matrix(adata: AnnData, layer: str | None = None) -> sp.csr_matrix:
    """Raw counts (spots x genes) as float32 CSR, checked to be non-negative."""
    check_in_memory(adata)
    check_counts_table(adata, layer, values=False)  # callers warn about non-integer counts (check_raw_counts)
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


def select_genes(
    adata: AnnData,
    n_top_genes: int = 2000,
    *,
    flavor: Literal["moran", "seurat"] = "moran",
    library_key: str | None = None,
    n_neighbors: int = 6,
    layer: str | None = None,
) -> list[str]:
    """The genes the model learns from: the ``n_top_genes`` most spatially autocorrelated (or most variable).

    ``flavor="moran"`` (default) ranks genes by Moran's I of their log-normalised expression on a sparse
    ``n_neighbors`` spatial k-NN graph (averaged over libraries). On DLPFC this beats the usual highly variable
    genes by about 0.2 ARI for domains: dispersion-based selection picks immunoglobulin and haemoglobin genes whose
    few high spots form noise clusters, while Moran's I keeps genes that vary smoothly across the tissue.
    ``flavor="seurat"`` is scanpy's dispersion ranking. Genes detected in fewer than three spots are never chosen;
    when the data hold fewer genes than asked, all detected genes are returned (in ``var_names`` order). Above
    50 000 spots (Visium HD bins) genes are ranked on a fixed random sample of 50 000 of them (seed 0; the k-NN
    graph is the sample's), so memory does not grow with spots x genes.
    """
    import scanpy as sc
    from anndata import AnnData

    if flavor not in ("moran", "seurat"):
        raise ValueError(f"flavor must be 'moran' or 'seurat', got {flavor!r}.")
    if adata.n_obs < 3:
        raise ValueError(
            f"Only {adata.n_obs} spots: genes are chosen among those detected in at least three spots (and a "
            "contrastive model needs many spots per batch). Use a slide, or several sections, with more spots; or pass "
            "genes=[...] to choose the genes yourself."
        )
    x = counts_matrix(adata, layer)
    detected = _spots_detected(x) >= 3
    if detected.sum() == 0:
        raise ValueError("No gene is detected in at least three spots; check that adata holds counts.")
    names = np.asarray(adata.var_names)[detected]
    if detected.sum() <= n_top_genes:
        return list(names)
    rows = fit_rows(adata.n_obs)  # large N: genes are ranked on a fixed (seed 0) sample of FIT_SAMPLE spots
    if rows is not None:
        logger.info("select_genes: ranking genes on a sample of %d of %d spots.", rows.size, adata.n_obs)
        x = x[rows]
    logx = log_normalize(x)[:, detected]
    if flavor == "seurat":
        tmp = AnnData(logx)
        tmp.var_names = names
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
        ranked = tmp.var.sort_values("dispersions_norm", ascending=False).index[:n_top_genes]
        keep = set(ranked)
    else:
        from ..io._slide import check_spatial
        from ._graph import knn_graph

        xy = check_spatial(adata)
        groups = adata.obs[library_key].astype(str).to_numpy() if library_key is not None else np.zeros(len(xy))
        if rows is not None:
            xy, groups = xy[rows], groups[rows]
        score = np.zeros(names.size)
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            if idx.size < 3:
                continue
            score += _morans_i_sparse(logx[idx], knn_graph(xy[idx], n_neighbors)) * idx.size
        keep = set(names[np.argsort(-score, kind="stable")[:n_top_genes]])
    return [g for g in names if g in keep]


def _spots_detected(x: sp.csr_matrix, chunk: int = 65_536) -> np.ndarray:
    """Number of spots in which each gene has a positive count, from row blocks of ``x`` (no copy of its pattern)."""
    n = np.zeros(x.shape[1], dtype=np.int64)
    for i in range(0, x.shape[0], chunk):
        lo, hi = x.indptr[i], x.indptr[min(i + chunk, x.shape[0])]
        n += np.bincount(x.indices[lo:hi][x.data[lo:hi] > 0], minlength=x.shape[1])
    return n


def _morans_i_sparse(x: sp.csr_matrix, graph: sp.spmatrix) -> np.ndarray:
    """Moran's I of each column of sparse ``x`` on a row-normalised ``graph``, without densifying ``x``."""
    w = sp.csr_matrix(graph, dtype=np.float64)
    deg = np.asarray(w.sum(axis=1)).ravel()
    w = sp.diags(1.0 / np.maximum(deg, 1)) @ w
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    wx = w @ x  # sparse, n x genes
    # sum_i z_i (W z)_i with z = x - mean, W rows summing to 1
    num = np.asarray(x.multiply(wx).sum(axis=0)).ravel() - mean * np.asarray(wx.sum(axis=0)).ravel() \
        - mean * np.asarray(x.sum(axis=0)).ravel() + n * mean**2
    den = np.asarray(x.multiply(x).sum(axis=0)).ravel() - n * mean**2
    s0 = w.sum()
    return np.divide(n / s0 * num, den, out=np.zeros_like(den), where=den > 1e-12)


CHUNK_ROWS = 65_536  # spots per block when the log expression is streamed (memory: one block, never spots x genes)


class LogExpression:
    """The log-normalised expression of ``genes`` in ``adata``, read in row blocks of sparse float32.

    Holds a reference to the counts (no copy) and each spot's total; :meth:`chunks` yields
    ``log1p(counts / total * 1e4)`` of the genes block by block, so statistics and projections over a million Visium HD
    bins never hold a dense spots x genes array. Spots with zero counts are kept (their expression is all zeros) and
    a warning gives their number.
    """

    def __init__(self, adata: AnnData, genes: Sequence[str], *, layer: str | None = None) -> None:
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of the model's {len(genes)} genes are absent from adata.var_names (first: "
                f"{missing[:5]}; adata has e.g. {list(adata.var_names[:5])}). Subset or reorder the data to the "
                "model's genes (model.genes), or predict without counts with histoclip.tl.predict_expression."
            )
        self.counts = counts_matrix(adata, layer)
        self.totals = np.asarray(self.counts.sum(axis=1)).ravel()
        empty = self.totals <= 0
        if empty.any():  # kept, not dropped: results stay aligned with adata's rows
            logger.warning(
                "%d of %d spots have zero counts (first: %s); they are kept and their log-normalised expression is "
                "zero. Drop them first (e.g. sc.pp.filter_cells(adata, min_counts=1)) if they are not tissue.",
                int(empty.sum()), len(self.totals), list(adata.obs_names[empty][:5]),
            )
        self.columns = adata.var_names.get_indexer(list(genes))
        self.n_obs = int(adata.n_obs)

    def chunks(self, chunk: int | None = None):
        """``(start, block)`` pairs: rows ``start:start + len(block)`` as sparse float32 CSR (spots x genes).

        ``chunk`` rows per block (default :data:`CHUNK_ROWS`).
        """
        chunk = int(CHUNK_ROWS if chunk is None else chunk)
        for i in range(0, self.n_obs, chunk):
            yield i, log_normalize(self.counts[i : i + chunk][:, self.columns], self.totals[i : i + chunk])

    def rows(self, index: np.ndarray) -> sp.csr_matrix:
        """The spots ``index`` (row numbers) as one sparse float32 CSR block (spots x genes)."""
        return log_normalize(self.counts[index][:, self.columns], self.totals[index])

    def dense(self) -> np.ndarray:
        """All spots as one dense float32 array (small data only: this is spots x genes)."""
        blocks = [np.asarray(b.todense(), dtype=np.float32) for _, b in self.chunks()]
        if not blocks:
            return np.zeros((0, self.columns.size), dtype=np.float32)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def expression_matrix(adata: AnnData, genes: Sequence[str], *, layer: str | None = None) -> np.ndarray:
    """Dense float32 log-normalised expression of ``genes`` (normalised by each spot's total over all genes).

    Spots with zero counts are kept (their expression is all zeros) and a warning gives their number. For data too
    large to hold dense (Visium HD), :class:`LogExpression` streams the same values in sparse row blocks.
    """
    return LogExpression(adata, genes, layer=layer).dense()
