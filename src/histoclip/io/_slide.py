"""Resolve an AnnData (scanpy/squidpy layout) or a SpatialData object into spots on images.

Everything downstream sees a :class:`SpotData`: the table to read counts from and write results to,
and one :class:`Slide` per library with spot centres in the pixel frame of the chosen image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._settings import logger
from ._image import ImageSource, MultiscaleImageSource, open_image
from ._platform import NAMES, SPACING_UM, infer_platform

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData

DEFAULT_SPOT_DIAMETER_UM = Key.SPOT_DIAMETER_UM["visium"]
_SPOT_VALUES = "65 for Space Ranger output (Visium), 100 for legacy ST"
_SPOT_FIX = f"Pass the spot diameter in microns: {_SPOT_VALUES}."
_FULLRES_FIX = ("It is the spot diameter in full-resolution pixels: copy it from Space Ranger's "
                "spatial/scalefactors_json.json.")


@dataclass
class Slide:
    """One library: its image and its spots in that image's pixel frame."""

    library_id: str
    index: np.ndarray  # integer row positions of this library's spots in the table
    coords: np.ndarray  # (n, 2) float64 spot centres (x, y) in pixels of ``image``
    um_per_px: float  # microns per pixel of ``image``
    img_key: str
    image: ImageSource | None = None
    platform: str = "unknown"  # "visium", "st", "visium_hd" or "unknown" (see histoclip.io._platform)
    spot_diameter_um: float = float("nan")  # the platform's spot (bin) diameter in microns


@dataclass
class SpotData:
    """A table (AnnData) and its slides."""

    adata: AnnData
    slides: list[Slide]
    library_key: str | None = None
    source: str = "anndata"
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def n_obs(self) -> int:
        return self.adata.n_obs

    def coords(self) -> np.ndarray:
        """(n_obs, 2) spot centres in each slide's own image pixels (rows in table order)."""
        out = np.full((self.adata.n_obs, 2), np.nan)
        for s in self.slides:
            out[s.index] = s.coords
        return out

    def library_labels(self) -> np.ndarray:
        """The library id of each row of the table."""
        out = np.empty(self.adata.n_obs, dtype=object)
        for s in self.slides:
            out[s.index] = s.library_id
        return out


def _is_spatialdata(data: Any) -> bool:
    return type(data).__name__ == "SpatialData" and hasattr(data, "tables")


def resolve(
    data: AnnData | SpatialData,
    *,
    library_id: str | None = None,
    library_key: str | None = None,
    img_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    need_image: bool = True,
) -> SpotData:
    """Validate ``data`` and resolve it into a :class:`SpotData` without changing it."""
    if _is_spatialdata(data):
        return _resolve_spatialdata(
            data,
            table_key=table_key,
            image_key=image_key,
            shapes_key=shapes_key,
            coordinate_system=coordinate_system,
            spot_diameter_um=spot_diameter_um,
            need_image=need_image,
        )
    if not isinstance(data, AnnData):
        raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")
    return _resolve_anndata(
        data,
        library_id=library_id,
        library_key=library_key,
        img_key=img_key,
        spot_diameter_um=spot_diameter_um,
        need_image=need_image,
    )


def check_in_memory(adata: AnnData, what: str = "adata") -> None:
    """Raise a clear error for an AnnData opened in backed mode (``anndata.read_h5ad(path, backed="r")``)."""
    if getattr(adata, "isbacked", False):
        raise ValueError(
            f"{what} is opened in backed mode ({adata.filename}); histoclip reads counts and writes results in memory. "
            f"Load it first: {what} = {what}.to_memory() (or anndata.read_h5ad(path) without backed=)."
        )


def _check_unique(names: pd.Index, attr: str, noun: str, why: str, hint: str, what: str) -> None:
    """Raise ``ValueError`` naming the repeated entries of ``{what}.{attr}`` when it is not unique."""
    if names.is_unique:
        return
    dup = names[names.duplicated()]
    raise ValueError(
        f"{what}.{attr} has {len(dup)} duplicated {noun} (first: {list(pd.unique(dup)[:5])}); {why}, so names must "
        f"be unique. Run {what}.{attr}_make_unique() first ({hint})."
    )


def check_unique_var_names(adata: AnnData, what: str = "adata") -> None:
    """Raise a clear error when gene names repeat: genes are selected and matched by name."""
    _check_unique(adata.var_names, "var_names", "gene names", "genes are matched by name",
                  "scanpy.read_visium and spatialdata_io.visium do it unless told not to", what)


def check_counts_table(adata: AnnData, layer: str | None = None, what: str = "adata", *, values: bool = True) -> None:
    """Check a table counts can be read from: unique gene names and ``layer`` (if given) among its layers.

    With ``values``, also warn when the counts there are not integers (:func:`check_raw_counts`).
    """
    check_unique_var_names(adata, what)
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found; {what}.layers has {list(adata.layers.keys())}. Pass layer= naming the layer "
            "that holds raw counts, or layer=None for adata.X."
        )
    if values:
        check_raw_counts(adata, layer, what)


