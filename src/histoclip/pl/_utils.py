from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection

from ..io._slide import Slide


def plot_image_key(data, table_key: str, image_key: str | None) -> str | None:
    """The image to draw under a SpatialData's spots: ``image_key``, else the one the patches were cut from."""
    if image_key is not None:
        return image_key
    from ..pp._patches import patch_image_key

    return patch_image_key(data, table_key, None, strict=False)


def get_ax(ax: Axes | None, figsize=(6, 6)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def finish(ax: Axes, save: str | Path | None) -> None:
    if save is not None:
        ax.figure.savefig(save, dpi=150, bbox_inches="tight")


def palette(categories: list[str], colors: list[str] | None = None) -> dict[str, str]:
    if colors is not None and len(colors) >= len(categories):
        return dict(zip(categories, colors, strict=False))
    cmap = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(categories)}


def draw_slide(
    ax: Axes,
    slide: Slide,
    values: np.ndarray,
    *,
    spot_diameter_um: float,
    categorical: bool,
    colors: dict | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.85,
    max_image_px: int = 1500,
    show_image: bool = True,
):
    """Draw ``slide``'s image (downsampled) and its spots as circles of their true size, coloured by ``values``."""
    scale = 1.0
    if show_image and slide.image is not None:
        thumb, scale = slide.image.thumbnail(max_image_px)
        ax.imshow(thumb, extent=(-0.5 * 1, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5))
    xy = slide.coords * scale
    d = spot_diameter_um / slide.um_per_px * scale if np.isfinite(slide.um_per_px) else 1.0
    if categorical:
        face = [colors.get(v, (0.8, 0.8, 0.8, 1.0)) for v in values]
        coll = EllipseCollection(np.full(len(xy), d), np.full(len(xy), d), np.zeros(len(xy)), units="xy",
                                 offsets=xy, offset_transform=ax.transData, facecolors=face, alpha=alpha,
                                 linewidths=0)
        ax.add_collection(coll)
        mappable = None
    else:
        coll = EllipseCollection(np.full(len(xy), d), np.full(len(xy), d), np.zeros(len(xy)), units="xy",
                                 offsets=xy, offset_transform=ax.transData, cmap=cmap, alpha=alpha, linewidths=0)
        coll.set_array(np.asarray(values, dtype=float))
        coll.set_clim(vmin, vmax)
        ax.add_collection(coll)
        mappable = coll
    pad = d * 2
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return mappable


def pick_slide(spots, library_id: str | None) -> Slide:
    """The slide to draw: the only one, or the one named ``library_id`` (required when there are several)."""
    if len(spots.slides) > 1 and library_id is None:
        raise ValueError(f"The data hold {len(spots.slides)} libraries; pass library_id= to choose one.")
    return spots.slides[0] if library_id is None else next(s for s in spots.slides if s.library_id == library_id)


def categories_of(series: pd.Series) -> list[str]:
    if isinstance(series.dtype, pd.CategoricalDtype):
        return [str(c) for c in series.cat.categories]
    return sorted({str(v) for v in series.dropna()})
