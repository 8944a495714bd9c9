"""The platform (legacy ST, Visium, Visium HD) and spot size inferred from the spot lattice and the scale factors."""

import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import histoclip as hc
from histoclip.io import resolve
from histoclip.io._platform import infer_platform, spot_lattice
from histoclip.pp._patches import _spot_um

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def square_grid(nx: int, ny: int, spacing: float, *, rotate: float = 0.0, jitter: float = 0.0, seed: int = 0):
    """Spot centres on a square grid (optionally rotated, with a little jitter)."""
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
    xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float) * spacing
    c, s = np.cos(rotate), np.sin(rotate)
    xy = xy @ np.array([[c, -s], [s, c]])
    return xy + np.random.default_rng(seed).normal(0, jitter, xy.shape) + 1000.0


def hex_grid(nx: int, ny: int, spacing: float):
    """Spot centres on a hexagonal grid (Visium's layout: rows sqrt(3)/2 spacing apart, every other row shifted)."""
    pts = [((i + 0.5 * (j % 2)) * spacing, j * spacing * np.sqrt(3) / 2) for j in range(ny) for i in range(nx)]
    return np.asarray(pts) + 500.0


def slide(xy: np.ndarray, scalefactors: dict | None = None, metadata: dict | None = None, *, seed: int = 0):
    """An AnnData with counts on the given spots and, unless ``scalefactors`` is None, an ``uns["spatial"]`` entry."""
    rng = np.random.default_rng(seed)
    a = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (len(xy), 30)).astype(np.float32)))
    a.obs_names = [f"s{i}" for i in range(len(xy))]
    a.var_names = [f"g{i}" for i in range(30)]
    a.obsm["spatial"] = np.asarray(xy, dtype=float)
    if scalefactors is not None:
        a.uns["spatial"] = {"lib": {"images": {}, "scalefactors": dict(scalefactors), "metadata": dict(metadata or {})}}
    return a


def mob_like():
    """The issue's example: a legacy-ST section, obsm['spatial'] in microns, spot_diameter_fullres = 100, nothing
    else (262 spots of a square grid 200 um apart)."""
    xy = square_grid(20, 14, 200.0)[:262]
    return slide(xy, {"spot_diameter_fullres": 100.0})


def test_lattice_kinds():
    assert spot_lattice(square_grid(15, 15, 200.0, rotate=0.3, jitter=3.0)).kind == "square"
    assert spot_lattice(hex_grid(15, 15, 137.0)).kind == "hexagonal"
    rng = np.random.default_rng(0)
    assert spot_lattice(rng.uniform(0, 1000, (200, 2))).kind == "irregular"
    lat = spot_lattice(square_grid(10, 10, 31.7))
    assert lat.spacing == pytest.approx(31.7)


def test_legacy_st_in_microns_is_read_as_legacy_st(caplog):
    a = mob_like()
    with caplog.at_level(logging.INFO, logger="histoclip"):
        spots = resolve(a, need_image=False)
    s = spots.slides[0]
    assert s.platform == "st"
    assert s.um_per_px == pytest.approx(1.0)  # 200 um apart: 200 units
    assert _spot_um(spots, None) == 100.0
    assert "legacy ST, 100 um spots 200 um apart" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # not a guess


def test_legacy_st_domains_record_the_platform_and_use_200um_spacing():
    a = mob_like()
    hc.tl.domains(a, n_domains=3, n_genes=30, n_init=2)
    params = a.uns["histoclip"]["params"]["domains"]
    assert params["platform"] == {"lib": "st"}
    # 150 um radius: no neighbour at 200 um spacing (each spot is its own neighbourhood)
    from histoclip.pp._graph import radius_graph, spot_coords_um

    g = radius_graph(spot_coords_um(resolve(a, need_image=False)), 150.0)
    assert g.nnz == 0
    g = radius_graph(spot_coords_um(resolve(a, need_image=False)), 250.0)
    assert g.nnz > 0


def test_explicit_spot_diameter_and_metadata_win(caplog):
    a = mob_like()
    with caplog.at_level(logging.INFO, logger="histoclip"):
        spots = resolve(a, need_image=False, spot_diameter_um=65.0)
    assert spots.slides[0].um_per_px == pytest.approx(0.65)
    assert "legacy ST" not in caplog.text  # nothing inferred
    a.uns["spatial"]["lib"]["metadata"]["spot_diameter_um"] = 55.0
    spots = resolve(a, need_image=False)
    assert spots.slides[0].um_per_px == pytest.approx(0.55)
    assert _spot_um(spots, None) == 55.0


def test_square_grid_without_uns_spatial_is_a_guess(caplog):
    a = slide(square_grid(12, 12, 7.0), None)  # e.g. array coordinates scaled, no scale factors at all
    with caplog.at_level(logging.INFO, logger="histoclip"):
        spots = resolve(a, need_image=False)
    s = spots.slides[0]
    assert s.platform == "st"
    assert s.um_per_px == pytest.approx(200.0 / 7.0)
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "assumed legacy ST" in warn[0] and "spot_diameter_um=" in warn[0]