def _sample_values(x: Any, n: int = 200_000) -> np.ndarray:
    """Up to ``n`` stored non-zero values of a matrix (of its first 2000 rows when dense)."""
    import scipy.sparse as sp

    if x is None:
        return np.zeros(0)
    if sp.issparse(x):
        data = x.data if hasattr(x, "data") else sp.csr_matrix(x).data
        return np.asarray(data[:n], dtype=np.float64)
    arr = np.asarray(x[: min(x.shape[0], 2000)], dtype=np.float64).ravel()
    return arr[arr != 0][:n]


def _looks_like_counts(x: Any) -> bool:
    v = _sample_values(x)
    return v.size > 0 and bool(np.isfinite(v).all()) and v.min() >= 0 and bool(np.allclose(v, np.round(v), atol=1e-3))


def check_raw_counts(adata: AnnData, layer: str | None = None, what: str = "adata") -> None:
    """Warn when the counts histoclip reads (``X`` or ``layer``) are not integers: normalised or log-transformed.

    histoclip normalises raw counts itself (``log1p(counts / total * 1e4)``); counts normalised before are normalised
    twice. The warning names a layer (or ``adata.raw``) that holds integer counts, when there is one. Negative values
    are an error where the counts are read (:func:`histoclip.pp._genes.counts_matrix`).
    """
    x = adata.layers[layer] if layer is not None else adata.X
    v = _sample_values(x)
    if v.size == 0 or not np.isfinite(v).all() or v.min() < 0 or np.allclose(v, np.round(v), atol=1e-3):
        return
    where = f"{what}.layers[{layer!r}]" if layer is not None else f"{what}.X"
    frac = float(np.mean(np.abs(v - np.round(v)) > 1e-3))
    counts_layers = [k for k in adata.layers if k != layer and _looks_like_counts(adata.layers[k])]
    if counts_layers:
        fix = f"{what}.layers[{counts_layers[0]!r}] holds integer counts: pass layer={counts_layers[0]!r}."
    elif layer is not None and _looks_like_counts(adata.X):
        fix = f"{what}.X holds integer counts: pass layer=None."
    elif adata.raw is not None and adata.raw.shape == adata.shape and _looks_like_counts(adata.raw.X):
        fix = (f"{what}.raw holds integer counts: use them, e.g. {what}.layers['counts'] = {what}.raw.X.copy(), then "
               "pass layer='counts'.")
    else:
        fix = ("Keep the raw counts (e.g. adata.layers['counts'] = adata.X.copy() before sc.pp.normalize_total / "
               "sc.pp.log1p, or read them again from Space Ranger's filtered_feature_bc_matrix.h5) and pass "
               "layer='counts'.")
    logger.warning(
        "%s is not integer counts (%.0f%% of the values in a sample are fractional, max %.3g): it looks normalised or "
        "log-transformed. histoclip normalises raw counts itself, so these would be normalised twice. %s",
        where, 100 * frac, float(v.max()), fix)


def check_unique_obs_names(adata: AnnData, what: str = "adata") -> None:
    """Raise a clear error when spot names repeat: results are written by name and would be ambiguous."""
    _check_unique(adata.obs_names, "obs_names", "spot names", "results are stored per spot",
                  "after concatenating sections, anndata.concat(..., index_unique='-') does the same", what)


# --------------------------------------------------------------------------------------------------- AnnData
def check_spatial(adata: AnnData) -> np.ndarray:
    """Return ``obsm["spatial"]`` as float64 (n, 2) or raise a clear error."""
    if adata.n_obs == 0:
        raise ValueError("The AnnData is empty (0 spots); nothing to do.")
    if Key.obsm.spatial not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{Key.obsm.spatial!r}] with spot coordinates was not found; obsm has "
            f"{list(adata.obsm.keys())}. Read the slide with scanpy.read_visium / squidpy.read.visium or "
            "spatialdata_io.visium, or set adata.obsm['spatial'] to (x, y) full-resolution pixel coordinates."
        )
    try:
        xy = np.asarray(adata.obsm[Key.obsm.spatial], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"adata.obsm['spatial'] must hold numbers (x, y in pixels): {err}") from err
    if xy.ndim != 2 or xy.shape[1] != 2:
        extra = (
            " With 3 columns (x, y, z?) or more, histoclip cannot tell which two are the x and y of the image: set "
            "adata.obsm['spatial'] to those two columns, e.g. adata.obsm['spatial'] = adata.obsm['spatial'][:, :2], "
            "after checking that they are (x, y) in full-resolution pixels." if xy.ndim == 2 and xy.shape[1] > 2 else ""
        )
        raise ValueError(f"adata.obsm['spatial'] must have shape (n_obs, 2): (x, y) per spot, got {xy.shape}.{extra}")
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        names = list(adata.obs_names[bad][:5])
        raise ValueError(
            f"adata.obsm['spatial'] has {int(bad.sum())} spots with NaN/inf coordinates (first: {names}); "
            "remove them first, e.g. adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy()."
        )
    return xy


