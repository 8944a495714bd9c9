from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .._constants import Key
from .._utils import get_table
from ..pp._genes import counts_matrix, log_normalize
from ._utils import draw_slide, resolve_panels

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _top_genes(table, n_genes: int) -> list[tuple[str, str]]:
    """Top genes per domain, each gene once; over several sections, first by agreement across them, then rank."""
    out, seen = [], set()
    several = "section" in table.columns and table["section"].nunique() > 1
    for dom, df in table.groupby("domain", sort=False):
        if several:
            order = (df.groupby("gene", sort=False)
                     .agg(n=("n_sections_marker", "max"), rank=("rank", "mean"))
                     .sort_values(["n", "rank"], ascending=[False, True], kind="stable").index)
        else:
            order = df.sort_values("rank")["gene"]
        fresh = [g for g in order if g not in seen][:n_genes]  # a gene shows once
        out += [(str(dom), g) for g in fresh]
        seen.update(fresh)
    return out


def domain_genes(
    data: AnnData | SpatialData,
    *,
    n_genes: int = 3,
    kind: Literal["dotplot", "spatial"] = "dotplot",
    key: str = Key.uns.domain_genes,
    section: str | None = None,
    library_id: str | None = None,
    layer: str | None = None,
    ncols: int = 4,
    table_key: str = "table",
    image_key: str | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Show the domain genes found by :func:`histoclip.tl.domain_genes`.

    For a table ranked per section (``tl.domain_genes(..., section_key=...)``), the dotplot has one row per
    (domain, section), so a domain's markers can be compared across sections at a glance, and its genes are each
    domain's most consistent markers (on the most sections, then by mean rank); ``section=`` shows one section's
    ranking alone, as for a single slide.

    Parameters
    ----------
    data
        AnnData with ``uns["histoclip_domain_genes"]``, or a SpatialData object whose table ``table_key`` has it.
    n_genes
        Top genes per domain to show (``"dotplot"``); ``"spatial"`` maps the top gene of each domain.
    kind
        ``"dotplot"``: domains (or (domain, section) pairs) x genes, dot size the fraction of spots expressing the
        gene, colour the mean log-normalised expression of the row, scaled to [0, 1] per gene over the rows
        (scanpy's ``standard_scale="var"``); the genes stand in
        one block per domain, in the order of the rows, under a bracket labelled with the domain (as scanpy's
        ``rank_genes_groups_dotplot``), each gene once. ``"spatial"``:
        one panel per gene over the H&E image, on a colour scale shared by all panels (expression scaled to [0, 1]
        per gene).
    key
        Key of the table in ``uns``.
    section
        Per-section tables only: the section whose markers (and spots) to show. Required for ``"spatial"``.
    library_id
        Library to draw (``"spatial"``), when there are several (default: ``section``).
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
    per_section = "section" in table.columns
    section_key = params.get("section_key")
    in_section = np.ones(adata.n_obs, dtype=bool)
    if per_section:
        sections = list(dict.fromkeys(table["section"].astype(str)))
        if section_key is None or section_key not in adata.obs:
            raise KeyError(f"The table adata.uns[{key!r}] is per section, but its section column "
                           f"(uns['histoclip']['params']['domain_genes']['section_key'] = {section_key!r}) is not in "
                           "adata.obs; rerun histoclip.tl.domain_genes(adata, section_key=...).")
        if section is None and kind == "spatial":
            raise ValueError(f"adata.uns[{key!r}] ranks markers per section; pass section= (one of {sections}) to map "
                             "one section's genes.")
        if section is not None:
            if str(section) not in sections:
                raise KeyError(f"section {section!r} not in adata.uns[{key!r}]; sections: {sections}.")
            table = table[table["section"].astype(str) == str(section)]
            in_section = adata.obs[section_key].astype(str).to_numpy() == str(section)
    elif section is not None:
        raise ValueError(f"adata.uns[{key!r}] was ranked over all spots, not per section; rerun "
                         "histoclip.tl.domain_genes(adata, section_key=...) to pass section=.")
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
        if per_section and section is None:
            of = adata.obs[section_key].astype(str).to_numpy()
            done = set(zip(table["domain"].astype(str), table["section"].astype(str), strict=True))
            rows = [(f"{d} · {s}", (labels == d) & (of == s)) for d in domains for s in sections if (d, s) in done]
            ylabel = f"{groupby} · {section_key}"
        else:
            rows = [(d, (labels == d) & in_section) for d in domains]
            ylabel = groupby if section is None else f"{groupby} (section {section})"
        fig = _dotplot(genes, rows, expr, scaled, ylabel, blocks=_blocks(pairs))
        fig.axes[0].set_title("domain genes" if section is None else f"domain genes, section {section}", pad=30)
    else:
        library_key = params.get("library_key") or section_key
        lib = library_id if library_id is not None else section
        _, panels = resolve_panels(data, library_id=lib, library_key=library_key, img_key=None, spot_diameter_um=None,
                                   table_key=table_key, image_key=image_key)
        if len(panels) > 1:
            raise ValueError(f"The data hold {len(panels)} libraries {[p.slide.library_id for p in panels]}; pass "
                             "library_id= to map one.")
        slide, spot_um = panels[0].slide, panels[0].spot_diameter_um
        n = len(genes)
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, min(ncols, n), figsize=(3.2 * min(ncols, n), 3.2 * nrows), squeeze=False)
        mappable = None
        for ax, (dom, g), j in zip(axes.ravel(), pairs, range(n), strict=False):
            mappable = draw_slide(ax, slide, scaled[slide.index, j], spot_diameter_um=spot_um,
                                  categorical=False, cmap="magma", vmin=0, vmax=1, alpha=1.0)
            ax.set_title(f"{g} (domain {dom})", fontsize=10)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.colorbar(mappable, ax=axes.ravel().tolist(), label="expression (scaled per gene)", shrink=0.6)
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    return fig


def _blocks(pairs: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """The (domain, first column, last column) of each domain's run of genes in ``pairs``."""
    out: list[tuple[str, int, int]] = []
    for j, (dom, _) in enumerate(pairs):
        if out and out[-1][0] == dom:
            out[-1] = (dom, out[-1][1], j)
        else:
            out.append((dom, j, j))
    return out


def _dotplot(genes: list[str], rows: list[tuple[str, np.ndarray]], expr: np.ndarray, scaled: np.ndarray,
             ylabel: str, blocks: list[tuple[str, int, int]] | None = None) -> Figure:
    """Rows (label, spot mask) x genes: dot size the fraction expressing, colour the mean scaled expression.

    ``blocks`` groups the gene columns by domain, as scanpy's ``rank_genes_groups_dotplot`` does: a bracket over each
    domain's genes, labelled with the domain, and a thin line between blocks.
    """
    mean = np.array([expr[m].mean(axis=0) if m.any() else np.zeros(len(genes)) for _, m in rows])
    lo, hi = mean.min(axis=0), mean.max(axis=0)  # each gene's row means scaled to [0, 1] (scanpy's standard_scale)
    mean = (mean - lo) / np.where(hi > lo, hi - lo, 1)
    frac = np.array([(expr[m] > 0).mean(axis=0) if m.any() else np.zeros(len(genes)) for _, m in rows])
    names = [r for r, _ in rows]
    fig, ax = plt.subplots(figsize=(0.45 * len(genes) + 2.5 + 0.05 * max(map(len, names)), 0.45 * len(rows) + 1.8))
    xx, yy = np.meshgrid(np.arange(len(genes)), np.arange(len(rows)))
    sc = ax.scatter(xx.ravel(), yy.ravel(), s=frac.ravel() * 180, c=mean.ravel(), cmap="Reds", vmin=0, vmax=1,
                    edgecolors="0.3", linewidths=0.3)
    ax.set_xticks(range(len(genes)), genes, rotation=90)
    ax.set_yticks(range(len(rows)), names)
    ax.set_xlim(-0.7, len(genes) - 0.3)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_ylabel(ylabel)
    if blocks:
        import matplotlib.transforms as mtransforms

        trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        long = max(len(d) for d, _, _ in blocks) > 3
        for dom, a, b in blocks:
            ax.plot([a - 0.3, a - 0.3, b + 0.3, b + 0.3], [1.01, 1.03, 1.03, 1.01], transform=trans, color="0.2",
                    lw=0.8, clip_on=False)
            ax.text((a + b) / 2, 1.045, dom, transform=trans, ha="center" if not long else "left", va="bottom",
                    fontsize=9, rotation=45 if long else 0, rotation_mode="anchor")
            if a > 0:
                ax.axvline(a - 0.5, color="0.85", lw=0.6, zorder=0)
    fig.colorbar(sc, ax=ax, label="mean expression\n(scaled per gene)", shrink=0.6, pad=0.02)
    for f in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=f * 180, c="0.6", label=f"{int(f * 100)}%")
    ax.legend(title="expressing", loc="upper left", bbox_to_anchor=(1.16, 1.0), frameon=False, labelspacing=1.1)
    return fig
