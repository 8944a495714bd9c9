from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.patches import Patch

from .._constants import Key
from .._utils import categories_of, get_table
from ._utils import finish, get_ax, palette

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData


def domain_shares(
    data: AnnData | SpatialData,
    *,
    key: str = Key.uns.domain_shares,
    reference: str | None = None,
    table_key: str = "table",
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Stacked bars of each domain's share of the spots of each section (from :func:`histoclip.tl.domain_shares`).

    One bar per section, one segment per domain, in the domain's colour in :func:`histoclip.pl.domains`. Domains
    present on one section only (``single_section`` in the table) are hatched and named with that section in the
    legend.

    Parameters
    ----------
    data
        AnnData with ``uns["histoclip_domain_shares"]``, or a SpatialData object whose table ``table_key`` has it.
    key
        Key of the table in ``uns``.
    reference
        Categorical ``obs`` column whose colours the domains take, as ``reference=`` of :func:`histoclip.pl.domains`.
    table_key
        SpatialData only: the table. Visium HD (``spatialdata_io.visium_hd``, one table per bin size): the 8 um bins
        ``"square_008um"`` unless another is named, e.g. ``"square_016um"``; 2 um bins are refused (see
        :doc:`/visium_hd`).
    ax, save
        Axes to draw into and path to save to.

    Returns
    -------
    The :class:`matplotlib.axes.Axes`.

    """
    from ._plots import _matched_colors

    adata = get_table(data, table_key)
    if key not in adata.uns:
        raise KeyError(f"adata.uns[{key!r}] not found; run histoclip.tl.domain_shares(adata, library_key=...) first.")
    table = adata.uns[key]
    share_cols = [c for c in table.columns if str(c).startswith("share_")]
    if not share_cols or "single_section" not in table.columns:
        raise ValueError(f"adata.uns[{key!r}] is not a table written by histoclip.tl.domain_shares (columns: "
                         f"{list(table.columns)}); rerun it.")
    groupby = table.index.name or Key.obs.domain
    domains = [str(d) for d in table.index]
    if groupby in adata.obs:
        cats = categories_of(adata.obs[groupby])
    else:
        cats = domains
    labels = {c: c for c in cats}
    if reference is not None:
        if reference not in adata.obs or groupby not in adata.obs:
            raise KeyError(f"reference= needs adata.obs[{reference!r}] and adata.obs[{groupby!r}]; columns: "
                           f"{list(adata.obs.columns)}.")
        colors, labels = _matched_colors(adata, groupby, reference)
    else:
        colors = palette(cats, list(adata.uns.get(f"{groupby}_colors", [])) or None)
    sections = [str(c)[len("share_"):] for c in share_cols]
    ax = get_ax(ax, figsize=(1.0 * len(sections) + 3.5, 4.5))
    x = np.arange(len(sections))
    bottom = np.zeros(len(sections))
    handles = []
    single = table["single_section"].to_numpy(dtype=bool)
    where = table["sections"].astype(str).to_numpy() if "sections" in table.columns else [""] * len(domains)
    for d, only, on in zip(domains, single, where, strict=True):
        h = table.loc[d, share_cols].to_numpy(dtype=float)
        color = colors.get(d, (0.8, 0.8, 0.8, 1.0))
        hatch = "///" if only else None
        ax.bar(x, h, bottom=bottom, color=color, edgecolor="0.15" if only else "white", linewidth=0.6 if only else 0.4,
               hatch=hatch, width=0.7)
        bottom += h
        name = labels.get(d, d)
        handles.append(Patch(facecolor=color, edgecolor="0.15" if only else "none", hatch=hatch,
                             label=f"{name} (only on {on})" if only else name))
    ax.set_xticks(x, sections, rotation=45 if max(len(s) for s in sections) > 6 else 0)
    ax.set_xlim(-0.6, len(sections) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the section's spots")
    ax.set_xlabel("section")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles[::-1], title=groupby, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("domains per section")
    finish(ax, save)
    return ax
