from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._settings import logger
from .._utils import get_table, is_spatialdata, timed, write_results
from ..io._slide import check_counts_table, check_spatial
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


def _rank_block(logx, labels: np.ndarray, rank: np.ndarray, var_names, xy: np.ndarray, groups_col: np.ndarray | None,
                obs_names, *, method: str, n_genes: int, n_neighbors: int, min_morans_i: float,
                max_pval_adj: float, min_logfoldchange: float, min_in_fraction: float, max_out_fraction: float,
                unique: bool) -> pd.DataFrame:
    """Markers of each domain against the other ranked spots of one block (all spots, or one section).

    Spots where ``rank`` is True are ranked by their ``labels``; Moran's I is computed on every spot of the block.
    Genes must be specific (fold change, fractions expressing in and outside the domain); with ``unique`` a gene that
    passes for several domains is kept for the one where its fold change is largest.
    """
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(logx[rank], obs=pd.DataFrame({"g": pd.Categorical(labels[rank])}, index=obs_names[rank]))
    tmp.var_names = var_names
    sc.tl.rank_genes_groups(tmp, "g", method=method, use_raw=False, pts=True)
    res = tmp.uns["rank_genes_groups"]
    groups = list(res["names"].dtype.names)
    graph = knn_graph(xy, n_neighbors, groups_col)
    rows = []
    candidates: set[str] = set()
    per_group = {}
    pts, pts_rest = res["pts"], res["pts_rest"]
    for g in groups:
        df = pd.DataFrame({
            "gene": res["names"][g], "score": res["scores"][g], "logfoldchange": res["logfoldchanges"][g],
            "pval_adj": res["pvals_adj"][g],
        })
        df["frac_in_domain"] = pts.loc[df["gene"], g].to_numpy()
        df["frac_elsewhere"] = pts_rest.loc[df["gene"], g].to_numpy()
        specific = ((df["logfoldchange"] >= min_logfoldchange) & (df["frac_in_domain"] >= min_in_fraction)
                    & (df["frac_elsewhere"] <= max_out_fraction))
        df = df[(df["logfoldchange"] > 0) & (df["pval_adj"] <= max_pval_adj) & specific].copy()
        df["specificity"] = df["score"] * df["logfoldchange"]  # consistent (test score) and large (fold change)
        per_group[g] = df.sort_values("specificity", ascending=False, kind="stable")
    if unique and len(groups) > 1:  # each gene for the domain where its fold change is largest
        both = pd.concat([df.assign(_g=g) for g, df in per_group.items()], ignore_index=True)
        best = both.sort_values("logfoldchange", ascending=False, kind="stable").drop_duplicates("gene")
        owner = dict(zip(best["gene"], best["_g"], strict=True))
        per_group = {g: df[df["gene"].map(owner) == g] for g, df in per_group.items()}
    for g in groups:
        candidates.update(per_group[g]["gene"].head(max(5 * n_genes, 50)))
    cand = sorted(candidates)
    idx = var_names.get_indexer(cand)
    mi = dict(zip(cand, morans_i(np.asarray(logx[:, idx].todense()), graph), strict=True)) if cand else {}
    for g in groups:
        df = per_group[g]
        df = df[df["gene"].isin(mi.keys())].copy()
        df["morans_i"] = df["gene"].map(mi)
        df = df[df["morans_i"] >= min_morans_i].head(n_genes)
        df.insert(0, "domain", g)
        df.insert(1, "rank", np.arange(1, len(df) + 1))
        df = df[["domain", "rank", "gene", "specificity", "score", "logfoldchange", "pval_adj", "morans_i",
                 "frac_in_domain", "frac_elsewhere"]]
        rows.append(df)
    table = pd.concat(rows, ignore_index=True)
    table["domain"] = table["domain"].astype(str)
    table["gene"] = table["gene"].astype(str)
    return table


