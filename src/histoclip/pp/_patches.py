"""Square patch boxes around spots, at a physical size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Key
from .._settings import logger
from .._utils import check_key_added, timed, write_results
from ..io._slide import SpotData, positive_number, resolve

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def patch_boxes(spots: SpotData, size_um: float) -> tuple[np.ndarray, dict[str, int]]:
    """Integer boxes ``[x0, y0, x1, y1)`` of side ``size_um`` centred on each spot, per slide's image pixels.

    The side in pixels is ``round(size_um / um_per_px)``; the box starts at ``round(centre - side / 2)``,
    so its centre is within half a pixel of the spot centre. Boxes may reach partly outside the image: the
    outside is padded when the patch is read (the count is logged). A box entirely outside the image is an
    error: it means the coordinates are not in that image's pixel frame (usually wrong scale factors).
    """
    boxes = np.zeros((spots.n_obs, 4), dtype=np.int64)
    sides: dict[str, int] = {}
    for s in spots.slides:
        side_f = size_um / s.um_per_px
        if not np.isfinite(side_f) or side_f < 1:
            raise ValueError(
                f"A {size_um} um patch is {side_f:.3g} pixels in image {s.img_key!r} of library {s.library_id!r} "
                f"({s.um_per_px:.3g} um per pixel): smaller than one pixel. Use a larger size_um or a "
                "higher-resolution image (img_key='hires' or 'fullres')."
            )
        if s.image is not None and side_f > max(s.image.height, s.image.width):
            raise ValueError(
                f"A {size_um} um patch is {side_f:.0f} pixels, larger than image {s.img_key!r} of library "
                f"{s.library_id!r} ({s.image.height}x{s.image.width} px). Use a smaller size_um."
            )
        side = max(1, int(round(side_f)))
        x0 = np.round(s.coords[:, 0] - side / 2.0).astype(np.int64)
        y0 = np.round(s.coords[:, 1] - side / 2.0).astype(np.int64)
        if s.image is not None:
            _check_inside(spots, s, x0, y0, side)
        boxes[s.index] = np.column_stack([x0, y0, x0 + side, y0 + side])
        sides[s.library_id] = side
    return boxes, sides


def _check_inside(spots: SpotData, s, x0: np.ndarray, y0: np.ndarray, side: int) -> None:
    """Raise when a patch lies entirely outside its image; log how many are padded at the edges."""
    h, w = s.image.height, s.image.width
    outside = (x0 + side <= 0) | (x0 >= w) | (y0 + side <= 0) | (y0 >= h)
    if outside.any():
        names = list(spots.adata.obs_names[s.index[outside]][:5])
        cx, cy = s.coords[outside][0]
        hint = (
            "The shapes' and the image's transformations do not align them: check them with "
            "spatialdata.transformations.get_transformation." if spots.source == "spatialdata" else
            f"obsm['spatial'] must be in full-resolution pixels and scalefactors['tissue_{s.img_key}_scalef'] must "
            "map them to this image: check the scale factors, or pass img_key= naming the image they belong to."
        )
        raise ValueError(
            f"{int(outside.sum())} of {len(x0)} spots of library {s.library_id!r} have their patch entirely outside "
            f"image {s.img_key!r} ({w}x{h} px, width x height; first: {names}, e.g. centre ({cx:.1f}, {cy:.1f}) px). "
            + hint + " Or drop the spots that lie outside the tissue image first."
        )
    partial = (x0 < 0) | (y0 < 0) | (x0 + side > w) | (y0 + side > h)
    if partial.any():
        logger.info("%d of %d patches of library %r reach past the image edge; the outside is padded with white.",
                    int(partial.sum()), len(x0), s.library_id)


def extract_patches(
    data: AnnData | SpatialData,
    *,
    size_um: float | None = None,
    img_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    key_added: str = Key.obsm.patch_box,
    copy: bool = False,
) -> AnnData | None:
    """Compute a square image patch around each spot, at a physical size.

    Only the patch boxes are computed and stored; pixels are read lazily, a batch at a time, when the model
    trains or embeds (:class:`histoclip.data.PatchDataset`), so a full-resolution slide never has to sit in
    memory. Spots near the image edge keep their patch: the part outside the image is padded with white. A spot
    whose patch lies entirely outside the image raises a :class:`ValueError` (its coordinates do not belong to
    this image: usually wrong scale factors).
    Patches are handed to the model as RGB uint8 whatever the image's dtype; see :mod:`histoclip.io._image`
    for the conversion (uint16 scaled by 1/257, floats in [0, 1] scaled by 255, grayscale repeated, alpha dropped).

    Parameters
    ----------
    data
        AnnData in the scanpy/squidpy layout (``obsm["spatial"]``, ``uns["spatial"]``) or a SpatialData object
        (from ``spatialdata_io.visium`` or ``spatialdata_io.visium_hd``); with SpatialData, results go to the table
        ``table_key``.
    size_um
        Side of the square patch in microns. Default: two spot diameters (130 um for Visium, 200 um for legacy ST:
        see ``spot_diameter_um``; for Visium HD bins two bin sides, 16 um for 8 um bins, which holds a few cells:
        pass a larger ``size_um`` for more tissue context).
    img_key
        AnnData only: which image in ``uns["spatial"][library_id]["images"]`` to cut from (``"hires"``,
        ``"lowres"``), or ``"fullres"`` for the file set with :func:`histoclip.io.set_fullres_image`.
        Default: ``"hires"`` if present, else ``"lowres"``.
    library_id
        AnnData only: the library in ``uns["spatial"]``, needed when it holds several and ``library_key`` is not given.
    library_key
        AnnData only: column of ``obs`` naming each spot's library, for AnnData objects holding several slides.
    spot_diameter_um
        Microns spanned by ``scalefactors["spot_diameter_fullres"]``, used with it to convert microns to pixels.
        Default: ``scalefactors["microns_per_pixel"]`` when present (Visium HD), else
        ``uns["spatial"][library_id]["metadata"]["spot_diameter_um"]``, else the platform inferred from the spot
        lattice (logged): a hexagonal grid is Visium, whose ``spot_diameter_fullres`` spans 65 um (Space Ranger's
        definition of a theoretical 65 um spot; Visium's spots are 55 um wide and 100 um apart); a square grid about
        twice ``spot_diameter_fullres`` apart is legacy ST (100 um spots, 200 um apart, the spacing setting the
        microns per pixel). A slide on no regular grid is read as Visium, with a warning.
    table_key, image_key, shapes_key, coordinate_system
        SpatialData only: the table, the image (default: the only one, or the one ending in ``hires_image``),
        the spot circles or Visium HD bin squares (default: the element the table annotates) and the coordinate
        system used to align them. Visium HD (``spatialdata_io.visium_hd``, one table per bin size): the 8 um bins
        ``"square_008um"`` unless another table is named (``"square_016um"``); 2 um bins are refused; patches are
        centred on the bin squares and microns come from the bin size (the square's side), so ``size_um`` keeps its
        meaning (see :doc:`/visium_hd`).
        A multiscale image (e.g. ``image_key="<id>_full_image"`` from ``spatialdata_io.visium(...,
        fullres_image_file=...)``) gets boxes in its full-resolution pixels; when patches are read, each comes from
        the coarsest pyramid level that still holds the model's patch size in pixels (a 32-pixel patch of a
        full-resolution slide is not decoded from level 0).
    key_added
        Key in ``obsm`` for the boxes; an existing entry histoclip did not write (e.g. ``"spatial"``) is never
        overwritten.
    copy
        Return a modified copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Sets

    - ``obsm["histoclip_patch_box"]``: ``(n_obs, 4)`` int64, ``[x0, y0, x1, y1)`` in pixels of the image used.
    - ``uns["histoclip"]["params"]["patches"]``: size in microns and pixels per library, image keys, microns per
      pixel, the platform of each library (``"visium"``, ``"st"``, ``"visium_hd"`` or ``"unknown"``) and the keys
      needed to find the image again.

    """
    if copy and not hasattr(data, "obsm"):
        raise ValueError("copy=True is only supported for AnnData input.")
    if size_um is not None:
        size_um = positive_number(size_um, "size_um", "Pass the side of the square patch in microns, e.g. 110.")
    spots = resolve(
        data,
        library_id=library_id,
        library_key=library_key,
        img_key=img_key,
        spot_diameter_um=spot_diameter_um,
        table_key=table_key,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=coordinate_system,
    )
    check_key_added(spots.adata, "obsm", key_added)
    if size_um is None:
        size_um = 2.0 * _spot_um(spots, spot_diameter_um)
    with timed("extract_patches"):
        boxes, sides = patch_boxes(spots, float(size_um))
    adata = spots.adata.copy() if copy else spots.adata
    params = {
        "size_um": float(size_um),
        "size_px": {k: int(v) for k, v in sides.items()},
        "um_per_px": {s.library_id: float(s.um_per_px) for s in spots.slides},
        "img_key": {s.library_id: s.img_key for s in spots.slides},
        "library_key": library_key,
        "library_id": library_id,
        "spot_diameter_um": spot_diameter_um,
        "platform": {s.library_id: s.platform for s in spots.slides},
        "key_added": key_added,
        "source": spots.source,
        **{k: v for k, v in spots.keys.items()},
    }
    write_results(adata, obsm={key_added: boxes}, params=("patches", params))
    return adata if copy else None


def _spot_um(spots: SpotData, spot_diameter_um: float | None) -> float:
    from ..io._slide import DEFAULT_SPOT_DIAMETER_UM

    if spot_diameter_um is not None:
        return float(spot_diameter_um)
    if spots.source == "spatialdata":  # Visium HD: the bin's side, named by the table or the shapes
        from ..io._slide import hd_bin_um

        b = hd_bin_um(spots.keys.get("table_key")) or hd_bin_um(spots.keys.get("shapes_key"))
        if b is not None:
            return b
    if spots.source == "anndata":
        spatial = spots.adata.uns.get(Key.uns.spatial, {})
        for s in spots.slides:
            entry = spatial.get(s.library_id, {})
            meta = entry.get("metadata", {}) or {}
            sf = entry.get("scalefactors", {}) or {}
            where = f"adata.uns['spatial'][{s.library_id!r}]"
            if "spot_diameter_um" in meta:
                return positive_number(meta["spot_diameter_um"], f"{where}['metadata']['spot_diameter_um']",
                                       "Fix it, or pass size_um=....")
            if "microns_per_pixel" in sf and "spot_diameter_fullres" in sf:
                fix = "Fix it, or pass size_um=...."
                return (positive_number(sf["microns_per_pixel"], f"{where}['scalefactors']['microns_per_pixel']", fix)
                        * positive_number(sf["spot_diameter_fullres"],
                                          f"{where}['scalefactors']['spot_diameter_fullres']", fix))
    for s in spots.slides:  # the platform inferred from the spot lattice (histoclip.io._platform)
        if np.isfinite(s.spot_diameter_um):
            return float(s.spot_diameter_um)
    return DEFAULT_SPOT_DIAMETER_UM


def patch_image_key(data, table_key: str = "table", image_key: str | None = None, *, strict: bool = True) -> str | None:
    """The SpatialData image the patch boxes in ``data`` were cut from (AnnData: ``image_key`` unchanged).

    :func:`extract_patches` records the image in ``uns["histoclip"]["params"]["patches"]["image_key"]`` of the
    table; training and embedding must read pixels from that image, since the boxes are in its pixel frame. Returns
    the recorded image; ``image_key`` when nothing is recorded. With ``strict``, an ``image_key`` that differs from
    the recorded one is a :class:`ValueError`, and so is naming none when the object holds several images and
    nothing is recorded; without ``strict`` the recorded image wins (a differing ``image_key`` is logged).
    """
    from ..io._slide import resolve_table_key

    table_key = resolve_table_key(data, table_key)
    if not (type(data).__name__ == "SpatialData" and hasattr(data, "tables")) or table_key not in data.tables:
        return image_key
    table = data.tables[table_key]
    recorded = table.uns.get(Key.uns.histoclip, {}).get("params", {}).get("patches", {}).get("image_key")
    recorded = None if recorded is None else str(recorded)
    if recorded is None:
        images = list(data.images.keys())
        if strict and image_key is None and len(images) > 1 and Key.obsm.patch_box in table.obsm:
            raise ValueError(
                f"SpatialData holds several images {images} and the patch boxes of table {table_key!r} do not record "
                "which one they were cut from; pass image_key=..., or rerun histoclip.pp.extract_patches(sdata, "
                "image_key=...) so that it is recorded."
            )
        return image_key
    if image_key is not None and image_key != recorded:
        if strict:
            raise ValueError(
                f"image_key={image_key!r}, but the patch boxes of table {table_key!r} were cut from image "
                f"{recorded!r}; leave image_key out to use {recorded!r}, or rerun histoclip.pp.extract_patches(sdata, "
                f"image_key={image_key!r}) first."
            )
        logger.warning("Using image %r, the one the patch boxes were cut from, not image_key=%r.", recorded, image_key)
    return recorded
