"""Spot-sized tiles over the tissue of an H&E image with no spots (for prediction over a whole slide)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._settings import logger
from ..io._slide import resolve

if TYPE_CHECKING:
    from anndata import AnnData


def tissue_mask(rgb: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB uint8 image: optical density above a threshold (Otsu's by default).

    Stained tissue absorbs light while the glass background (white, grey or faintly pink) does not, so the
    optical density ``-log10((rgb + 1) / 256)`` averaged over channels separates them. Small gaps are closed and
    holes filled. Returns the boolean mask and the threshold used.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    od = -np.log10((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
    if threshold is None:
        threshold = float(threshold_otsu(od)) if np.ptp(od) > 0 else float(od.max()) + 1.0
    mask = ndimage.binary_closing(od > threshold, structure=np.ones((5, 5)), iterations=2)
    return ndimage.binary_fill_holes(mask), float(threshold)


def tile_grid(
    adata: AnnData,
    *,
    spacing_um: float | None = None,
    spot_diameter_um: float | None = None,
    library_id: str | None = None,
    img_key: str | None = None,
    min_tissue: float = 0.5,
    tissue_threshold: float | None = None,
    max_tiles: int = 1_000_000,
) -> AnnData:
    """Lay spot-sized tiles on a square grid over the tissue of a slide image.

    Gives an AnnData with no genes (only tile centres and the image), so that expression can be predicted
    and plotted over a whole H&E slide with :func:`histoclip.pp.extract_patches` and
    :func:`histoclip.tl.predict_expression`. Tissue is found by thresholding the optical density of a thumbnail
    (Otsu's threshold by default); a tile is kept when at least ``min_tissue`` of its area is tissue.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy layout whose ``uns["spatial"][library_id]`` holds the image and scale
        factors (the spots, if any, are ignored; ``obsm["spatial"]`` may be a placeholder).
    spacing_um
        Distance between tile centres in microns (default: two spot diameters, the legacy ST spacing).
    spot_diameter_um
        Spot diameter in microns (see :func:`histoclip.pp.extract_patches`).
    library_id, img_key
        The image to tile.
    min_tissue
        Smallest tissue fraction of a tile's area to keep it.
    tissue_threshold
        Optical-density threshold (default: Otsu's).
    max_tiles
        Refuse grids larger than this (a guard against a spacing given in the wrong unit).

    Returns
    -------
    A new AnnData with one row per tile: ``obsm["spatial"]`` (full-resolution pixels), ``obs["array_row"]``,
    ``obs["array_col"]``, ``obs["tissue_fraction"]``, a copy of ``uns["spatial"][library_id]``, and
    ``uns["histoclip"]["params"]["tile_grid"]``.

    """
    from anndata import AnnData

    from .._utils import write_results
    from ._patches import _spot_um

    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}.")
    spots = resolve(adata, library_id=library_id, img_key=img_key, spot_diameter_um=spot_diameter_um)
    if len(spots.slides) != 1:
        raise ValueError("tile_grid works on one library at a time; pass library_id=.")
    slide = spots.slides[0]
    diameter_um = _spot_um(spots, spot_diameter_um)
    spacing_um = 2.0 * diameter_um if spacing_um is None else float(spacing_um)
    if spacing_um <= 0:
        raise ValueError(f"spacing_um must be positive, got {spacing_um}.")
    step = spacing_um / slide.um_per_px  # in image pixels
    h, w = slide.image.shape
    n_est = (h / step) * (w / step)
    if n_est > max_tiles:
        raise ValueError(f"A {spacing_um} um grid gives ~{n_est:.0f} tiles, more than max_tiles={max_tiles}.")
    thumb, scale = slide.image.thumbnail(1024)
    mask, thr = tissue_mask(thumb, tissue_threshold)
    ys = np.arange(step / 2, h, step)
    xs = np.arange(step / 2, w, step)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    r = max(1, int(round(diameter_um / slide.um_per_px * scale / 2)))
    cy = np.clip(np.round(gy.ravel() * scale).astype(int), 0, mask.shape[0] - 1)
    cx = np.clip(np.round(gx.ravel() * scale).astype(int), 0, mask.shape[1] - 1)
    from scipy.ndimage import uniform_filter

    frac_map = uniform_filter(mask.astype(np.float32), size=2 * r + 1, mode="constant")
    frac = frac_map[cy, cx]
    keep = frac >= min_tissue
    if not keep.any():
        raise ValueError(
            f"No tile has at least {min_tissue:.0%} tissue (optical-density threshold {thr:.3f}); lower min_tissue or "
            "pass tissue_threshold=."
        )
    img_scalef = 1.0 if slide.img_key == "fullres" else float(
        adata.uns[Key.uns.spatial][slide.library_id]["scalefactors"][f"tissue_{slide.img_key}_scalef"])
    xy_full = np.column_stack([gx.ravel()[keep], gy.ravel()[keep]]) / img_scalef
    n = int(keep.sum())
    tiles = AnnData(
        X=np.zeros((n, 0), dtype=np.float32),
        obs=pd.DataFrame({"array_row": rows.ravel()[keep], "array_col": cols.ravel()[keep],
                          "tissue_fraction": frac[keep].astype(np.float32)},
                         index=[f"tile_{i}" for i in range(n)]),
    )
    tiles.obsm["spatial"] = xy_full
    import copy

    tiles.uns["spatial"] = {slide.library_id: copy.deepcopy(dict(adata.uns[Key.uns.spatial][slide.library_id]))}
    tiles.uns["spatial"][slide.library_id].setdefault("metadata", {})["spot_diameter_um"] = diameter_um
    write_results(tiles, params=("tile_grid", {"spacing_um": spacing_um, "spot_diameter_um": diameter_um,
                                              "min_tissue": min_tissue, "tissue_threshold": thr,
                                              "img_key": slide.img_key, "library_id": slide.library_id}))
    logger.info("tile_grid: %d tiles of %d on tissue (threshold %.3f)", n, keep.size, thr)
    return tiles
