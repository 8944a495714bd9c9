from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection

from .._settings import logger
from ..io._slide import Slide, SpotData, library_has_image, resolve_regions, several_regions_key


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
    """Draw ``slide``'s image (downsampled) and its spots as circles of their true size, coloured by ``values``.

    Above :data:`RASTER_ABOVE` spots (Visium HD bins) the spots are drawn as one image instead (see
    :func:`_draw_raster`), which takes about a second for a million of them.
    """
    scale = 1.0
    if show_image and slide.image is not None:
        thumb, scale = slide.image.thumbnail(max_image_px)
        ax.imshow(thumb, extent=(-0.5 * 1, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5))
    xy = slide.coords * scale
    d = spot_diameter_um / slide.um_per_px * scale if np.isfinite(slide.um_per_px) else 1.0
    if len(xy) > RASTER_ABOVE:
        mappable = _draw_raster(ax, xy, d, values, categorical=categorical, colors=colors, cmap=cmap, vmin=vmin,
                                vmax=vmax, alpha=alpha, max_px=RASTER_PX)
    elif categorical:
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


RASTER_ABOVE = 50_000  # more spots than this are drawn as one image (Visium HD bins), fewer as circles
RASTER_PX = 2000  # the raster's longest side at most, in cells


def _draw_raster(ax: Axes, xy: np.ndarray, d: float, values: np.ndarray, *, categorical: bool, colors: dict | None,
                 cmap: str, vmin: float | None, vmax: float | None, alpha: float, max_px: int):
    """Draw many spots as one image: a grid of cells of one spot's size (coarser when that exceeds ``max_px``).

    Each cell takes the colour of the spot in it (categorical: the last spot drawn when several share a cell, the
    case only when the grid is coarser than the spots) or the mean of their values (continuous); empty cells are
    transparent. Time and memory grow with the spots plus the cells, so a million bins draw in about a second
    (``benchmarks/plot_speed.py``) where a million circles take minutes; saved figures stay small.
    Returns the image as the mappable for continuous values (for a colour bar), else ``None``.
    """
    x0, y0 = xy[:, 0].min() - d / 2, xy[:, 1].min() - d / 2
    span = max(xy[:, 0].max() + d / 2 - x0, xy[:, 1].max() + d / 2 - y0)
    cell = max(d, span / max_px)
    nx = int(np.ceil((xy[:, 0].max() + d / 2 - x0) / cell))
    ny = int(np.ceil((xy[:, 1].max() + d / 2 - y0) / cell))
    ix = np.clip(((xy[:, 0] - x0) / cell).astype(np.int64), 0, nx - 1)
    iy = np.clip(((xy[:, 1] - y0) / cell).astype(np.int64), 0, ny - 1)
    flat = iy * nx + ix
    extent = (x0, x0 + nx * cell, y0 + ny * cell, y0)
    if categorical:
        from matplotlib.colors import to_rgba

        codes, uniq = pd.factorize(pd.Series(np.asarray(values)))
        table = np.array([to_rgba((colors or {}).get(v, (0.8, 0.8, 0.8, 1.0))) for v in uniq] + [(0, 0, 0, 0)])
        table[:-1, 3] *= alpha
        codes = np.where(codes < 0, len(uniq), codes)  # missing values: transparent
        img = np.zeros((ny * nx, 4), dtype=np.float32)
        img[flat] = table[codes]
        ax.imshow(img.reshape(ny, nx, 4), extent=extent, origin="upper", interpolation="nearest")
        return None
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    sums = np.bincount(flat[ok], weights=v[ok], minlength=nx * ny)
    cnt = np.bincount(flat[ok], minlength=nx * ny)
    mean = np.divide(sums, cnt, out=np.full(nx * ny, np.nan), where=cnt > 0)
    return ax.imshow(mean.reshape(ny, nx), extent=extent, origin="upper", interpolation="nearest", cmap=cmap,
                     vmin=vmin, vmax=vmax, alpha=alpha)