def _library_rows(adata: AnnData, libs: list[str], library_id: str | None, library_key: str | None):
    """Map each library to the row positions that belong to it."""
    if library_key is not None and library_id is not None:
        raise ValueError(
            f"Pass library_key ({library_key!r}: every library of the AnnData) or library_id ({library_id!r}: the only "
            "library of the AnnData), not both. To use one library of several, subset first: "
            f"adata = adata[adata.obs[{library_key!r}] == {library_id!r}].copy(), then pass library_id={library_id!r}."
        )
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"library_key {library_key!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}."
            )
        labels = adata.obs[library_key].astype(str).to_numpy()
        present = list(pd.unique(labels))
        if library_id is not None:
            present = [library_id]
        missing = [lib for lib in present if lib not in libs]
        if missing and libs:
            raise KeyError(
                f"Libraries {missing} from adata.obs[{library_key!r}] have no entry in adata.uns['spatial']; "
                f"it has {libs}."
            )
        return {lib: np.flatnonzero(labels == lib) for lib in present}
    if library_id is not None:
        if libs and library_id not in libs:
            raise KeyError(f"library_id {library_id!r} is not in adata.uns['spatial']; choose one of {libs}.")
        return {library_id: np.arange(adata.n_obs)}
    if len(libs) == 1:
        return {libs[0]: np.arange(adata.n_obs)}
    raise ValueError(
        f"adata.uns['spatial'] holds {len(libs)} libraries {libs}; pass library_id=... for one of them, or "
        "library_key=... naming the adata.obs column that says which library each spot belongs to."
    )


def _pick_img_key(lib: str, images: dict, img_key: str | None, meta: dict) -> str:
    available = list(images) + (["fullres"] if "fullres_image" in meta else [])
    if img_key is None:
        for cand in ("hires", "lowres"):
            if cand in images:
                return cand
        if available:
            return available[0]
        raise KeyError(
            f"Library {lib!r} has no image in adata.uns['spatial'][{lib!r}]['images'] and no full-resolution file; "
            "add one, e.g. with histoclip.io.set_fullres_image(adata, path)."
        )
    if img_key not in available:
        raise KeyError(f"Image {img_key!r} not found for library {lib!r}; available: {available}.")
    return img_key


def _fullres_path(meta: dict, lib: str) -> Path:
    path = Path(str(meta["fullres_image"]))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"The full-resolution image of library {lib!r} ({str(path)!r}) was not found; point to it with "
        "histoclip.io.set_fullres_image(adata, path, library_id=...)."
    )


def positive_number(value: Any, what: str, fix: str) -> float:
    """``value`` as a positive finite float, or a clear error naming ``what`` and how to ``fix`` it."""
    if isinstance(value, bool | str | bytes) or value is None:
        raise TypeError(f"{what} must be a positive number, got {value!r} ({type(value).__name__}). {fix}")
    try:
        v = float(np.asarray(value).item()) if np.ndim(value) == 0 else None
    except (TypeError, ValueError):
        v = None
    if v is None:
        raise TypeError(f"{what} must be a positive number, got {value!r} ({type(value).__name__}). {fix}")
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a positive, finite number, got {v}. {fix}")
    return v


def _um_per_fullres_px(scalefactors: dict, meta: dict, spot_diameter_um: float | None, lib: str,
                       xy: np.ndarray | None = None) -> float:
    """Microns per full-resolution pixel of library ``lib`` (see :func:`_fullres_scale`)."""
    return _fullres_scale(scalefactors, meta, spot_diameter_um, lib, xy)[0]


def _fullres_scale(scalefactors: dict, meta: dict, spot_diameter_um: float | None, lib: str,
                   xy: np.ndarray | None = None, array: np.ndarray | None = None) -> tuple[float, str, float]:
    """Microns per full-resolution pixel, the platform and its spot diameter in microns, for library ``lib``.

    ``spot_diameter_um=`` wins, then ``scalefactors["microns_per_pixel"]`` (Visium HD), then
    ``metadata["spot_diameter_um"]``; with none of them, the platform is inferred from the spot lattice ``xy`` and
    ``spot_diameter_fullres`` (:func:`histoclip.io._platform.infer_platform`): logged, and a warning when it is a
    guess.
    """
    where = f"adata.uns['spatial'][{lib!r}]"
    if spot_diameter_um is None and "microns_per_pixel" in scalefactors:
        um = positive_number(scalefactors["microns_per_pixel"], f"{where}['scalefactors']['microns_per_pixel']",
                             "Fix it from the Space Ranger scalefactors_json.json, or pass spot_diameter_um=....")
        fullres = scalefactors.get("spot_diameter_fullres")
        bin_um = um * float(fullres) if isinstance(fullres, int | float) and fullres > 0 else float("nan")
        return um, "visium_hd", bin_um
    if spot_diameter_um is None and "spot_diameter_um" not in meta and xy is not None:
        fullres = scalefactors.get("spot_diameter_fullres")
        if fullres is not None:
            positive_number(fullres, f"{where}['scalefactors']['spot_diameter_fullres']",
                            _FULLRES_FIX)
        p = infer_platform(xy, scalefactors, meta, array)
        _log_platform(lib, p.how, p.guess)
        return p.um_per_unit, p.name, p.spot_diameter_um
    if "spot_diameter_fullres" not in scalefactors:
        raise KeyError(
            f"adata.uns['spatial'][{lib!r}]['scalefactors'] has no 'spot_diameter_fullres' (keys: "
            f"{list(scalefactors)}), so microns cannot be converted to pixels; add it."
        )
    if spot_diameter_um is None:
        spot_diameter_um = positive_number(meta.get("spot_diameter_um", DEFAULT_SPOT_DIAMETER_UM),
                                           f"{where}['metadata']['spot_diameter_um']",
                                           f"Fix it, or pass spot_diameter_um=... ({_SPOT_VALUES}).")
    else:
        spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um",
                                           _SPOT_FIX)
    fullres = positive_number(scalefactors["spot_diameter_fullres"],
                              f"{where}['scalefactors']['spot_diameter_fullres']",
                              _FULLRES_FIX)
    platform = _given_platform(spot_diameter_um)
    if xy is not None:
        platform = _check_spot_spacing(xy, spot_diameter_um / fullres, spot_diameter_um, fullres, lib) or platform
    return spot_diameter_um / fullres, platform, spot_diameter_um


