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
import scipy.sparse as sp  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from make_visium_hd_fixture import make_visium_hd, read_visium_hd  # noqa: E402

import histoclip as hc  # noqa: E402

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


# ------------------------------------------------------------------------------------- the HD layout in histoclip
@pytest.fixture(scope="module")
def hd(hd_path, one_torch_thread):
    """The README's ten lines on visium_hd output, unchanged apart from the object passed in (sdata for adata)."""
    sdata = read_visium_hd(hd_path)
    truth = pd.read_csv(hd_path / "truth.csv", dtype=str).set_index("barcode")["domain"]
    sdata.tables["square_008um"].obs["layer"] = pd.Categorical(truth.loc[sdata.tables["square_008um"].obs_names])
    adata = sdata  # the only change to the ten lines: the object passed in
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.tl.train(adata, rng=0, max_epochs=2, batch_size=128, accelerator="cpu")  # few epochs: a test
    hc.tl.embed(adata, model)
    hc.pl.image_weight(adata)
    hc.tl.domains(adata, n_domains=3, rng=0)
    ari = hc.metrics.adjusted_rand(sdata.tables["square_008um"].obs["layer"],
                                   sdata.tables["square_008um"].obs["histoclip_domain"])
    hc.tl.domain_genes(adata)
    ax = hc.pl.domains(adata, reference="layer")
    return sdata, model, ari, ax


def test_ten_lines_run_on_visium_hd_and_write_to_the_8um_table(hd):
    sdata, model, ari, ax = hd
    table = sdata.tables["square_008um"]
    for key in ("histoclip_patch_box", "X_histoclip", "X_histoclip_image", "X_histoclip_expression"):
        assert table.obsm[key].shape[0] == 560
    assert {"histoclip_domain", "histoclip_image_weight"} <= set(table.obs)
    assert "histoclip_domain_genes" in table.uns
    for other in ("square_002um", "square_016um"):  # nothing written to the other bin sizes
        assert "histoclip" not in sdata.tables[other].uns and "X_histoclip" not in sdata.tables[other].obsm
    assert model.setup_params["table_key"] == "square_008um"
    assert ari > 0.5, ari  # the three bands are found (expression PCA: the default representation)
    assert len(ax.images) == 1 and len(ax.collections) == 1


def test_bins_give_microns_and_patch_boxes(hd):
    sdata = hd[0]
    params = sdata.tables["square_008um"].uns["histoclip"]["params"]["patches"]
    # the hires image is 0.25 of the 0.5 um/px full resolution: 2 um/px, so 110 um is 55 px
    assert params["image_key"] == "hd_fixture_hires_image"
    assert params["um_per_px"]["hd_fixture_square_008um"] == pytest.approx(2.0)
    assert params["size_px"]["hd_fixture_square_008um"] == 55
    boxes = sdata.tables["square_008um"].obsm["histoclip_patch_box"]
    centres = sdata.tables["square_008um"].obsm["spatial"] * 0.25  # bin centres in hires pixels
    np.testing.assert_allclose((boxes[:, :2] + boxes[:, 2:]) / 2, centres, atol=1.0)


def test_16um_bins_by_table_key_and_the_fullres_image(hd_path):
    sdata = read_visium_hd(hd_path, bin_size=[8, 16])
    hc.pp.extract_patches(sdata, table_key="square_016um", image_key="hd_fixture_full_image", size_um=64)
    params = sdata.tables["square_016um"].uns["histoclip"]["params"]["patches"]
    assert params["um_per_px"]["hd_fixture_square_016um"] == pytest.approx(0.5)  # microns_per_pixel of the fixture
    assert params["size_px"]["hd_fixture_square_016um"] == 128
    assert "histoclip" not in sdata.tables["square_008um"].uns
    hc.tl.domains(sdata, table_key="square_016um", n_domains=3, rng=0)
    assert sdata.tables["square_016um"].obs["histoclip_domain"].nunique() == 3
    # 24 neighbours of a 16 um bin reach ~45 um: the smoothing takes as many hops as spread over 150 um (22 on a
    # large grid; fewer on these 140 bins, where the nearest 24 of the many edge bins lie further out)
    assert 10 <= sdata.tables["square_016um"].uns["histoclip"]["params"]["domains"]["n_hops"] <= 22


def test_2um_bins_are_refused_with_a_clear_message(hd_path):
    sdata = read_visium_hd(hd_path)
    with pytest.raises(ValueError, match=r"2 um.*bin2cell.*square_008um"):
        hc.pp.extract_patches(sdata, table_key="square_002um")
    with pytest.raises(ValueError, match="bin2cell"):
        hc.tl.domains(sdata, table_key="square_002um")
    assert "histoclip" not in sdata.tables["square_002um"].uns


def test_without_8um_bins_the_default_names_the_choices(hd_path):
    sdata = read_visium_hd(hd_path, bin_size=[2, 16])
    with pytest.raises(KeyError, match=r"square_008um.*square_016um"):
        hc.pp.extract_patches(sdata)


