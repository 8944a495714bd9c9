"""Visium HD as Space Ranger writes it, read by spatialdata_io.visium_hd: the fixture, bins, large N (issue 23)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from make_visium_hd_fixture import make_visium_hd, read_visium_hd  # noqa: E402

pytest.importorskip("spatialdata_io")

BINS = ("square_002um", "square_008um", "square_016um")


@pytest.fixture(scope="module")
def hd_path(tmp_path_factory) -> Path:
    return make_visium_hd(tmp_path_factory.mktemp("visium_hd"))


# ---------------------------------------------------------------------------------------------------- the fixture
def test_fixture_has_the_space_ranger_hd_layout(hd_path):
    assert (hd_path / "hd_fixture_feature_slice.h5").is_file()
    assert (hd_path / "hd_fixture_tissue_image.tif").is_file()
    for b in BINS:
        folder = hd_path / "binned_outputs" / b
        assert (folder / "filtered_feature_bc_matrix.h5").is_file()
        assert {p.name for p in (folder / "spatial").iterdir()} >= {
            "tissue_positions.parquet", "scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"}
        sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
        assert sf["bin_size_um"] == float(b[7:10])
        assert sf["bin_size_um"] / sf["spot_diameter_fullres"] == pytest.approx(sf["microns_per_pixel"])
        pos = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
        assert list(pos.columns) == ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                                     "pxl_col_in_fullres"]
        assert 0 < pos["in_tissue"].sum() < len(pos)  # some bins are outside the tissue, as in real output


def test_fixture_is_read_by_spatialdata_io_visium_hd(hd_path):
    sdata = read_visium_hd(hd_path)
    assert set(sdata.tables) == set(BINS)
    assert {k: sdata.tables[k].n_obs for k in BINS} == {"square_002um": 8960, "square_008um": 560,
                                                         "square_016um": 140}
    assert sdata.tables["square_008um"].n_vars == 40
    assert set(sdata.images) == {"hd_fixture_full_image", "hd_fixture_hires_image", "hd_fixture_lowres_image"}
    assert set(sdata.shapes) == {f"hd_fixture_{b}" for b in BINS}
    sq = sdata.shapes["hd_fixture_square_008um"].geometry
    assert (sq.geom_type == "Polygon").all()
    np.testing.assert_allclose(np.sqrt(sq.area), 16.0)  # 8 um at 0.5 um/px
    # larger bins hold the sums of the 2 um bins under them, as Space Ranger bins them
    totals = {k: float(sdata.tables[k].X.sum()) for k in BINS}
    assert totals["square_008um"] == pytest.approx(totals["square_016um"])
    assert totals["square_002um"] == pytest.approx(totals["square_008um"])


def test_fixture_reads_one_bin_size_and_has_its_truth(hd_path):
    sdata = read_visium_hd(hd_path, bin_size=8)
    assert set(sdata.tables) == {"square_008um"}
    truth = pd.read_csv(hd_path / "truth.csv", dtype=str).set_index("barcode")["domain"]
    table = sdata.tables["square_008um"]
    assert truth.index.equals(table.obs_names)
    x = table.obsm["spatial"][:, 0]
    assert x[truth.to_numpy() == "0"].max() < x[truth.to_numpy() == "2"].min()  # bands left to right
