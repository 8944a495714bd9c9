from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._utils import categories_of, get_table, is_spatialdata, write_results

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def section_labels(data, adata: AnnData, library_key: str | None, what: str) -> tuple[str, np.ndarray]:
    """The ``obs`` column naming each spot's section, and its values as strings.

    ``library_key`` when given; for a SpatialData table that annotates several regions, its region column.
    """
    if library_key is None and is_spatialdata(data):
        from ..io._slide import several_regions_key

        region_key = several_regions_key(adata)
        library_key = None if region_key is None else str(region_key)
    if library_key is None:
        raise ValueError(
            f"{what} compares sections: pass library_key=... naming the adata.obs column that says which section "
            f"each spot belongs to (e.g. the label= of anndata.concat(..., label='slice')); columns: "
            f"{list(adata.obs.columns)}."
        )
    if library_key not in adata.obs:
        raise KeyError(f"library_key {library_key!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    col = adata.obs[library_key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{library_key!r}] has {int(col.isna().sum())} missing values; every spot needs "
                         "its section.")
    return library_key, col.astype(str).to_numpy()


def domain_shares(
    data: AnnData | SpatialData,
    *,
    groupby: str = Key.obs.domain,
    library_key: str | None = None,
    min_share: float = 0.02,
    table_key: str = "table",
    key_added: str = Key.uns.domain_shares,
    copy: bool = False,
) -> AnnData | None:
    """Each domain's share of the spots of each section: a check across sections that needs no labels.

    Domains found over several sections at once (e.g. ``hc.tl.domains(adata, library_key="slice")``) should mean
    the same tissue on every section. Consecutive sections of one block hold roughly the same layers in similar
    proportions, so a domain that takes a large share of one section and (almost) none of the others is either
    tissue that exists there only or a section (batch) effect; both are worth a look.

    Parameters
    ----------
    data
        AnnData with the domains in ``obs[groupby]`` and the sections in ``obs[library_key]``; or a SpatialData
        object whose table ``table_key`` holds them (the table's region column is the default section key when it
        annotates several regions).
    groupby
        Categorical ``obs`` column of domains (:func:`histoclip.tl.domains` writes ``"histoclip_domain"``).
    library_key
        ``obs`` column naming each spot's section (library).
    min_share
        A domain counts as present on a section when it holds at least this fraction of the section's labelled
        spots (default 2%: a few stray spots do not count as presence).
    table_key
        SpatialData only: the table. Visium HD (``spatialdata_io.visium_hd``, one table per bin size): the 8 um bins
        ``"square_008um"`` unless another is named, e.g. ``"square_016um"``; 2 um bins are refused (see
        :doc:`/visium_hd`).
    key_added
        Key in ``uns`` for the table.
    copy
        Return a copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy. Sets ``adata.uns["histoclip_domain_shares"]`` (in the table, for SpatialData): a
    :class:`pandas.DataFrame` with one row per domain (index: the domain, in the order of the categories of
    ``obs[groupby]``) and the columns ``share_<section>`` (fraction of that section's labelled spots in the domain;
    each column sums to 1; ``table.filter(like="share_")`` gives the domains x sections matrix), ``n_<section>``
    (spot counts), ``n_spots`` (all sections), ``n_sections`` (sections where the share is at least
    ``min_share``), ``sections`` (those sections, comma-separated) and ``single_section`` (``True`` when the
    domain is present on exactly one of two or more sections); and
    ``uns["histoclip"]["params"]["domain_shares"]`` (``groupby``, ``library_key``, ``min_share``, ``sections``).
    Spots without a domain (NaN) are left out.

    """
    if copy and is_spatialdata(data):
        raise ValueError("copy=True is only supported for AnnData input.")
    adata = get_table(data, table_key)
    if groupby not in adata.obs:
        raise KeyError(
            f"adata.obs[{groupby!r}] not found (columns: {list(adata.obs.columns)}); run histoclip.tl.domains first "
            "or pass groupby=."
        )
    if isinstance(min_share, bool) or not isinstance(min_share, int | float) or not 0 < min_share < 1:
        raise ValueError(f"min_share must be a fraction in (0, 1), got {min_share!r}.")
    library_key, sections_of = section_labels(data, adata, library_key, "domain_shares")
    labels = adata.obs[groupby]
    keep = labels.notna().to_numpy()
    domains = categories_of(labels)
    sections = [str(s) for s in pd.unique(sections_of)]
    if isinstance(adata.obs[library_key].dtype, pd.CategoricalDtype):  # the column's own order
        sections = [str(c) for c in adata.obs[library_key].cat.categories if str(c) in set(sections)]
    counts = pd.crosstab(pd.Categorical(labels[keep].astype(str).to_numpy(), categories=domains),
                         pd.Categorical(sections_of[keep], categories=sections), dropna=False)
    counts.index, counts.columns = pd.Index(domains, name=groupby), pd.Index(sections)
    empty = [s for s in sections if counts[s].sum() == 0]
    if empty:
        raise ValueError(f"Sections {empty} have no spot with a domain in adata.obs[{groupby!r}] (all NaN).")
    shares = counts / counts.sum(axis=0)
    present = shares >= min_share
    table = pd.DataFrame(index=counts.index)
    for s in sections:
        table[f"share_{s}"] = shares[s].astype(np.float64)
    for s in sections:
        table[f"n_{s}"] = counts[s].astype(np.int64)
    table["n_spots"] = counts.sum(axis=1).astype(np.int64)
    table["n_sections"] = present.sum(axis=1).astype(np.int64)
    table["sections"] = [",".join(s for s in sections if present.loc[d, s]) for d in domains]
    table["single_section"] = (table["n_sections"] == 1) & (len(sections) > 1)
    target = adata.copy() if copy else adata
    params = {"groupby": groupby, "library_key": library_key, "min_share": float(min_share), "sections": sections}
    write_results(target, uns={key_added: table}, params=("domain_shares", params))
    return target if copy else None
