from pathlib import Path

import numpy as np
import pytest

import histoclip as hc

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_tile_grid_covers_the_tissue_of_a_real_slide():
    path = SHARED / "her2st" / "HER2ST_C3.h5ad"
    if not path.is_file():
        pytest.skip("shared HER2ST data not found")
    import anndata as ad
    from sklearn.neighbors import NearestNeighbors

    a = ad.read_h5ad(path)
    tiles = hc.pp.tile_grid(a, spot_diameter_um=100)
    assert tiles.n_vars == 0 and 0.8 * a.n_obs <= tiles.n_obs <= 1.3 * a.n_obs  # same 200 um spacing as ST spots
    step = 200 / (100 / a.uns["spatial"]["C3"]["scalefactors"]["spot_diameter_fullres"])
    dist, _ = NearestNeighbors(n_neighbors=1).fit(tiles.obsm["spatial"]).kneighbors(a.obsm["spatial"])
    assert np.mean(dist[:, 0] < step) > 0.95  # nearly every measured spot has a tile within one step
    assert tiles.uns["histoclip"]["params"]["tile_grid"]["spacing_um"] == 200
    hc.pp.extract_patches(tiles, size_um=100)  # tiles are ready for the image tower
    assert tiles.obsm["histoclip_patch_box"].shape == (tiles.n_obs, 4)


def test_tile_grid_errors(toy):
    with pytest.raises(ValueError, match="max_tiles"):
        hc.pp.tile_grid(toy, spacing_um=0.01)
    with pytest.raises(ValueError, match="min_tissue"):
        hc.pp.tile_grid(toy, min_tissue=2)


def test_blank_image_has_no_tissue(toy):
    toy.uns["spatial"]["toy"]["images"]["hires"][:] = 255
    with pytest.raises(ValueError, match="No tile"):
        hc.pp.tile_grid(toy)
