from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from ..io._slide import resolve
from ..pp._patches import _spot_um
from ._utils import draw_slide, finish, get_ax, pick_slide, plot_image_key

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData


def image_weight(
    data: AnnData | SpatialData,
    *,
    key: str = Key.obs.image_weight,
    library_id: str | None = None,
    library_key: str | None = None,
    img_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.8,
    title: str | None = None,
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
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
        Which library to draw when the AnnData holds several.
    img_key
        Image to draw under the spots (default ``"hires"``, else ``"lowres"``).
    spot_diameter_um
        Physical spot diameter (default as in :func:`histoclip.pp.extract_patches`).
    table_key, image_key
        SpatialData only.
    cmap, alpha
        Colour map and opacity of the spots.
    vmin, vmax
        Ends of the colour scale (default: the smallest and largest weight on the slide; ``0`` and ``1`` compare
        slides on one scale).
    title
        Axes title.
    ax, save
        Axes to draw into and path to save to.

    Returns
    -------
    The :class:`matplotlib.axes.Axes`, with a colour bar of the weight.

    """
    spots = resolve(data, library_id=library_id, library_key=library_key, img_key=img_key,
                    spot_diameter_um=spot_diameter_um, table_key=table_key,
                    image_key=plot_image_key(data, table_key, image_key))
    adata = spots.adata
    if key not in adata.obs:
        raise KeyError(f"adata.obs[{key!r}] not found (columns: {list(adata.obs.columns)}); run "
                       "histoclip.tl.embed(data, model) with a model trained with its image branch first.")
    slide = pick_slide(spots, library_id)
    values = np.asarray(adata.obs[key], dtype=float)
    if not np.isfinite(values).all():
        raise ValueError(f"adata.obs[{key!r}] has NaN or inf values.")
    ax = get_ax(ax)
    mappable = draw_slide(ax, slide, values[slide.index], spot_diameter_um=_spot_um(spots, spot_diameter_um),
                          categorical=False, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha)
    ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label="weight of the image")
    ax.set_title(title if title is not None else f"image weight in the joint embedding ({slide.library_id})")
    finish(ax, save)
    return ax
