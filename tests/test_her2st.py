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



def test_her2st_b4_patient_b_loads_from_cache(her2st_cache):
    import anndata as ad

    a = hc.datasets.her2st("B4", path=her2st_cache)
    ref = ad.read_h5ad(SHARED / "her2st" / "HER2ST_B4.h5ad")
    assert a.shape == ref.shape == (283, ref.n_vars)
    np.testing.assert_allclose(a.obsm["spatial"], ref.obsm["spatial"])
    assert (a.X != ref.X).nnz == 0


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails as it does without network (no socket is opened)."""
    import pooch
    import requests

    calls = []

    def refuse(self, url, output_file, pooch_obj, check_only=False):
        calls.append(url)
        raise requests.exceptions.ConnectionError(f"Failed to resolve 'github.com' ({url})")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", refuse)
    return calls


def test_missing_file_offline_names_file_hash_and_where_to_put_it(tmp_path, offline):
    rel = "data/ST-cnts/B4.tsv.gz"
    with pytest.raises(OSError, match="HER2ST: could not get") as err:
        hc.datasets.her2st("B4", path=tmp_path)
    msg = str(err.value)
    assert rel in msg and REGISTRY[rel] in msg and str(tmp_path / rel) in msg and "no file at" in msg
    assert offline  # pooch tried (and failed) to download


def test_corrupted_cached_file_names_both_hashes(her2st_cache, tmp_path, offline):
    import shutil

    import pooch

    rel = "data/ST-spotfiles/C3_selection.tsv"
    root = tmp_path / "her2st"
    for r in ("data/ST-cnts/C3.tsv.gz", rel):
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(her2st_cache / r, root / r)
    with open(root / rel, "ab") as f:
        f.write(b"corrupted\n")
    got = pooch.file_hash(str(root / rel), alg="sha256")
    with pytest.raises(OSError, match=f"has sha256 {got}") as err:
        hc.datasets.her2st("C3", path=root)
    assert REGISTRY[rel] in str(err.value) and str(root / rel) in str(err.value)


def test_download_with_wrong_content_is_rejected_with_the_expected_hash(tmp_path, monkeypatch):
    import pooch

    def wrong_bytes(self, url, output_file, pooch_obj, check_only=False):
        with open(output_file, "wb") as f:  # what a proxy error page or a truncated transfer looks like
            f.write(b"<html>not the file</html>")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", wrong_bytes)
    rel = "data/ST-cnts/C2.tsv.gz"
    with pytest.raises(OSError, match="Expected sha256 " + REGISTRY[rel]):
        hc.datasets.her2st("C2", path=tmp_path)
    assert not (tmp_path / rel).exists()  # pooch does not keep a file that failed its hash