def resolve_for_plot(data, **kwargs) -> SpotData:
    """Resolve ``data`` for a figure (:func:`histoclip.io.resolve`), with or without images.

    Slides with an image get it; slides without one are drawn on a blank background (logged), as squidpy's
    ``spatial_scatter`` does, with spot sizes still in microns. An AnnData without ``uns["spatial"]``, or whose
    libraries hold no image, is resolved without images (its microns from the scale factors, else the spot
    lattice); of two libraries, one with an image and one without, each is drawn as it is.
    """
    from dataclasses import replace

    from .._utils import is_spatialdata
    from ..io._slide import resolve

    if is_spatialdata(data):
        return resolve(data, **kwargs)
    img_key = kwargs.get("img_key")
    spatial = data.uns.get("spatial") if hasattr(data, "uns") else None
    entries = spatial if isinstance(spatial, Mapping) else {}
    with_image = {str(k) for k, v in entries.items() if library_has_image(v, img_key)}
    if entries and len(with_image) == len(entries):
        return resolve(data, **kwargs)  # every library has its image (errors as usual, e.g. a missing file)
    spots = resolve(data, **{**kwargs, "need_image": False})
    slides = []
    for sl in spots.slides:
        if sl.library_id in with_image:
            one = resolve(data, **{**kwargs, "library_key": None, "library_id": sl.library_id})
            sl = replace(sl, image=one.slides[0].image, coords=one.slides[0].coords[sl.index],
                         um_per_px=one.slides[0].um_per_px, img_key=one.slides[0].img_key)
        else:
            logger.info("Library %r has no image%s: its spots are drawn on a blank background.", sl.library_id,
                        "" if entries else " (no adata.uns['spatial'])")
        slides.append(sl)
    return SpotData(spots.adata, slides, spots.library_key, spots.source, spots.keys)


# ------------------------------------------------------------------------------------------ several sections
@dataclass
class Panel:
    """One library to draw: its slide (spots in its image's pixels) and the physical spot diameter."""

    slide: Slide
    spot_diameter_um: float


def _as_ids(library_id) -> list[str] | None:
    if library_id is None:
        return None
    if isinstance(library_id, str):
        return [library_id]
    if isinstance(library_id, Sequence) and all(isinstance(i, str) for i in library_id) and len(library_id) > 0:
        return list(library_id)
    raise TypeError(f"library_id must be a library id (str) or a non-empty list of them, got {library_id!r}.")


def _pick_ids(ids: list[str] | None, available: list[str], where: str) -> list[str]:
    if ids is None:
        return available
    missing = [i for i in ids if i not in available]
    if missing:
        raise KeyError(f"library_id {missing} not found; {where} has the libraries {available}.")
    if len(set(ids)) < len(ids):
        raise ValueError(f"library_id lists a library more than once: {ids}.")
    return ids


def resolve_panels(
    data,
    *,
    library_id: str | Sequence[str] | None,
    library_key: str | None,
    img_key: str | None,
    spot_diameter_um: float | None,
    table_key: str,
    image_key: str | Mapping[str, str] | None,
):
    """The table and the libraries to draw, one :class:`Panel` each, in order.

    AnnData: with ``library_key`` every library in that ``obs`` column (or those named by ``library_id``, in that
    order); without it the only library, or the one named ``library_id`` (as :func:`histoclip.io.resolve`).
    SpatialData: the shapes the table annotates; when it annotates several, one panel per region (its shapes key is
    the library id), each over an image that shares a coordinate system with its shapes.
    """
    from .._utils import get_table, is_spatialdata
    from ..io._slide import resolve
    from ..pp._patches import _spot_um

    ids = _as_ids(library_id)
    resolve_ad = resolve_for_plot
    if is_spatialdata(data):
        table = get_table(data, table_key)
        if several_regions_key(table) is not None:
            return table, _spatialdata_region_panels(data, table, ids, spot_diameter_um, table_key, image_key)
        if isinstance(image_key, Mapping):
            raise TypeError("image_key may be a mapping {region: image} only when the table annotates several regions.")
        spots = resolve(data, spot_diameter_um=spot_diameter_um, table_key=table_key,
                        image_key=plot_image_key(data, table_key, image_key))
        slides = [spots.slides[0]]
        if ids is not None:
            slides = [next(s for s in spots.slides if s.library_id == i)
                      for i in _pick_ids(ids, [s.library_id for s in spots.slides], f"table {table_key!r}")]
        return spots.adata, [Panel(s, _spot_um(spots, spot_diameter_um)) for s in slides]
    if isinstance(image_key, Mapping):
        raise TypeError("image_key (a mapping) is for SpatialData; for an AnnData pass img_key='hires' or 'lowres'.")
    if library_key is None:
        if ids is not None and len(ids) > 1:
            raise ValueError(
                f"library_id names {len(ids)} libraries; pass library_key=... naming the adata.obs column that says "
                "which library each spot belongs to, so that each panel draws only its own spots."
            )
        spots = resolve_ad(data, library_id=None if ids is None else ids[0], img_key=img_key,
                           spot_diameter_um=spot_diameter_um)
    else:
        spots = resolve_ad(data, library_key=library_key, img_key=img_key, spot_diameter_um=spot_diameter_um)
    by_id = {s.library_id: s for s in spots.slides}
    chosen = _pick_ids(ids, list(by_id), f"adata.obs[{library_key!r}]") if library_key is not None else list(by_id)
    panels = []
    for lib in chosen:
        one = SpotData(spots.adata, [by_id[lib]], library_key)
        panels.append(Panel(by_id[lib], _spot_um(one, spot_diameter_um)))
    return spots.adata, panels


