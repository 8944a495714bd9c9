"""Which platform a slide comes from, read off its spot lattice and scale factors.

Legacy ST: 100 um spots on a square grid 200 um apart (centre spacing twice the spot diameter). Visium: a hexagonal
grid 100 um apart, with ``spot_diameter_fullres`` defined by Space Ranger as the pixels of a theoretical 65 um spot.
Visium HD: contiguous square bins (spacing equal to the bin), with ``microns_per_pixel`` in the scale factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._constants import Key

#: centre-to-centre spacing of the platforms' spots, in microns
SPACING_UM = {"st": 200.0, "visium": 100.0}
NAMES = {"st": "legacy ST", "visium": "Visium", "visium_hd": "Visium HD", "unknown": "unknown platform"}
_MAX_QUERY = 5000  # spots whose neighbours are looked at (a lattice is read from a sample on Visium HD-sized data)
_MAX_FIT = 100_000  # spots searched for neighbours


@dataclass(frozen=True)
class Lattice:
    """The spot lattice of one library.

    ``kind`` ("hexagonal", "square" or "irregular"), the median nearest-neighbour spacing in coordinate units, and how
    strongly the neighbour directions follow a 6-fold (``r6``) and a 4-fold (``r4``) symmetry.
    """

    kind: str
    spacing: float
    r6: float
    r4: float
    n_spots: int


@dataclass(frozen=True)
class Platform:
    """What was inferred for one library.

    The platform, its spot (bin) diameter in microns, microns per coordinate unit, how it was found (a sentence for
    the log) and whether it is a guess.
    """

    name: str
    spot_diameter_um: float
    um_per_unit: float
    how: str
    guess: bool
    lattice: Lattice | None = None


def spot_lattice(xy: np.ndarray) -> Lattice:
    """Read the lattice of spot centres ``xy`` (n, 2).

    The median nearest-neighbour distance, and the symmetry of the directions to the neighbours at about that distance
    (within 1.25 times it).

    For each pair of near neighbours at angle ``t``, ``|mean(exp(6it))|`` is about 1 on a hexagonal grid and about 0
    on a square one, and ``|mean(exp(4it))|`` the other way round, whatever the grid's rotation and however many
    spots are missing.
    """
    from sklearn.neighbors import NearestNeighbors

    xy = np.asarray(xy, dtype=np.float64)
    xy = xy[np.isfinite(xy).all(axis=1)]
    n = len(np.unique(xy, axis=0)) if len(xy) else 0
    if n < 7:
        return Lattice("irregular", float("nan"), 0.0, 0.0, n)
    if len(xy) > _MAX_FIT:  # Visium HD-sized: a contiguous disc of spots around the median spot keeps the spacing
        d2 = ((xy - np.median(xy, axis=0)) ** 2).sum(axis=1)
        xy = xy[np.argpartition(d2, _MAX_FIT)[:_MAX_FIT]]
        d2 = ((xy - np.median(xy, axis=0)) ** 2).sum(axis=1)
        query = xy[np.argpartition(d2, _MAX_QUERY)[:_MAX_QUERY]]  # inner spots: their neighbours are all in the disc
    else:
        query = xy if len(xy) <= _MAX_QUERY else xy[np.random.default_rng(0).choice(len(xy), _MAX_QUERY,
                                                                                      replace=False)]
    k = min(9, len(xy))
    dist, nbr = NearestNeighbors(n_neighbors=k).fit(xy).kneighbors(query)
    dist, nbr = dist[:, 1:], nbr[:, 1:]
    positive = dist[:, 0] > 0
    if positive.sum() < 7:
        return Lattice("irregular", float("nan"), 0.0, 0.0, n)
    spacing = float(np.median(dist[positive, 0]))
    near = (dist > 0) & (dist <= 1.25 * spacing)
    vec = xy[nbr[near]] - np.repeat(query, k - 1, axis=0).reshape(len(query), k - 1, 2)[near]
    theta = np.arctan2(vec[:, 1], vec[:, 0])
    r6 = float(np.abs(np.exp(6j * theta).mean()))
    r4 = float(np.abs(np.exp(4j * theta).mean()))
    kind = "hexagonal" if r6 > 0.6 and r6 > r4 + 0.3 else "square" if r4 > 0.6 and r4 > r6 + 0.3 else "irregular"
    return Lattice(kind, spacing, r6, r4, n)


def _hexagonal_array(array: np.ndarray) -> bool:
    """Whether integer array coordinates (row, col) are those of Visium's hexagonal array: row + col of one parity."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or len(a) < 7 or not np.isfinite(a).all() or (a != np.round(a)).any():
        return False
    parity = (a.sum(axis=1) % 2).astype(int)
    return bool((parity == parity[0]).all()) and np.ptp(a[:, 0]) > 0 and np.ptp(a[:, 1]) > 0


def _lattice_words(lat: Lattice) -> str:
    if lat.kind == "irregular":
        return (f"the {lat.n_spots} spots are on no regular grid (6-fold symmetry {lat.r6:.2f}, 4-fold {lat.r4:.2f})")
    return f"the spots are on a {lat.kind} grid {lat.spacing:.4g} units apart"


