from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .._constants import Key
from .._utils import get_table
from ..io._slide import resolve
from ..pp._genes import counts_matrix, log_normalize
from ..pp._patches import _spot_um
from ._utils import draw_slide, plot_image_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _top_genes(table, n_genes: int) -> list[tuple[str, str]]:
    out, seen = [], set()
    for dom, df in table.groupby("domain", sort=False):
        fresh = [g for g in df.sort_values("rank")["gene"] if g not in seen][:n_genes]  # a gene shows once
        out += [(str(dom), g) for g in fresh]
        seen.update(fresh)
    return out


def domain_genes(
    data: AnnData | SpatialData,
    *,
    n_genes: int = 3,
    kind: Literal["dotplot", "spatial"] = "dotplot",
    key: str = Key.uns.domain_genes,
    library_id: str | None = None,
    layer: str | None = None,
    ncols: int = 4,
    table_key: str = "table",
    image_key: str | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Show the domain genes found by :func:`histoclip.tl.domain_genes`.

    Parameters
    ----------
    data
        AnnData with ``uns["histoclip_domain_genes"]``, or a SpatialData object whose table ``table_key`` has it.
    n_genes
        Top genes per domain to show (``"dotplot"``); ``"spatial"`` maps the top gene of each domain.
    kind
        ``"dotplot"``: domains x genes, dot size the fraction of spots expressing the gene, colour the mean
        log-normalised expression scaled to [0, 1] per gene. ``"spatial"``: one panel per gene over the H&E image,
        on a colour scale shared by all panels (expression scaled to [0, 1] per gene).
    key
        Key of the table in ``uns``.
    library_id
        Library to draw (``"spatial"``), when there are several.
    layer
        Layer with raw counts.
    ncols
        Panels per row (``"spatial"``).
    table_key, image_key
        SpatialData only: the table, and the image drawn under the spots (``"spatial"``; default as in
        :func:`histoclip.pl.domains`).
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.

    """
    adata = get_table(data, table_key)
    if key not in adata.uns:
        raise KeyError(f"adata.uns[{key!r}] not found; run histoclip.tl.domain_genes(adata) first.")
    table = adata.uns[key]
    params = adata.uns.get(Key.uns.histoclip, {}).get("params", {}).get("domain_genes", {})
    groupby = params.get("groupby", Key.obs.domain)
    if kind not in ("dotplot", "spatial"):
        raise ValueError(f"kind must be 'dotplot' or 'spatial', got {kind!r}.")
    pairs = _top_genes(table, n_genes if kind == "dotplot" else 1)
    genes = [g for _, g in pairs]
    x = counts_matrix(adata, layer)
    idx = adata.var_names.get_indexer(genes)
    expr = np.asarray(log_normalize(x)[:, idx].todense())
    lo, hi = expr.min(axis=0), expr.max(axis=0)
    scaled = (expr - lo) / np.where(hi > lo, hi - lo, 1)
    if kind == "dotplot":
        labels = adata.obs[groupby].astype(str).to_numpy()
        domains = list(dict.fromkeys(table["domain"].astype(str)))
        mean = np.array([scaled[labels == d].mean(axis=0) for d in domains])
        frac = np.array([(expr[labels == d] > 0).mean(axis=0) for d in domains])
        fig, ax = plt.subplots(figsize=(0.45 * len(genes) + 2.5, 0.45 * len(domains) + 1.8))
        xx, yy = np.meshgrid(np.arange(len(genes)), np.arange(len(domains)))
        sc = ax.scatter(xx.ravel(), yy.ravel(), s=frac.ravel() * 180, c=mean.ravel(), cmap="Reds", vmin=0, vmax=1,
                        edgecolors="0.3", linewidths=0.3)
        ax.set_xticks(range(len(genes)), genes, rotation=90)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlim(-0.7, len(genes) - 0.3)
        ax.set_ylim(len(domains) - 0.5, -0.5)
        ax.set_ylabel(groupby)
        fig.colorbar(sc, ax=ax, label="mean expression (scaled)", shrink=0.6, pad=0.02)
        for f in (0.25, 0.5, 1.0):
            ax.scatter([], [], s=f * 180, c="0.6", label=f"{int(f * 100)}%")
        ax.legend(title="expressing", loc="upper left", bbox_to_anchor=(1.16, 1.0), frameon=False, labelspacing=1.1)
        ax.set_title("domain genes")
    else:
        spots = resolve(data, library_id=library_id, table_key=table_key,
                        image_key=plot_image_key(data, table_key, image_key))
        slide = spots.slides[0]
        n = len(genes)
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, min(ncols, n), figsize=(3.2 * min(ncols, n), 3.2 * nrows), squeeze=False)
        mappable = None
        for ax, (dom, g), j in zip(axes.ravel(), pairs, range(n), strict=False):
            mappable = draw_slide(ax, slide, scaled[slide.index, j], spot_diameter_um=_spot_um(spots, None),
                                  categorical=False, cmap="magma", vmin=0, vmax=1, alpha=1.0)
            ax.set_title(f"{g} (domain {dom})", fontsize=10)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.colorbar(mappable, ax=axes.ravel().tolist(), label="expression (scaled per gene)", shrink=0.6)
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    return fig