def _check_spot_spacing(xy: np.ndarray, um_per_px: float, spot_diameter_um: float, fullres: float,
                        lib: str) -> str | None:
    """Warn when a given spot diameter puts the spots of a regular grid implausibly close or far apart.

    Returns the platform the lattice shows (``"visium"``, ``"st"``), or ``None`` when it shows none.

    Visium's hexagonal grid is 100 um apart and legacy ST's square grid 200 um; a spot diameter off by a large factor
    (a unit mistake) moves every micron setting (the smoothing radius, the model's context, the patch size) by as much.
    """
    from ._platform import spot_lattice

    lat = spot_lattice(xy)
    ratio = lat.spacing / fullres if lat.kind != "irregular" else float("nan")
    if lat.kind == "hexagonal":
        expected, name = SPACING_UM["visium"], "Visium"
    elif lat.kind == "square" and 1.5 <= ratio <= 3.5:
        expected, name = SPACING_UM["st"], "legacy ST"
    else:
        return None
    platform = "visium" if lat.kind == "hexagonal" else "st"
    spacing_um = lat.spacing * um_per_px
    if 0.5 <= spacing_um / expected <= 2.0:
        return platform
    right = spot_diameter_um * expected / spacing_um
    logger.warning(
        "Library %r: a spot diameter of %g um puts neighbouring spots %.0f um apart, but the spots lie on a %s grid "
        "(%s), whose spots are %g um apart; micron settings (radius_um, context_um, the patch size) would find %s. "
        "Check spot_diameter_um (or metadata['spot_diameter_um']): %.3g would give %g um.",
        lib, spot_diameter_um, spacing_um, lat.kind, name, expected,
        "no neighbours" if spacing_um > expected else "far too many neighbours", right, expected)
    return platform


def _given_platform(spot_diameter_um: float) -> str:
    """The platform a spot diameter given by the user stands for (recorded only)."""
    for name, um in Key.SPOT_DIAMETER_UM.items():
        if np.isclose(spot_diameter_um, um):
            return name
    return "unknown"


def _log_platform(lib: str, how: str, guess: bool) -> None:
    if guess:
        logger.warning("Library %r: %s. This is a guess: pass spot_diameter_um= (%s) if it is wrong.", lib, how,
                       _SPOT_VALUES)
    else:
        logger.info("Library %r: %s (pass spot_diameter_um= to override).", lib, how)


def _scale_without_scalefactors(xy: np.ndarray, spot_diameter_um: float | None, lib: str) -> tuple[float, str, float]:
    """Microns per unit of ``obsm["spatial"]`` when there is no ``uns["spatial"]``: from the spot lattice alone."""
    try:
        p = infer_platform(xy)
    except ValueError as err:
        raise ValueError(
            f"{err} Or fill adata.uns['spatial'][{lib!r}] = {{'scalefactors': {{'spot_diameter_fullres': ...}}}}."
        ) from None
    if spot_diameter_um is None:
        _log_platform(lib, p.how + " (no adata.uns['spatial'])", p.guess)
        return p.um_per_unit, p.name, p.spot_diameter_um
    spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um", _SPOT_FIX)
    spacing_um = spot_diameter_um * SPACING_UM.get(p.name, SPACING_UM["visium"]) / p.spot_diameter_um
    um = spacing_um / p.lattice.spacing
    logger.info("Library %r: no adata.uns['spatial']; %s spots of %g um on a %s grid %.4g units apart: %.4g um per "
                "unit.", lib, NAMES[p.name], spot_diameter_um, p.lattice.kind, p.lattice.spacing, um)
    return um, p.name, spot_diameter_um


