import numpy as np
import pytest

import histoclip as hc


def test_extract_patches_geometry(toy):
    hc.pp.extract_patches(toy, size_um=110)
    boxes = toy.obsm["histoclip_patch_box"]
    assert boxes.shape == (toy.n_obs, 4) and boxes.dtype == np.int64
    side = boxes[:, 2] - boxes[:, 0]
    assert (side == 22).all() and (boxes[:, 3] - boxes[:, 1] == 22).all()  # 110 um / 5 um per hires px
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.abs(centre - toy.obsm["spatial"] * 0.2).max() <= 0.5
    params = toy.uns["histoclip"]["params"]["patches"]
    assert params["size_um"] == 110 and params["size_px"]["toy"] == 22


def test_default_size_is_two_spot_diameters(toy):
    hc.pp.extract_patches(toy)
    assert toy.uns["histoclip"]["params"]["patches"]["size_um"] == 110


def test_copy_leaves_input_untouched(toy):
    out = hc.pp.extract_patches(toy, size_um=60, copy=True)
    assert "histoclip_patch_box" in out.obsm
    assert "histoclip_patch_box" not in toy.obsm and "histoclip" not in toy.uns


def test_patch_smaller_than_a_pixel(toy):
    with pytest.raises(ValueError, match="smaller than one pixel"):
        hc.pp.extract_patches(toy, size_um=1)
    assert "histoclip_patch_box" not in toy.obsm


def test_patch_larger_than_image(toy):
    with pytest.raises(ValueError, match="larger than image"):
        hc.pp.extract_patches(toy, size_um=1e6)


def test_spatialdata_results_go_to_table(toy_sdata):
    hc.pp.extract_patches(toy_sdata, size_um=110)
    table = toy_sdata.tables["table"]
    assert table.obsm["histoclip_patch_box"].shape == (table.n_obs, 4)
    assert table.uns["histoclip"]["params"]["patches"]["image_key"] == "he"


def test_spatial_neighbors_sparse_symmetric(toy):
    hc.pp.spatial_neighbors(toy, n_neighbors=6)
    a = toy.obsp["histoclip_spatial_connectivities"]
    assert a.shape == (toy.n_obs, toy.n_obs) and a.nnz <= toy.n_obs * 12
    assert (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    inner = np.asarray(a.sum(1)).ravel()
    assert np.median(inner) == 6  # hexagonal grid


def test_select_genes_keeps_layer_markers():
    a = hc.datasets.dlpfc()
    genes = hc.pp.select_genes(a, n_top_genes=2000)
    assert len(genes) == 2000 and len(set(genes)) == 2000
    assert {"MOBP", "PLP1", "PCP4", "MBP"} <= set(genes)  # white matter and L5 markers are highly variable


def test_negative_counts_rejected(toy):
    toy.X = toy.X.toarray() - 1
    with pytest.raises(ValueError, match="negative values"):
        hc.pp.select_genes(toy)