def test_hex_grid_without_uns_spatial_is_visium(caplog):
    a = slide(hex_grid(12, 12, 137.0), None)
    with caplog.at_level(logging.INFO, logger="histoclip"):
        s = resolve(a, need_image=False).slides[0]
    assert s.platform == "visium" and s.um_per_px == pytest.approx(100.0 / 137.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # with a spot diameter given: Visium spots 100 um apart per 65 um of diameter
    s = resolve(a, need_image=False, spot_diameter_um=65.0).slides[0]
    assert s.um_per_px == pytest.approx(100.0 / 137.0)


def test_hex_grid_with_scalefactors_keeps_space_rangers_65um():
    a = slide(hex_grid(12, 12, 137.0), {"spot_diameter_fullres": 90.0, "tissue_hires_scalef": 0.2})
    s = resolve(a, need_image=False).slides[0]
    assert s.platform == "visium" and s.um_per_px == pytest.approx(65.0 / 90.0)


def test_visium_hd_bins():
    xy = square_grid(20, 20, 8.0)
    s = resolve(slide(xy, {"spot_diameter_fullres": 8.0, "microns_per_pixel": 2.0}), need_image=False).slides[0]
    assert s.platform == "visium_hd" and s.um_per_px == 2.0 and s.spot_diameter_um == 16.0
    s = resolve(slide(xy, {"spot_diameter_fullres": 8.0}, {"bin_size_um": 16.0}), need_image=False).slides[0]
    assert s.platform == "visium_hd" and s.um_per_px == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"contiguous Visium HD bins.*spot_diameter_um= the bin size"):
        resolve(slide(xy, {"spot_diameter_fullres": 8.0}), need_image=False)
    s = resolve(slide(xy, {"spot_diameter_fullres": 8.0}), need_image=False, spot_diameter_um=16.0).slides[0]
    assert s.um_per_px == pytest.approx(2.0)


def test_irregular_spots_are_a_guess(caplog):
    rng = np.random.default_rng(1)
    a = slide(rng.uniform(0, 3000, (150, 2)), {"spot_diameter_fullres": 90.0})
    with caplog.at_level(logging.INFO, logger="histoclip"):
        s = resolve(a, need_image=False).slides[0]
    assert s.platform == "unknown" and s.um_per_px == pytest.approx(65.0 / 90.0)
    assert any(r.levelno == logging.WARNING and "This is a guess" in r.getMessage() for r in caplog.records)
    a = slide(rng.uniform(0, 3000, (150, 2)), None)
    with pytest.raises(ValueError, match=r"no regular grid.*spot_diameter_um="):
        resolve(a, need_image=False)


def test_extract_patches_records_platform_and_legacy_st_patch_size():
    a = mob_like()
    a.uns["spatial"]["lib"]["images"] = {"hires": np.full((420, 540, 3), 200, np.uint8)}
    a.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"] = 0.1
    hc.pp.extract_patches(a)
    rec = a.uns["histoclip"]["params"]["patches"]
    assert rec["platform"] == {"lib": "st"}
    assert rec["size_um"] == 200.0  # two 100 um spots
    assert rec["size_px"] == {"lib": 20}  # 10 um per pixel of the hires image


# ------------------------------------------------------------------------------------------ real layouts
def _read(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(path)


@pytest.mark.parametrize("name", ["STUtility_MOB1", "STUtility_MOB4"])
def test_stutility_mob_is_legacy_st(name):
    s = resolve(_read(DATA / "stutility_mob" / f"{name}.h5ad"), need_image=False).slides[0]
    assert s.platform == "st"
    assert s.um_per_px == pytest.approx(200.0 / 31.75, rel=0.01)  # from the 200 um spacing


@pytest.mark.parametrize("name", ["HER2ST_C2", "HER2ST_B4"])
def test_her2st_is_legacy_st(name):
    spots = resolve(_read(DATA / "her2st" / f"{name}.h5ad"), need_image=False)
    assert spots.slides[0].platform == "st" and _spot_um(spots, None) == 100.0


def test_dlpfc_is_visium_and_unchanged():
    a = _read(DATA / "dlpfc" / "DLPFC_151673.h5ad")
    lib = next(iter(a.uns["spatial"]))
    s = resolve(a, need_image=False).slides[0]
    assert s.platform == "visium"
    sf = a.uns["spatial"][lib]["scalefactors"]
    assert s.img_key == "lowres"
    assert s.um_per_px == pytest.approx(65.0 / sf["spot_diameter_fullres"] / sf["tissue_lowres_scalef"])


def test_toy_readers_are_visium():
    import scanpy as sc

    toy = DATA / "toy"
    if not toy.exists():
        pytest.skip("toy data not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = [ad.read_h5ad(toy / "squidpy_tests" / "test_data.h5ad"),
                  ad.read_h5ad(toy / "stlearn_tests" / "test_data.h5"),
                  sc.read_visium(toy / "scanpy_visium_data" / "1.0.0")]  # 100 sparse spots: array_row/array_col
    assert [resolve(t, need_image=False).slides[0].platform for t in tables] == ["visium"] * 3


def test_infer_platform_explains_itself():
    p = infer_platform(square_grid(10, 10, 200.0), {"spot_diameter_fullres": 100.0})
    assert p.name == "st" and not p.guess and "2.00 times spot_diameter_fullres" in p.how


def test_lattice_of_a_visium_hd_sized_slide_is_read_from_a_window():
    import time

    xy = square_grid(600, 600, 8.0)  # 360,000 bins
    t0 = time.perf_counter()
    lat = spot_lattice(xy)
    assert lat.kind == "square" and lat.spacing == pytest.approx(8.0)
    assert time.perf_counter() - t0 < 10