def library_has_image(entry: Any, img_key: str | None = None) -> bool:
    """Whether one ``uns["spatial"][library]`` entry holds an image to draw (``img_key``'s, or any)."""
    if not isinstance(entry, Mapping):
        return False
    images = dict(entry.get("images", {}) or {})
    meta = dict(entry.get("metadata", {}) or {})
    available = [k for k, v in images.items() if v is not None and np.size(v) > 0]
    available += ["fullres"] if "fullres_image" in meta else []
    return bool(available) if img_key is None else img_key in available


def _resolve_anndata(
    adata: AnnData,
    *,
    library_id: str | None,
    library_key: str | None,
    img_key: str | None,
    spot_diameter_um: float | None,
    need_image: bool,
) -> SpotData:
    check_in_memory(adata)
    xy = check_spatial(adata)
    check_unique_obs_names(adata)
    spatial = adata.uns.get(Key.uns.spatial, {})
    libs = [str(k) for k in spatial] if isinstance(spatial, dict) else []
    if not libs:
        if need_image:
            raise KeyError(
                "adata.uns['spatial'] with the slide image and scale factors was not found. Read the slide with "
                "scanpy.read_visium / squidpy.read.visium (or spatialdata_io.visium and pass the SpatialData object), "
                "or fill adata.uns['spatial'][library_id] = {'images': {...}, 'scalefactors': {...}}."
            )
        if library_key is not None:
            rows = _library_rows(adata, [], None, library_key)
        else:
            rows = {library_id or "library": np.arange(adata.n_obs)}
        slides = []
        for lib, idx in rows.items():
            um, platform, spot_um = _scale_without_scalefactors(xy[idx], spot_diameter_um, lib)
            slides.append(Slide(lib, idx, xy[idx], um, "none", None, platform, spot_um))
        return SpotData(adata, slides, library_key)
    rows = _library_rows(adata, libs, library_id, library_key)
    slides = []
    for lib, idx in rows.items():
        entry = spatial[lib]
        images = dict(entry.get("images", {}) or {})
        meta = dict(entry.get("metadata", {}) or {})
        scalefactors = dict(entry.get("scalefactors", {}) or {})
        array = adata.obs[["array_row", "array_col"]].to_numpy()[idx] if {"array_row", "array_col"} <= set(
            adata.obs.columns) else None
        um_full, platform, spot_um = _fullres_scale(scalefactors, meta, spot_diameter_um, lib, xy[idx], array)
        if not need_image and img_key is None and not images:
            slides.append(Slide(lib, idx, xy[idx], um_full, "fullres", None, platform, spot_um))
            continue
        key = _pick_img_key(lib, images, img_key, meta)
        if key == "fullres":
            scalef = 1.0
        else:
            sf_name = f"tissue_{key}_scalef"
            if sf_name not in scalefactors:
                raise KeyError(
                    f"adata.uns['spatial'][{lib!r}]['scalefactors'] has no {sf_name!r} (keys: {list(scalefactors)})."
                )
            scalef = positive_number(scalefactors[sf_name],
                                     f"adata.uns['spatial'][{lib!r}]['scalefactors'][{sf_name!r}]",
                                     "It maps full-resolution pixels to this image: copy it from Space Ranger's "
                                     "spatial/scalefactors_json.json.")
        image = None
        if need_image:
            if key == "fullres":
                image = open_image(_fullres_path(meta, lib))
            else:
                arr = images[key]
                image = ImageSource(arr, layout="yx" if np.ndim(arr) == 2 else "yxc", name=f"{lib}/{key}")
        slides.append(Slide(lib, idx, xy[idx] * scalef, um_full / scalef, key, image, platform, spot_um))
    return SpotData(adata, slides, library_key)


