from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from .._utils import get_table
from ._utils import draw_slide, finish, panel_axes, resolve_panels

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData


def image_weight(
    data: AnnData | SpatialData,
    *,
    key: str = Key.obs.image_weight,
    library_id: str | Sequence[str] | None = None,
    library_key: str | None = None,
    img_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.8,
    title: str | None = None,
    ncols: int = 3,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | Path | None = None,
) -> Axes | list[Axes]:
    """Draw, over the H&E image, how much the joint embedding of each spot relies on its image.

    The value is the fusion's per-spot weight of the image latent (``obs["histoclip_image_weight"]`` from
    :func:`histoclip.tl.embed`; the expression's weight is one minus it): high where morphology carries what the
    domains are made of (e.g. fat, stroma and tumour nests in a breast section), low where only expression tells spots
    apart (e.g. cortical layers on a low-resolution image).

    Parameters
    ----------
    data
        AnnData (scanpy/squidpy layout) or SpatialData with the weight in ``obs`` (of the table).
    key
        Column of ``obs`` with the weight.
    library_id, library_key
        Which libraries to draw, as in :func:`histoclip.pl.domains`: with several, one panel each, on one colour
        scale shared by all panels.
    img_key
        Image to draw under the spots (default ``"hires"``, else ``"lowres"``).
    spot_diameter_um
        Spot diameter in microns, as in :func:`histoclip.pp.extract_patches`.
    table_key, image_key
        SpatialData only (as in :func:`histoclip.pl.domains`).
    cmap, alpha
        Colour map and opacity of the spots.
    vmin, vmax
        Ends of the colour scale (default: the smallest and largest weight over the spots drawn, all panels
        together; ``0`` and ``1`` compare figures on one scale).
    title
        Axes title (with several panels, the figure title; each panel is titled with its library).
    ncols
        Panels per row when several libraries are drawn.
    ax
        Axes to draw into (default: a new figure); with several libraries, a sequence of as many Axes.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.axes.Axes`, with a colour bar of the weight; with several libraries, a list of them (one
    per library, in the order drawn) sharing one colour bar.

    """
    adata = get_table(data, table_key)
    if key not in adata.obs:
        raise KeyError(f"adata.obs[{key!r}] not found (columns: {list(adata.obs.columns)}); run "
                       "histoclip.tl.embed(data, model) with a model trained with its image branch first.")
    values = np.asarray(adata.obs[key], dtype=float)
    if not np.isfinite(values).all():
        raise ValueError(f"adata.obs[{key!r}] has NaN or inf values.")
    adata, panels = resolve_panels(data, library_id=library_id, library_key=library_key, img_key=img_key,
                                   spot_diameter_um=spot_diameter_um, table_key=table_key, image_key=image_key)
    axes = panel_axes(len(panels), ncols=ncols, ax=ax)
    drawn = np.concatenate([values[p.slide.index] for p in panels])
    vmin = float(drawn.min()) if vmin is None else vmin
    vmax = float(drawn.max()) if vmax is None else vmax
    mappable = None
    for a, panel in zip(axes, panels, strict=True):
        mappable = draw_slide(a, panel.slide, values[panel.slide.index], spot_diameter_um=panel.spot_diameter_um,
                              categorical=False, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha)
    default = "image weight in the joint embedding"
    if len(panels) == 1:
        ax0 = axes[0]
        ax0.figure.colorbar(mappable, ax=ax0, fraction=0.046, pad=0.02, label="weight of the image")
        ax0.set_title(title if title is not None else f"{default} ({panels[0].slide.library_id})")
        finish(ax0, save)
        return ax0
    for a, panel in zip(axes, panels, strict=True):
        a.set_title(panel.slide.library_id)
    fig = axes[0].figure
    fig.colorbar(mappable, ax=axes, fraction=0.046, pad=0.02, label="weight of the image")
    fig.suptitle(title if title is not None else default)
    finish(axes[0], save)
    return axes