def test_squares_without_a_bin_name_need_the_side_in_microns(hd_path):
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    sdata = read_visium_hd(hd_path, bin_size=8)
    table = sdata.tables["square_008um"].copy()
    table.obs["region"] = pd.Categorical(["bins"] * table.n_obs)
    del table.uns["spatialdata_attrs"]
    table = TableModel.parse(table, region="bins", region_key="region", instance_key="location_id")
    renamed = SpatialData(shapes={"bins": sdata.shapes["hd_fixture_square_008um"]},
                          images={"he": sdata.images["hd_fixture_hires_image"]}, tables={"table": table})
    with pytest.raises(ValueError, match="spot_diameter_um"):
        hc.pp.extract_patches(renamed, size_um=110)
    hc.pp.extract_patches(renamed, size_um=110, spot_diameter_um=8)
    assert renamed.tables["table"].uns["histoclip"]["params"]["patches"]["um_per_px"]["bins"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ large N: fit on a sample
def _blobs(n: int, n_genes: int, seed: int = 0):
    """Counts of three spatial bands (sparse, ~30 UMIs per spot) with coordinates on a grid of 8 um pitch (pixels)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.column_stack([np.arange(n) % side, np.arange(n) // side]).astype(float) * 16.0
    band = np.minimum((xy[:, 0] / (side * 16.0) * 3).astype(int), 2)
    rate = np.full((3, n_genes), 0.05)
    for d in range(3):
        rate[d, d * 10:(d + 1) * 10] = 0.6
    counts = sp.csr_matrix(rng.poisson(rate[band]).astype(np.float32))
    return counts, xy, band


def test_below_the_sample_size_nothing_changes():
    from sklearn.decomposition import PCA

    from histoclip.pp._genes import FIT_SAMPLE, expression_matrix, fit_rows, select_genes
    from histoclip.tl._domains import expression_pca

    assert FIT_SAMPLE == 50_000 and fit_rows(50_000) is None and fit_rows(50_001).size == 50_000
    counts, xy, _ = _blobs(900, 60)
    got = expression_pca(counts, [f"g{i}" for i in range(60)], xy, np.zeros(900), n_genes=40, n_pcs=5, seed=0)
    import anndata as ad

    tmp = ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(60)]))
    tmp.obsm["spatial"] = xy
    x = expression_matrix(tmp, select_genes(tmp, 40))  # the recipe without sampling
    want = PCA(5, svd_solver="covariance_eigh").fit_transform(x)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_clustering_is_fitted_on_a_sample_and_every_spot_assigned(monkeypatch, method):
    from histoclip.tl._domains import cluster

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (400, 4)) for c in (0.0, 3.0, 6.0)]).astype(np.float32)
    full, _ = cluster(x, 3, method, 0, n_init=3)
    monkeypatch.setattr("histoclip.pp._genes.FIT_SAMPLE", 300)
    sampled, extra = cluster(x, 3, method, 0, n_init=3)
    assert extra["fit_sample"] == 300 and "_model" not in extra
    assert sampled.shape == (1200,) and len(set(sampled)) == 3
    assert hc.metrics.adjusted_rand(full, sampled) > 0.95


def test_expression_pca_on_a_sample_never_densifies_spots_by_genes(monkeypatch):
    import tracemalloc

    from histoclip.tl._domains import expression_pca

    n, g = 20_000, 400
    counts, xy, band = _blobs(n, g)
    genes = [f"g{i}" for i in range(g)]
    groups = np.where(np.arange(n) < n // 2, "a", "b")
    monkeypatch.setattr("histoclip.pp._genes.FIT_SAMPLE", 2_000)
    monkeypatch.setattr("histoclip.tl._domains._CHUNK", 2_000)
    tracemalloc.start()
    pcs = expression_pca(counts, genes, xy, groups, n_genes=300, n_pcs=5, seed=0, center=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense = n * 300 * 4  # one float32 spots x kept-genes matrix
    assert peak < dense / 2, (peak, dense)
    assert pcs.shape == (n, 5) and np.isfinite(pcs).all()
    from sklearn.cluster import KMeans

    labels = KMeans(3, n_init=5, random_state=0).fit_predict(pcs)  # the bands are still separated
    assert hc.metrics.adjusted_rand(band, labels) > 0.9


def test_domains_on_a_sample_agree_with_the_full_fit(hd_path, monkeypatch, one_torch_thread):
    sdata = read_visium_hd(hd_path, bin_size=8)
    # two hops: this fixture is 190 um across, so the default smoothing over 150 um (88 hops on 8 um bins) would
    # blur its 64 um bands into each other; what is tested here is the sampled fit, not the smoothing
    hc.tl.domains(sdata, n_domains=3, rng=0, n_hops=2, key_added="full")
    monkeypatch.setattr("histoclip.pp._genes.FIT_SAMPLE", 300)
    monkeypatch.setattr("histoclip.tl._domains._CHUNK", 100)
    hc.tl.domains(sdata, n_domains=3, rng=0, n_hops=2, key_added="sampled")
    table = sdata.tables["square_008um"]
    assert table.uns["histoclip"]["params"]["domains"]["fit_sample"] == 300
    assert hc.metrics.adjusted_rand(table.obs["full"], table.obs["sampled"]) > 0.8


# ----------------------------------------------------------------------------------------------- plots at large N
def test_many_spots_are_drawn_as_one_raster_image(hd, monkeypatch):
    from matplotlib.colors import to_rgba

    sdata = hd[0]
    table = sdata.tables["square_008um"]
    circles = hc.pl.domains(sdata)
    monkeypatch.setattr("histoclip.pl._utils.RASTER_ABOVE", 100)  # the fixture's 560 bins count as "many"
    ax = hc.pl.domains(sdata)
    assert len(ax.collections) == 0 and len(ax.images) == 2  # the H&E, then the bins as one image
    assert ax.get_xlim() == circles.get_xlim() and ax.get_ylim() == circles.get_ylim()
    raster = ax.images[1].get_array()
    x0, x1, y1, y0 = ax.images[1].get_extent()
    cell = (x1 - x0) / raster.shape[1]
    assert cell == pytest.approx(4.0)  # one 8 um bin: 4 px of the 2 um/px hires image
    colors = hc.pl._utils.palette([str(c) for c in table.obs["histoclip_domain"].cat.categories])
    xy = table.obsm["spatial"] * 0.25
    for i in (0, 100, 400):  # the cell under a bin has that bin's domain colour
        r, c = int((xy[i, 1] - y0) / cell), int((xy[i, 0] - x0) / cell)
        want = to_rgba(colors[table.obs["histoclip_domain"].iloc[i]])
        np.testing.assert_allclose(raster[r, c, :3], want[:3], atol=1e-6)
        assert raster[r, c, 3] == pytest.approx(0.85)
    weights = hc.pl.image_weight(sdata)  # continuous values: the mean per cell, with a colour bar's mappable
    img = weights.images[1].get_array()
    w = table.obs["histoclip_image_weight"].to_numpy()
    assert np.nanmin(img) == pytest.approx(w.min(), rel=1e-5) and np.nanmax(img) == pytest.approx(w.max(), rel=1e-5)
    assert np.isfinite(np.asarray(img)).sum() == 560


def test_gene_ranking_on_a_sample_is_the_ranking_of_that_sample(monkeypatch):
    import anndata as ad

    from histoclip.pp._genes import fit_rows, select_genes

    counts, xy, _ = _blobs(3000, 120)
    adata = ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(120)]))
    adata.obsm["spatial"] = xy
    full = select_genes(adata, 20)
    monkeypatch.setattr("histoclip.pp._genes.FIT_SAMPLE", 1000)
    sampled = select_genes(adata, 20)
    rows = fit_rows(3000)  # seed 0, as select_genes draws it
    sub = adata[rows].copy()
    monkeypatch.setattr("histoclip.pp._genes.FIT_SAMPLE", 50_000)
    assert sampled == select_genes(sub, 20)
    markers = {f"g{i}" for i in range(30)}  # the band genes (equally spatial, so their order among them is noise)
    assert set(full) <= markers and set(sampled) <= markers


def test_detection_counts_streamed_in_row_blocks_match_the_sparse_pattern():
    from histoclip.pp._genes import _spots_detected

    x = sp.random(1000, 60, density=0.2, format="csr", dtype=np.float32, random_state=0)
    x.data[::7] = 0  # explicit zeros are not detections
    np.testing.assert_array_equal(_spots_detected(x, chunk=37), np.asarray((x > 0).sum(axis=0)).ravel())


@pytest.mark.parametrize(("lattice", "hops"), [("bins8", 88), ("bins16", 22), ("visium", 2), ("legacy", 2)])
def test_smoothing_spreads_over_the_same_microns_on_every_lattice(lattice, hops):
    from histoclip.pp._graph import physical_hops, radius_graph, smooth_features

    if lattice.startswith("bins"):  # Visium HD: a square grid of bins, 24 neighbours within the cap
        xy = np.mgrid[0:60, 0:60].reshape(2, -1).T * float(lattice[4:])
    elif lattice == "visium":  # hexagonal, 100 um apart: the 6 neighbours within 150 um, no cap
        xy = np.array([[c * 100.0 + 50 * (r % 2), r * 100.0 * np.sqrt(3) / 2] for r in range(30) for c in range(30)])
    else:  # legacy ST: 200 um apart, no neighbour within 150 um
        xy = np.mgrid[0:20, 0:20].reshape(2, -1).T * 200.0
    graph = radius_graph(xy, 150.0)
    assert physical_hops(graph, xy, 150.0, 2) == hops
    assert physical_hops(graph, xy, 150.0, 0) == 0
    if lattice == "bins8":  # what the hops are for: a point of signal spreads over ~150 um, not over ~20 um
        signal = np.zeros((xy.shape[0], 1))
        centre = np.argmin(((xy - xy.mean(axis=0)) ** 2).sum(axis=1))
        signal[centre] = 1.0
        for n, lo, hi in ((2, 0, 40), (hops, 80, 160)):
            out = smooth_features(signal, graph, n)[:, 0]
            reach = np.sqrt((out * ((xy - xy[centre]) ** 2).sum(axis=1)).sum() / out.sum())
            assert lo < reach < hi, (n, reach)