def set_fullres_image(adata: AnnData, path: str | Path, *, library_id: str | None = None) -> None:
    """Record the path of a full-resolution image file so patches can be cut from it (``img_key="fullres"``).

    The image stays on disk: TIFFs are memory-mapped, other formats are decoded once into a memory-mapped
    cache (see :func:`histoclip.io.open_image`).

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy layout whose ``obsm["spatial"]`` is in the pixel frame of this image.
    path
        Path of the image file.
    library_id
        Library in ``adata.uns["spatial"]``; may be omitted when there is only one.

    Returns
    -------
    Nothing; sets ``adata.uns["spatial"][library_id]["metadata"]["fullres_image"]`` to the absolute path.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    spatial = adata.uns.get(Key.uns.spatial)
    if not spatial:
        raise KeyError("adata.uns['spatial'] was not found; it must hold the library and its scale factors.")
    libs = list(spatial)
    if library_id is None:
        if len(libs) != 1:
            raise ValueError(f"adata.uns['spatial'] holds several libraries {libs}; pass library_id=....")
        library_id = libs[0]
    if library_id not in spatial:
        raise KeyError(f"library_id {library_id!r} is not in adata.uns['spatial']; choose one of {libs}.")
    spatial[library_id].setdefault("metadata", {})["fullres_image"] = str(path.resolve())


# ------------------------------------------------------------------------------------------------ SpatialData
DEFAULT_HD_TABLE = "square_008um"
_HD_BIN = re.compile(r"(?:^|_)square_(\d{3})um$")
_HD_MIN_BIN_UM = 8.0
_HD_LOGGED: set[int] = set()


def hd_bin_um(name: str | None) -> float | None:
    """The bin size in microns named by a Visium HD table or shapes key (``square_008um``, ``<id>_square_016um``)."""
    m = _HD_BIN.search(str(name)) if name is not None else None
    return float(m.group(1)) if m else None


def resolve_table_key(data: Any, table_key: str = "table") -> str:
    """The table of a SpatialData that histoclip reads and writes, with the Visium HD default and checks.

    ``spatialdata_io.visium_hd`` writes one table per bin size (``square_002um``, ``square_008um``,
    ``square_016um``) and no ``"table"``: when ``table_key`` is the default ``"table"`` and there is no such table,
    the 8 um bins (``"square_008um"``) are used, the size Space Ranger and 10x's own analyses default to (pass
    ``table_key="square_016um"`` for 16 um bins). 2 um bins are refused: with a few counts each they are the input of
    cell segmentation (bin2cell, Space Ranger's ``segmented_outputs``), not spots to train on or cluster.
    Anything else (an AnnData; a SpatialData with a table ``table_key``) is returned unchanged.
    """
    if not _is_spatialdata(data):
        return table_key
    tables = list(data.tables.keys())
    bins = {k: hd_bin_um(k) for k in tables if hd_bin_um(k) is not None}
    if table_key == "table" and "table" not in data.tables and bins:
        if DEFAULT_HD_TABLE not in data.tables:
            usable = [k for k, b in bins.items() if b >= _HD_MIN_BIN_UM]
            raise KeyError(
                f"SpatialData has the Visium HD tables {list(bins)} but not the 8 um bins {DEFAULT_HD_TABLE!r}, "
                f"histoclip's default; pass table_key= naming one of {usable or list(bins)} (read the 8 um bins "
                "with spatialdata_io.visium_hd(path, bin_size=[8, 16]))."
            )
        if id(data) not in _HD_LOGGED:
            _HD_LOGGED.add(id(data))
            logger.info("Visium HD: using the 8 um bins (table %r, the default); pass table_key='square_016um' for "
                        "16 um bins.", DEFAULT_HD_TABLE)
        table_key = DEFAULT_HD_TABLE
    b = bins.get(table_key)
    if b is not None and b < _HD_MIN_BIN_UM:
        larger = [k for k, v in bins.items() if v >= _HD_MIN_BIN_UM]
        raise ValueError(
            f"Table {table_key!r} holds Visium HD bins of {b:g} um. Bins below {_HD_MIN_BIN_UM:g} um carry a few "
            "counts each and are the input of cell segmentation (bin2cell, or Space Ranger's segmented_outputs), "
            "not spots for histoclip; they are refused rather than aggregated here, because Space Ranger already "
            f"writes the aggregates. Use the 8 um bins (table_key={DEFAULT_HD_TABLE!r}, the default) or 16 um "
            f"(table_key='square_016um'){'; this object has ' + str(larger) if larger else ''}, or segment cells "
            "first and pass that table."
        )
    return table_key


def _affine(element: Any, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    return np.asarray(get_transformation(element, to_coordinate_system=cs).to_affine_matrix(("x", "y"), ("x", "y")))


def _coordinate_systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True))


def _resolve_spatialdata(
    sdata: SpatialData,
    *,
    table_key: str,
    image_key: str | None,
    shapes_key: str | None,
    coordinate_system: str | None,
    spot_diameter_um: float | None,
    need_image: bool,
) -> SpotData:
    table_key = resolve_table_key(sdata, table_key)
    tables = list(sdata.tables.keys())
    if table_key not in sdata.tables:
        raise KeyError(
            f"SpatialData has no table {table_key!r}; tables: {tables}. Pass table_key=..., or add the counts with "
            "sdata.tables['table'] = spatialdata.models.TableModel.parse(adata, region=..., region_key=..., "
            "instance_key=...)."
        )
    table = sdata.tables[table_key]
    if table.n_obs == 0:
        raise ValueError(f"Table {table_key!r} is empty (0 rows); nothing to do.")
    check_in_memory(table, f"sdata.tables[{table_key!r}]")
    check_unique_obs_names(table, f"sdata.tables[{table_key!r}]")
    attrs = table.uns.get("spatialdata_attrs", {})
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or region_key is None or instance_key is None:
        raise ValueError(
            f"Table {table_key!r} is not linked to spot shapes (its uns['spatialdata_attrs'] is {dict(attrs)}). "
            "Link it "
            "with spatialdata.models.TableModel.parse(table, region=<shapes key>, region_key='region', "
            "instance_key='spot_id')."
        )
    regions = [region] if isinstance(region, str) else list(region)
    if shapes_key is None:
        if len(regions) != 1:
            raise ValueError(f"Table {table_key!r} annotates several elements {regions}; pass shapes_key=....")
        shapes_key = regions[0]
    if shapes_key not in sdata.shapes:
        raise KeyError(
            f"Shapes {shapes_key!r} (annotated by table {table_key!r}) not found; shapes: {list(sdata.shapes.keys())}."
        )
    shapes = sdata.shapes[shapes_key]
    region_of = table.obs[region_key].astype(str).to_numpy()
    rows = np.flatnonzero(region_of == shapes_key)
    if rows.size == 0:
        raise ValueError(f"No row of table {table_key!r} has {region_key} == {shapes_key!r}.")
    if rows.size < table.n_obs:
        others = sorted(set(pd.unique(region_of)) - {shapes_key})
        raise ValueError(
            f"Table {table_key!r} also annotates {others} ({table.n_obs - rows.size} of its {table.n_obs} rows); "
            f"results are written per row, and only the rows of {shapes_key!r} have spots there. Give histoclip a "
            f"table of {shapes_key!r} only: sdata.tables['{shapes_key}_table'] = spatialdata.models.TableModel.parse("
            f"sdata.tables[{table_key!r}][sdata.tables[{table_key!r}].obs[{region_key!r}] == {shapes_key!r}].copy(), "
            f"region={shapes_key!r}, region_key={region_key!r}, instance_key={instance_key!r}), then pass "
            f"table_key='{shapes_key}_table'."
        )
    pos = shapes.index.get_indexer(pd.Index(table.obs[instance_key].to_numpy()[rows]))
    if (pos < 0).any():
        missing = table.obs[instance_key].to_numpy()[rows][pos < 0][:5]
        raise ValueError(
            f"{int((pos < 0).sum())} rows of table {table_key!r} have {instance_key} values missing from the index "
            f"of shapes {shapes_key!r} (first: {list(missing)})."
        )
    geom = shapes.geometry.iloc[pos]
    xy, radius = _spot_centres(geom, shapes, pos, shapes_key)
    bin_um = hd_bin_um(table_key) or hd_bin_um(shapes_key)  # Visium HD: the bin's side is its "spot diameter"

    images = list(sdata.images.keys())
    if image_key is None:
        hires = [k for k in images if k.endswith("hires_image")]
        if len(images) == 1:
            image_key = images[0]
        elif len(hires) == 1:
            image_key = hires[0]
        elif need_image:
            raise ValueError(f"SpatialData holds several images {images}; pass image_key=....")
    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"Image {image_key!r} not found; images: {images}.")
    shape_cs = _coordinate_systems(shapes)
    if image_key is not None:
        element = sdata.images[image_key]
        common = [c for c in shape_cs if c in _coordinate_systems(element)]
    else:
        element, common = None, shape_cs
    if coordinate_system is None:
        if not common:
            raise ValueError(
                f"Shapes {shapes_key!r} (coordinate systems {shape_cs}) and image {image_key!r} share no coordinate "
                "system; add a transformation with spatialdata.transformations.set_transformation."
            )
        coordinate_system = shapes_key if shapes_key in common else common[0]
    elif coordinate_system not in common:
        raise ValueError(
            f"coordinate_system {coordinate_system!r} is not shared by the shapes and image; shared: {common}."
        )

    a_shapes = _affine(shapes, coordinate_system)
    _check_invertible(a_shapes, f"shapes {shapes_key!r}", coordinate_system)
    levels: list = []
    if element is not None:
        levels, affines = _image_levels(element, coordinate_system)
        for k, a in enumerate(affines):
            _check_invertible(a, f"image {image_key!r}" + (f" (level {k})" if k else ""), coordinate_system)
        m = np.linalg.inv(affines[0]) @ a_shapes
    else:
        m = a_shapes
    pts = (m @ np.column_stack([xy, np.ones(len(xy))]).T).T[:, :2]
    px_scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    diameter_px = float(np.median(radius)) * 2.0 * px_scale
    if not np.isfinite(diameter_px) or diameter_px <= 0:
        raise ValueError(
            f"The spots of shapes {shapes_key!r} have a median diameter of {diameter_px:.3g} image pixels (radius "
            f"column median {float(np.median(radius)):.3g}); the 'radius' column must hold positive spot radii."
        )
    if spot_diameter_um is None and bin_um is None and not (geom.geom_type == "Point").all():
        raise ValueError(
            f"Shapes {shapes_key!r} are squares but neither their name nor the table's ({table_key!r}) gives the bin "
            "size (Visium HD names them '<id>_square_008um'); pass spot_diameter_um= the side of a square in microns."
        )
    if spot_diameter_um is None:
        spot_diameter_um = bin_um if bin_um is not None else DEFAULT_SPOT_DIAMETER_UM
    spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um",
                                       _SPOT_FIX)
    um_per_px = float(spot_diameter_um) / diameter_px
    image = None
    if need_image and levels:
        if len(levels) == 1:
            image = ImageSource(levels[0], layout="cyx", name=image_key)
        else:
            to_level = [np.linalg.inv(a) @ affines[0] for a in affines]
            image = MultiscaleImageSource(levels, to_level, layout="cyx", name=image_key)
    logger.info("SpatialData: table %r, shapes %r, image %r, coordinate system %r, %.3g um/px",
                table_key, shapes_key, image_key, coordinate_system, um_per_px)
    slide = Slide(shapes_key, rows, pts, um_per_px, image_key or "none", image)
    keys = {"table_key": table_key, "image_key": image_key, "shapes_key": shapes_key,
            "coordinate_system": coordinate_system}
    return SpotData(table, [slide], None, "spatialdata", keys)


def _spot_centres(geom: Any, shapes: Any, pos: np.ndarray, shapes_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x, y) and radii of circles (Point + ``radius``) or of squares (Visium HD bins: half the side)."""
    kinds = set(pd.unique(geom.geom_type))
    if kinds == {"Point"} and "radius" in shapes.columns:
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
        return xy, shapes["radius"].to_numpy()[pos].astype(np.float64)
    if kinds == {"Polygon"}:
        b = geom.bounds.to_numpy(dtype=np.float64)  # minx, miny, maxx, maxy
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        area = geom.area.to_numpy(dtype=np.float64)
        square = (np.abs(w - h) <= 1e-3 * np.maximum(w, h)) & (np.abs(area - w * h) <= 1e-3 * w * h)
        if not square.all():
            raise ValueError(
                f"Shapes {shapes_key!r} are polygons but {int((~square).sum())} of them are not axis-aligned squares "
                "(Visium HD bins are); histoclip takes circles (Point geometry with a 'radius' column) or bin squares."
            )
        xy = np.column_stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2])
        return xy, w / 2.0
    raise ValueError(
        f"Shapes {shapes_key!r} must be circles (Point geometry with a 'radius' column) or Visium HD bin squares "
        f"(Polygon); found geometry types {sorted(kinds)}."
    )