def infer_platform(
    xy: np.ndarray,
    scalefactors: dict | None = None,
    meta: dict | None = None,
    array: np.ndarray | None = None,
) -> Platform:
    """Infer the platform of one library from its spot centres ``xy`` (full-resolution pixels) and scale factors.

    Rules, in order:

    - ``scalefactors["microns_per_pixel"]``: Visium HD (the bins' microns come from it).
    - a square grid whose spacing is about twice ``spot_diameter_fullres`` (1.5 to 3.5 times): legacy ST, 100 um spots
      200 um apart; microns per pixel from the spacing (200 um), which the array fixes, rather than from
      ``spot_diameter_fullres``, which readers estimate.
    - a square grid whose spacing is about the spot diameter (0.8 to 1.3 times): Visium HD bins; their size in
      microns must come from ``metadata["bin_size_um"]`` (else a ``ValueError`` asks for it).
    - a hexagonal grid (or, for spots too sparse to show a grid, Space Ranger's ``array`` = ``obs[["array_row",
      "array_col"]]`` whose sum has one parity on every spot, as on Visium's hexagonal array): Visium,
      ``spot_diameter_fullres`` spans 65 um (Space Ranger's definition); without it, 100 um spacing.
    - no scale factors and a square grid: legacy ST is assumed (a guess: Visium HD bins are square too).
    - anything else: Visium's 65 um convention, as a guess.
    """
    scalefactors = scalefactors or {}
    meta = meta or {}
    lat = spot_lattice(xy)
    visium_um = Key.SPOT_DIAMETER_UM["visium"]
    st_um = Key.SPOT_DIAMETER_UM["st"]
    if "microns_per_pixel" in scalefactors:
        um = float(scalefactors["microns_per_pixel"])
        fullres = scalefactors.get("spot_diameter_fullres")
        bin_um = float(fullres) * um if fullres is not None else float("nan")
        return Platform("visium_hd", bin_um, um, "scalefactors['microns_per_pixel'] is set", False, lat)
    fullres = scalefactors.get("spot_diameter_fullres")
    fullres = float(fullres) if fullres is not None and np.isfinite(float(fullres)) and float(fullres) > 0 else None
    words = _lattice_words(lat)
    if lat.kind == "irregular" and array is not None and _hexagonal_array(array):
        lat = Lattice("hexagonal", lat.spacing, lat.r6, lat.r4, lat.n_spots)
        words = f"{words}, but array_row + array_col has one parity on all of them (Visium's hexagonal array)"
    if lat.kind == "square" and fullres is not None:
        ratio = lat.spacing / fullres
        if 1.5 <= ratio <= 3.5:
            um = SPACING_UM["st"] / lat.spacing
            how = (f"{words}, {ratio:.2f} times spot_diameter_fullres ({fullres:.4g}): legacy ST, {st_um:g} um spots "
                   f"{SPACING_UM['st']:g} um apart, so {um:.4g} um per pixel")
            return Platform("st", st_um, um, how, False, lat)
        if 0.8 <= ratio <= 1.3:
            how = f"{words}, about spot_diameter_fullres ({fullres:.4g}) apart: contiguous Visium HD bins"
            if "bin_size_um" in meta:
                bin_um = float(meta["bin_size_um"])
                return Platform("visium_hd", bin_um, bin_um / fullres, how + f" of {bin_um:g} um (metadata)", False,
                                lat)
            raise ValueError(
                f"{how[0].upper() + how[1:]}, but nothing gives their size in microns: pass spot_diameter_um= the "
                "bin size (2, 8 or 16 for Space Ranger's bins), or set scalefactors['microns_per_pixel'] from Space "
                "Ranger's scalefactors_json.json."
            )
    if lat.kind == "hexagonal":
        if fullres is not None:
            um = visium_um / fullres
            how = (f"{words}: Visium, spot_diameter_fullres ({fullres:.4g}) spans {visium_um:g} um (Space Ranger's "
                   f"definition), so {um:.4g} um per pixel")
            return Platform("visium", visium_um, um, how, False, lat)
        um = SPACING_UM["visium"] / lat.spacing
        how = f"{words}: Visium, spots {SPACING_UM['visium']:g} um apart, so {um:.4g} um per unit"
        return Platform("visium", visium_um, um, how, False, lat)
    if lat.kind == "square" and fullres is None:
        um = SPACING_UM["st"] / lat.spacing
        how = (f"{words} and no spot_diameter_fullres: assumed legacy ST, {st_um:g} um spots {SPACING_UM['st']:g} um "
               f"apart, so {um:.4g} um per unit (Visium HD bins are square too)")
        return Platform("st", st_um, um, how, True, lat)
    if fullres is not None:
        um = visium_um / fullres
        extra = "" if lat.kind == "irregular" else f" ({lat.spacing / fullres:.2f} times spot_diameter_fullres)"
        how = (f"{words}{extra}: assumed Visium's convention, spot_diameter_fullres ({fullres:.4g}) spans "
               f"{visium_um:g} um, so {um:.4g} um per pixel")
        return Platform("unknown", visium_um, um, how, True, lat)
    raise ValueError(
        f"The microns of the spot coordinates cannot be found: {words}, and there is no "
        "uns['spatial'][library]['scalefactors'] (spot_diameter_fullres) to read them from. Pass spot_diameter_um= "
        "with scalefactors['spot_diameter_fullres'] set, or read the slide with scanpy.read_visium / "
        "squidpy.read.visium / spatialdata_io.visium."
    )
