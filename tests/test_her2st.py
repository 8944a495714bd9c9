"""The HER2ST loader, tested offline: the shared raw files are byte-identical to the registry's URLs."""


import numpy as np
import pytest

import histoclip as hc
from histoclip.datasets._her2st import REGISTRY

from .conftest import SHARED, shared_her2st_file


@pytest.fixture(scope="module")
def her2st_cache(her2st_data_root):
    return her2st_data_root / "her2st"


def test_registry_hashes_match_the_shared_files():
    if not (SHARED / "her2st" / "raw").is_dir():
        pytest.skip("shared HER2ST raw files not found")
    import pooch

    for rel, digest in REGISTRY.items():
        assert pooch.file_hash(str(shared_her2st_file(rel)), alg="sha256") == digest, rel


def test_her2st_loads_from_cache_without_network(her2st_cache):
    import anndata as ad

    a = hc.datasets.her2st("C2", path=her2st_cache)
    ref = ad.read_h5ad(SHARED / "her2st" / "HER2ST_C2.h5ad")
    assert a.shape == ref.shape
    np.testing.assert_allclose(a.obsm["spatial"], ref.obsm["spatial"])
    assert (a.X != ref.X).nnz == 0
    sf = a.uns["spatial"]["C2"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(145.8, rel=0.01)  # ~0.69 um/px, 100 um spots
    assert max(a.uns["spatial"]["C2"]["images"]["hires"].shape[:2]) == 2000
    # patches from the full-resolution JPEG, which stays on disk (memory-mapped cache)
    hc.pp.extract_patches(a, img_key="fullres", size_um=100)
    assert a.uns["histoclip"]["params"]["patches"]["size_px"]["C2"] == round(100 / (100 / 145.33))


def test_her2st_rejects_unknown_section(her2st_cache):
    with pytest.raises(ValueError, match="C2"):
        hc.datasets.her2st("A1", path=her2st_cache)