def several_regions_key(table: AnnData) -> str | None:
    """The region column of a SpatialData table that annotates several regions (a list of them), else ``None``."""
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    return None if region is None or isinstance(region, str) else attrs.get("region_key")


def resolve_regions(
    sdata: SpatialData,
    table_key: str,
    regions: Sequence[str],
    *,
    image_keys: Mapping[str, str] | None = None,
    spot_diameter_um: float | None = None,
) -> list[Slide]:
    """One :class:`Slide` per region of a table that annotates several, each resolved on its own shapes.

    ``image_keys`` names the image of a region (one sharing a coordinate system with its shapes); a region without
    one is resolved without an image. Each slide's ``index`` holds rows of the whole table.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    table = sdata.tables[table_key]
    attrs = table.uns["spatialdata_attrs"]
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    region_of = table.obs[region_key].astype(str).to_numpy()
    slides = []
    for region in regions:
        if region not in sdata.shapes:
            raise KeyError(f"Shapes {region!r} (annotated by table {table_key!r}) not found; shapes: "
                           f"{list(sdata.shapes.keys())}.")
        rows = np.flatnonzero(region_of == region)
        obs = pd.DataFrame({region_key: pd.Categorical([region] * len(rows)),
                            instance_key: table.obs[instance_key].to_numpy()[rows]}, index=table.obs_names[rows])
        sub = TableModel.parse(ad.AnnData(obs=obs), region=region, region_key=region_key, instance_key=instance_key)
        key = (image_keys or {}).get(region)
        one = SpatialData(images={} if key is None else {key: sdata.images[key]}, shapes={region: sdata.shapes[region]},
                          tables={"table": sub})
        s = _resolve_spatialdata(one, table_key="table", image_key=key, shapes_key=None, coordinate_system=None,
                                 spot_diameter_um=spot_diameter_um, need_image=key is not None).slides[0]
        slides.append(Slide(region, rows[s.index], s.coords, s.um_per_px, s.img_key, s.image))  # rows of the table
    return slides


def _check_invertible(a: np.ndarray, what: str, cs: str) -> None:
    det = float(np.linalg.det(a[:2, :2])) if np.isfinite(a).all() else float("nan")
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise ValueError(
            f"The transformation of {what} to coordinate system {cs!r} is singular or not finite (its affine matrix is "
            f"{np.round(a, 6).tolist()}): it maps the plane onto a line or a point, so image pixels cannot be found "
            "from it. Fix it with spatialdata.transformations.set_transformation (e.g. a Scale with non-zero factors)."
        )


def _image_levels(element: Any, cs: str) -> tuple[list, list[np.ndarray]]:
    """The levels of a (possibly multiscale) image as lazy cyx arrays, full resolution first; each level's affine.

    Each affine maps that level's pixels to ``cs``.
    """
    if not hasattr(element, "children") or not getattr(element, "children", None):  # single-scale DataArray
        if not hasattr(element, "data"):
            raise TypeError(f"Expected a SpatialData image (DataArray or multiscale DataTree), got {type(element)}.")
        return [element.data], [_affine(element, cs)]
    names = sorted(element.children, key=lambda n: (len(n), n))  # scale0, scale1, ..., scale10
    levels, affines = [], []
    for name in names:
        node = element[name]
        da = node["image"] if "image" in node.ds.data_vars else next(iter(node.ds.data_vars.values()))
        levels.append(da.data)
        affines.append(_affine(da, cs))
    return levels, affines