def domain_genes(
    data: AnnData | SpatialData,
    *,
    groupby: str = Key.obs.domain,
    n_genes: int = 20,
    method: str = "wilcoxon",
    n_neighbors: int = 6,
    min_morans_i: float = 0.0,
    max_pval_adj: float = 0.05,
    min_logfoldchange: float = 1.0,
    min_in_fraction: float = 0.25,
    max_out_fraction: float = 1.0,
    unique: bool = True,
    layer: str | None = None,
    library_key: str | None = None,
    section_key: str | None = None,
    min_spots: int = 10,
    table_key: str = "table",
    key_added: str = Key.uns.domain_genes,
    copy: bool = False,
) -> AnnData | None:
    """Domain-associated spatially variable genes.

    For each domain, genes are ranked by scanpy's ``rank_genes_groups`` (domain against all other spots, on
    log-normalised counts) and kept when they are specific to it: at least ``2 ** min_logfoldchange`` times higher
    (2-fold by default), expressed in at least ``min_in_fraction`` of the domain's spots and at most
    ``max_out_fraction`` of the others, with an adjusted p-value below ``max_pval_adj`` and a spatial
    autocorrelation (Moran's I on a ``n_neighbors`` spatial k-NN graph) of at least ``min_morans_i``. The top
    ``n_genes`` per domain are those with the highest specificity, the test's score times the log fold change: a
    marker must be both consistent and large (on DLPFC: MOBP and PLP1 for white matter, PCP4 for L5, HPCAL1 for L2
    come first). The fold change is what removes genes that are high everywhere
    (on DLPFC, NRGN in 99.8% of a layer's spots against 97.5% elsewhere: 1.6-fold), while strong markers detected
    everywhere at a lower level stay (PLP1 in white matter: 18-fold, in 89% of the other spots). With ``unique``, a
    gene specific to several domains is kept only for the one where its fold change is largest, so the domains'
    lists differ (as the blocks of :func:`histoclip.pl.domain_genes` do). These are the filters of scanpy's
    ``filter_rank_genes_groups`` (``min_fold_change``, ``min_in_group_fraction``, ``max_out_group_fraction``), applied
    before the top genes are taken.

    With ``section_key``, the same is done within each section separately (a domain against the rest of that
    section, Moran's I on that section's graph), so markers can be compared across sections: a domain with the same
    meaning everywhere has the same markers on every section.

    Parameters
    ----------
    data
        AnnData with raw counts, ``obsm["spatial"]`` and the domains in ``obs[groupby]``; or a SpatialData object
        whose table ``table_key`` holds them (spot positions from its shapes), where the results are written.
    groupby
        Categorical ``obs`` column of domains (:func:`histoclip.tl.domains` writes ``"histoclip_domain"``).
    n_genes
        Genes kept per domain (per domain and section, with ``section_key``).
    method
        Test of ``scanpy.tl.rank_genes_groups`` (``"wilcoxon"``, ``"t-test"``, ``"logreg"``...).
    n_neighbors
        Neighbours of the spatial graph for Moran's I.
    min_morans_i
        Smallest Moran's I kept (0 keeps every spatially positively autocorrelated gene).
    max_pval_adj
        Largest Benjamini-Hochberg adjusted p-value kept.
    min_logfoldchange
        Smallest log2 fold change (domain against the other spots) kept; 1 is 2-fold.
    min_in_fraction
        Smallest fraction of the domain's spots expressing the gene.
    max_out_fraction
        Largest fraction of the other spots expressing the gene (1: no limit; scanpy's ``filter_rank_genes_groups``
        uses 0.5, which on deep Visium data also removes strong markers detected everywhere at a lower level).
    unique
        Keep each gene for one domain only (where its fold change is largest).
    layer
        Layer with raw counts (default ``X``).
    library_key
        Column of ``obs`` with each spot's library (the spatial graph never links libraries).
    section_key
        Column of ``obs`` with each spot's section (e.g. the same as ``library_key``): rank markers within each
        section separately. Default: all spots together.
    min_spots
        With ``section_key``: a domain is ranked on a section only where it has at least this many spots (a
        handful of stray spots gives no markers worth reading); sections with fewer than two such domains are left
        out (logged).
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
    (domain, gene): ``domain``, ``rank`` (1 = most specific), ``gene``, ``specificity`` (``score`` times
    ``logfoldchange``), ``score``, ``logfoldchange`` (log2), ``pval_adj``, ``morans_i``, ``frac_in_domain``,
    ``frac_elsewhere``; and ``uns["histoclip"]["params"]["domain_genes"]``.
    With ``section_key``, one block of rows per section, with a first column ``section`` and two more columns:
    ``n_sections_marker`` (on how many sections this gene is among this domain's markers) and
    ``n_sections_tested`` (on how many sections the domain was ranked); a gene with
    ``n_sections_marker == n_sections_tested`` marks the domain on every section it was ranked on.

    """
    if copy and is_spatialdata(data):
        raise ValueError("copy=True is only supported for AnnData input.")
    adata = get_table(data, table_key)
    if groupby not in adata.obs:
        raise KeyError(
            f"adata.obs[{groupby!r}] not found (columns: {list(adata.obs.columns)}); run histoclip.tl.domains first "
            "or pass groupby=."
        )
    for what, col in (("library_key", library_key), ("section_key", section_key)):
        if col is not None and col not in adata.obs:
            raise KeyError(f"{what} {col!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    if isinstance(min_spots, bool) or not isinstance(min_spots, int | np.integer) or min_spots < 2:
        raise ValueError(f"min_spots must be an int >= 2, got {min_spots!r}.")
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    if labels[keep].nunique() < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has fewer than two domains; nothing to compare.")
    if section_key is not None and adata.obs[section_key].isna().any():
        raise ValueError(f"adata.obs[{section_key!r}] (section_key=) has {int(adata.obs[section_key].isna().sum())} "
                         "missing values; every spot needs its section.")
    check_counts_table(adata, layer)  # before any work; warns when the counts are not integers
    lib_col = adata.obs[library_key].astype(str).to_numpy() if library_key is not None else None
    if is_spatialdata(data):  # spot centres from the shapes the table annotates (every region of it)
        from ._domains import _resolve_sections

        spots = _resolve_sections(data, library_key, table_key, None)
        xy = spots.coords()
        if lib_col is None and len(spots.slides) > 1:  # the spatial graph never links regions
            lib_col = spots.library_labels().astype(str)
    else:
        xy = check_spatial(adata)
    x = counts_matrix(adata, layer)
    label_str = labels.astype(str).to_numpy()
    for what, v in (("min_logfoldchange", min_logfoldchange), ("min_in_fraction", min_in_fraction),
                    ("max_out_fraction", max_out_fraction)):
        if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not np.isfinite(v):
            raise ValueError(f"{what} must be a finite number, got {v!r}.")
    if not 0 <= min_in_fraction <= 1 or not 0 <= max_out_fraction <= 1:
        raise ValueError(f"min_in_fraction and max_out_fraction are fractions of spots in [0, 1], got "
                         f"{min_in_fraction!r} and {max_out_fraction!r}.")
    opts = {"method": method, "n_genes": n_genes, "n_neighbors": n_neighbors, "min_morans_i": min_morans_i,
            "max_pval_adj": max_pval_adj, "min_logfoldchange": float(min_logfoldchange),
            "min_in_fraction": float(min_in_fraction), "max_out_fraction": float(max_out_fraction),
            "unique": bool(unique)}
    with timed("domain_genes"):
        logx = log_normalize(x)
        if section_key is None:
            table = _rank_block(logx, label_str, keep, adata.var_names, xy, lib_col, adata.obs_names, **opts)
        else:
            table = _per_section(adata, logx, label_str, keep, xy, lib_col, section_key, min_spots, opts)
    target = adata.copy() if copy else adata
    params = {"groupby": groupby, "n_genes": n_genes, "method": method, "n_neighbors": n_neighbors,
              "min_morans_i": min_morans_i, "max_pval_adj": max_pval_adj, "min_logfoldchange": float(min_logfoldchange),
              "min_in_fraction": float(min_in_fraction), "max_out_fraction": float(max_out_fraction),
              "unique": bool(unique), "layer": layer, "library_key": library_key}
    if section_key is not None:
        params.update({"section_key": section_key, "min_spots": int(min_spots)})
    write_results(target, uns={key_added: table}, params=("domain_genes", params))
    return target if copy else None


def _per_section(adata, logx, labels, keep, xy, lib_col, section_key, min_spots, opts) -> pd.DataFrame:
    """One ranking per section (each domain against the rest of that section), stacked, with agreement counts."""
    col = adata.obs[section_key]
    section_of = col.astype(str).to_numpy()
    present = set(section_of)
    order = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col)  # the column's order
    sections = [str(s) for s in order if str(s) in present]
    blocks = []
    for s in sections:
        rows = np.flatnonzero(section_of == s)  # every spot of the section, for its spatial graph
        counts = pd.Series(labels[rows][keep[rows]]).value_counts()
        ranked = set(counts.index[counts >= min_spots])
        rank = keep[rows] & np.isin(labels[rows], list(ranked))
        if len(ranked) < 2:
            logger.warning("domain_genes: section %r has %d domain(s) with >= %d spots; left out (nothing to compare).",
                           s, len(ranked), min_spots)
            continue
        block = _rank_block(logx[rows], labels[rows], rank, adata.var_names, xy[rows],
                            None if lib_col is None else lib_col[rows], adata.obs_names[rows], **opts)
        block.insert(0, "section", s)
        blocks.append((block, sorted(ranked)))
    if not blocks:
        raise ValueError(f"No section of adata.obs[{section_key!r}] has two domains with >= {min_spots} spots each; "
                         "lower min_spots= or leave section_key out.")
    table = pd.concat([b for b, _ in blocks], ignore_index=True)
    tested = pd.Series([d for _, ranked in blocks for d in ranked]).value_counts()
    table["n_sections_marker"] = table.groupby(["domain", "gene"])["section"].transform("nunique").astype(np.int64)
    table["n_sections_tested"] = table["domain"].map(tested).astype(np.int64)
    table["section"] = table["section"].astype(str)
    return table
