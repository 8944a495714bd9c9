from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from .._constants import Key
from .._utils import categories_of, get_table
from ._utils import (
    RASTER_ABOVE,
    category_handles,
    draw_slide,
    finish,
    get_ax,
    palette,
    panel_axes,
    resolve_panels,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..model import HistoCLIP


def domains(
    data: AnnData | SpatialData,
    *,
    color: str = Key.obs.domain,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    img_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
    reference: str | None = None,
    alpha: float = 0.85,
    title: str | None = None,
    legend: bool = True,
    ncols: int = 3,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | Path | None = None,
) -> Axes | list[Axes]:
    """Draw spots coloured by a categorical ``obs`` column (by default the domains) over the H&E image.

    Spots are drawn as circles of their true physical size, aligned with the image through the scale factors
    (or, for SpatialData, the coordinate transformations). With several libraries (sections), each is drawn in its
    own panel over its own image, and a category has the same colour on every panel: categories and colours come
    from the whole ``obs`` column (and ``reference=`` matching from all spots), with one legend for the figure.
    A library without an image (no ``images`` in its ``uns["spatial"]`` entry, or no ``uns["spatial"]`` at all) is
    drawn on a blank background, its spots still at their size in microns (logged); every ``pl`` function that draws
    the slide does the same.

    Parameters
    ----------
    data
        AnnData (scanpy/squidpy layout) or SpatialData.
    color
        Categorical column of ``obs`` (of the table) to colour by; colours from ``uns[f"{color}_colors"]`` if set.
    library_id
        The library to draw, or a list of libraries (one panel each, in that order). Default: every library (with
        ``library_key``, or for a SpatialData table that annotates several regions), else the only one.
    library_key
        AnnData with several libraries: the ``obs`` column saying which library each spot belongs to (its values
        are keys of ``uns["spatial"]``).
    img_key
        Image to draw under the spots (default ``"hires"``, else ``"lowres"``).
    spot_diameter_um
        Spot diameter in microns, as in :func:`histoclip.pp.extract_patches`.
    table_key, image_key
        SpatialData only: the table (Visium HD: the 8 um bins ``"square_008um"`` unless another is named), and the
        image drawn under the spots (default: the one the patches were cut
        from, else the only one, or the one ending in ``hires_image``). When the table annotates several regions,
        each region (its shapes key is the library id) is drawn over an image sharing a coordinate system with its
        shapes (the one the patches were cut from, the only one, or the one whose name holds ``hires_image``);
        ``image_key`` may then be a mapping ``{region: image key}``.
    reference
        Categorical ``obs`` column to share colours with (e.g. the manual layers): each category of ``color`` is
        paired with the reference label it overlaps most, one to one (Hungarian matching over all spots, as in
        :func:`histoclip.tl.match_labels`), and drawn in that label's colour, the one
        ``hc.pl.domains(data, color=reference)`` uses; the legend names the pair (``"5 (L6)"``). Categories left
        without a partner get colours the reference does not use.
    alpha
        Opacity of the spots.
    title
        Axes title (default: the column name and the library); with several panels, the figure title (each panel
        is titled with its library).
    legend
        Draw a legend of the categories beside the axes (one for the whole figure with several panels).
    ncols
        Panels per row when several libraries are drawn.
    ax
        Axes to draw into (default: a new figure); with several libraries, a sequence of as many Axes.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.axes.Axes` when one library is drawn; a list of them (one per library, in the order
    drawn) when several are.

    """
    adata = get_table(data, table_key)
    if color not in adata.obs:
        raise KeyError(
            f"adata.obs[{color!r}] not found (columns: {list(adata.obs.columns)}); run histoclip.tl.domains first "
            "or pass color=."
        )
    if reference is not None and reference not in adata.obs:
        raise KeyError(f"adata.obs[{reference!r}] (reference=) not found; columns: {list(adata.obs.columns)}.")
    adata, panels = resolve_panels(data, library_id=library_id, library_key=library_key, img_key=img_key,
                                   spot_diameter_um=spot_diameter_um, table_key=table_key, image_key=image_key)
    axes = panel_axes(len(panels), ncols=ncols, ax=ax)
    series = adata.obs[color]
    cats = categories_of(series)
    labels = {c: c for c in cats}
    if reference is not None:
        colors, labels = _matched_colors(adata, color, reference)
    else:
        colors = palette(cats, list(adata.uns.get(f"{color}_colors", [])) or None)
    values = series.astype(str).to_numpy()
    for a, panel in zip(axes, panels, strict=True):
        draw_slide(a, panel.slide, values[panel.slide.index], spot_diameter_um=panel.spot_diameter_um,
                   categorical=True, colors=colors, alpha=alpha)
    if len(panels) == 1:
        ax0 = axes[0]
        if legend:
            ax0.legend(handles=category_handles(cats, colors, labels), title=color, loc="center left",
                       bbox_to_anchor=(1.01, 0.5), frameon=False)
        ax0.set_title(title if title is not None else f"{color} ({panels[0].slide.library_id})")
        finish(ax0, save)
        return ax0
    for a, panel in zip(axes, panels, strict=True):
        a.set_title(panel.slide.library_id)
    fig = axes[0].figure
    if legend:
        right = max(a.get_position().x1 for a in axes)  # beside the panels, not at the figure's far edge
        fig.legend(handles=category_handles(cats, colors, labels), title=color, loc="center left",
                   bbox_to_anchor=(right + 0.01, 0.5), frameon=False)
    fig.suptitle(title if title is not None else color)
    finish(axes[0], save)
    return axes


def _matched_colors(adata: AnnData, color: str, reference: str) -> tuple[dict, dict]:
    """Colours of ``color``'s categories taken from their Hungarian partners in ``reference``, and legend labels."""
    from ..tl._match import _extra_colors, hungarian_match

    ref_cats = categories_of(adata.obs[reference])
    ref_colors = palette(ref_cats, list(adata.uns.get(f"{reference}_colors", [])) or None)
    mapping = hungarian_match(adata.obs[color], adata.obs[reference])
    cats = categories_of(adata.obs[color])
    unmatched = [c for c in cats if c not in mapping]
    extra = dict(zip(unmatched, _extra_colors(len(unmatched), used=list(ref_colors.values())), strict=True))
    colors = {c: ref_colors[mapping[c]] if c in mapping else extra[c] for c in cats}
    labels = {c: f"{c} ({mapping[c]})" if c in mapping and mapping[c] != c else c for c in cats}
    return colors, labels


def embedding(
    data: AnnData | SpatialData,
    *,
    use_rep: str = Key.obsm.joint,
    color: str = Key.obs.domain,
    n_neighbors: int = 15,
    rng: int = 0,
    table_key: str = "table",
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    """UMAP of an embedding, coloured by a categorical ``obs`` column (domains, manual labels...).

    The UMAP is computed on a scratch object; ``adata`` is not modified.

    Parameters
    ----------
    data
        AnnData with ``obsm[use_rep]``, or a SpatialData object whose table ``table_key`` has it.
    use_rep
        Embedding to draw.
    color
        Categorical ``obs`` column.
    n_neighbors
        Neighbours of the UMAP graph.
    rng
        Seed of the UMAP layout.
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
    import anndata as ad
    import scanpy as sc

    adata = get_table(data, table_key)
    if use_rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{use_rep!r}] not found (obsm has {list(adata.obsm.keys())}); run histoclip.tl.embed."
        )
    if color not in adata.obs:
        raise KeyError(f"adata.obs[{color!r}] not found; columns: {list(adata.obs.columns)}.")
    tmp = ad.AnnData(np.zeros((adata.n_obs, 1), dtype=np.float32), obs=adata.obs[[color]].copy())
    tmp.obsm["X"] = np.asarray(adata.obsm[use_rep])
    with warnings.catch_warnings():  # umap and pynndescent import tqdm.auto, which warns in a notebook without
        warnings.filterwarnings("ignore", message="IProgress not found")  # ipywidgets; nothing is wrong
        sc.pp.neighbors(tmp, use_rep="X", n_neighbors=n_neighbors, random_state=rng)
        sc.tl.umap(tmp, random_state=rng)
    xy = tmp.obsm["X_umap"]
    series = adata.obs[color]
    cats = categories_of(series)
    colors = palette(cats, list(adata.uns.get(f"{color}_colors", [])) or None)
    ax = get_ax(ax)
    vals = series.astype(str).to_numpy()
    for c in cats:
        sel = vals == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colors[c], label=c, linewidths=0,
                   rasterized=len(xy) > RASTER_ABOVE)  # a saved figure of a million points stays small
    ax.legend(title=color, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=2.5)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{use_rep} coloured by {color}")
    finish(ax, save)
    return ax


def loss(model: HistoCLIP, *, ax: Axes | None = None, save: str | Path | None = None) -> Axes:
    """Training curve: the contrastive loss per epoch and its two directions.

    Parameters
    ----------
    model
        A trained :class:`~histoclip.model.HistoCLIP`.
    ax, save
        Axes to draw into and path to save to.

    Returns
    -------
    The :class:`matplotlib.axes.Axes`.

    """
    hist = pd.DataFrame(model.history)
    if hist.empty:
        raise RuntimeError("The model has no training history; call model.train() first.")
    ax = get_ax(ax, figsize=(5, 3.5))
    ax.plot(hist["epoch"], hist["loss"], color="black", lw=2, label="total")
    ax.plot(hist["epoch"], hist["image_to_expression"], lw=1, ls="--", label="image → expression")
    ax.plot(hist["epoch"], hist["expression_to_image"], lw=1, ls=":", label="expression → image")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("contrastive loss (InfoNCE)")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("training")
    finish(ax, save)
    return ax


__all__ = ["domains", "embedding", "loss"]