def _spatialdata_region_panels(sdata, table, ids, spot_diameter_um, table_key, image_key) -> list[Panel]:
    """One panel per region of a table that annotates several: each resolved on its own shapes and image."""
    from spatialdata.transformations import get_transformation

    from ..pp._patches import _spot_um

    region_key = several_regions_key(table)
    regions = [str(r) for r in pd.unique(table.obs[region_key].astype(str))]
    chosen = _pick_ids(ids, regions, f"table {table_key!r} (column {region_key!r})")
    if isinstance(image_key, Mapping):
        unknown = sorted(set(image_key) - set(regions))
        if unknown:
            raise KeyError(f"image_key names regions {unknown} that table {table_key!r} does not annotate; "
                           f"regions: {regions}.")
    elif image_key is not None and len(chosen) > 1:
        raise ValueError(
            f"image_key={image_key!r} names one image, but {len(chosen)} regions are drawn ({chosen}); pass a mapping "
            "{region: image key}, or leave image_key out to draw each region over its own hires image."
        )
    recorded = plot_image_key(sdata, table_key, None)
    keys = {}
    for region in chosen:
        if region not in sdata.shapes:
            raise KeyError(f"Shapes {region!r} (annotated by table {table_key!r}) not found; shapes: "
                           f"{list(sdata.shapes.keys())}.")
        systems = set(get_transformation(sdata.shapes[region], get_all=True))
        images = {k: v for k, v in sdata.images.items() if systems & set(get_transformation(v, get_all=True))}
        key = image_key.get(region) if isinstance(image_key, Mapping) else image_key
        if key is None:
            key = _region_image(region, images, recorded)
        elif key not in images:
            raise KeyError(f"Image {key!r} shares no coordinate system with shapes {region!r}; images that do: "
                           f"{list(images)}.")
        keys[region] = key
    slides = resolve_regions(sdata, table_key, chosen, image_keys=keys, spot_diameter_um=spot_diameter_um)
    spot_um = _spot_um(SpotData(table, slides, None, "spatialdata"), spot_diameter_um)
    return [Panel(slide, spot_um) for slide in slides]


def _region_image(region: str, images: dict, recorded: str | None) -> str:
    """The image to draw a region over: the one the patches were cut from, the only one, or its hires image."""
    if recorded is not None and recorded in images:
        return recorded
    if len(images) == 1:
        return next(iter(images))
    hires = [k for k in images if "hires_image" in k]
    if len(hires) == 1:
        return hires[0]
    raise ValueError(
        f"Shapes {region!r} share a coordinate system with the images {list(images)}; pass image_key={{{region!r}: "
        "<one of them>, ...}} to choose the image of each region."
    )


def panel_axes(n: int, *, ncols: int, ax, panel_size: float = 4.5) -> list[Axes]:
    """``n`` axes for ``n`` panels: new ones in a grid of ``ncols`` columns, or the ones given in ``ax``."""
    if isinstance(ncols, bool) or not isinstance(ncols, int | np.integer) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}.")
    if ax is None:
        if n == 1:
            return [get_ax(None)]
        cols = min(int(ncols), n)
        rows = int(np.ceil(n / cols))
        fig, grid = plt.subplots(rows, cols, figsize=(panel_size * cols, panel_size * rows), squeeze=False)
        for extra in grid.ravel()[n:]:
            fig.delaxes(extra)
        return list(grid.ravel()[:n])
    if isinstance(ax, Axes):
        if n == 1:
            return [ax]
        raise ValueError(
            f"{n} libraries are drawn but ax= is one Axes; pass a list of {n} Axes (one per library, in order), "
            "library_id=... to draw one library, or leave ax out for a new figure with one panel per library."
        )
    axes = list(np.asarray(ax, dtype=object).ravel()) if not isinstance(ax, list | tuple) else list(ax)
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise ValueError(f"ax= must hold {n} matplotlib Axes (one per library drawn), got {len(axes)} items.")
    return axes


def category_handles(cats: list[str], colors: dict, labels: dict | None = None) -> list:
    """Legend handles: one round marker per category, in its colour."""
    from matplotlib.lines import Line2D

    labels = labels or {c: c for c in cats}
    return [Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor=colors[c], markeredgewidth=0,
                   label=labels[c]) for c in cats]
