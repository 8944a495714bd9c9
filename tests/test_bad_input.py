"""One test per row of docs/bad_input.md: each bad input gets a clear error before any work (and the user's
data is exactly as it was afterwards), or a documented, logged handling."""

import copy
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histoclip as hc
from histoclip.data import PatchReader
from histoclip.io import resolve

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
TINY = {"n_genes": 20, "patch_px": 8, "hidden_dim": 32, "latent_dim": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ helpers
def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray | list | tuple):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def snapshot(adata) -> dict:
    return {
        "obs": adata.obs.copy(),
        "var_names": adata.var_names.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
        "X": None if adata.X is None else adata.X.copy(),
    }


def assert_unchanged(adata, snap: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    assert adata.var_names.equals(snap["var_names"])
    assert list(adata.obsm.keys()) == list(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    assert sorted(adata.uns.keys()) == sorted(snap["uns"])
    assert _same(dict(adata.uns), snap["uns"])
    if snap["X"] is None:
        assert adata.X is None
    elif sp.issparse(snap["X"]):
        assert (adata.X != snap["X"]).nnz == 0
    else:
        np.testing.assert_array_equal(adata.X, snap["X"])


def snapshot_sdata(sdata) -> dict:
    from spatialdata.transformations import get_transformation

    return {
        "elements": (sorted(sdata.images), sorted(sdata.shapes), sorted(sdata.tables)),
        "transforms": {k: sorted(get_transformation(e, get_all=True)) for k, e in [*sdata.images.items(),
                                                                                   *sdata.shapes.items()]},
        "tables": {k: snapshot(t) for k, t in sdata.tables.items()},
    }


def assert_sdata_unchanged(sdata, snap: dict) -> None:
    now = snapshot_sdata(sdata)
    assert now["elements"] == snap["elements"] and now["transforms"] == snap["transforms"]
    for k, s in snap["tables"].items():
        assert_unchanged(sdata.tables[k], s)


def rejects(data, exc, match, fn=hc.pp.extract_patches, **kwargs):
    """``fn(data)`` raises ``exc`` matching ``match`` and leaves ``data`` exactly as it was."""
    is_sdata = hasattr(data, "tables")
    snap = snapshot_sdata(data) if is_sdata else snapshot(data)
    with pytest.raises(exc, match=match):
        fn(data, **kwargs)
    (assert_sdata_unchanged if is_sdata else assert_unchanged)(data, snap)


@pytest.fixture
def small():
    return hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)


@pytest.fixture(scope="module")
def tiny_model():
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    return hc.tl.train(adata, max_epochs=1, batch_size=64, rng=0, accelerator="cpu", **TINY), adata


# ------------------------------------------------------------------------------------------ the rows
def test_no_spatial_coordinates(small):
    del small.obsm["spatial"]
    rejects(small, KeyError, r"obsm\['spatial'\].*not found; obsm has \[\].*read_visium")


def test_nan_coordinates(small):
    small.obsm["spatial"][[3, 7]] = np.nan
    rejects(small, ValueError, r"2 spots with NaN/inf coordinates \(first: \['spot_3', 'spot_7'\]\).*isfinite")


def test_coordinates_entirely_outside_image_wrong_scale_factors(small):
    small.uns["spatial"]["toy"]["scalefactors"]["tissue_hires_scalef"] = 0.5  # should be 0.2
    rejects(small, ValueError,
            r"48 of 64 spots .* entirely outside image 'hires' .*first: \['spot_4'.*scalefactors\['tissue_hires_scalef'\]")


def test_coordinates_partly_outside_image_are_padded(small, caplog):
    small.obsm["spatial"][0] = [0.0, 0.0]  # a corner: three quarters of the patch are outside the image
    with caplog.at_level(logging.INFO, logger="histoclip"):
        hc.pp.extract_patches(small, size_um=110)
    assert re.search(r"1 of 64 patches of library 'toy' reach past the image edge; .*padded with white", caplog.text)
    patch = PatchReader(resolve(small), small.obsm["histoclip_patch_box"], 22)(0)
    assert (patch[:11, :, :] == 255).all() and (patch[:, :11, :] == 255).all()  # outside: white
    assert (patch[11:, 11:, :] != 255).any()  # inside: the image


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "uint16", "float01", "float255"])
def test_image_dtypes_and_channels_are_converted(small, kind):
    hc.pp.extract_patches(small, size_um=110)
    ref_img = small.uns["spatial"]["toy"]["images"]["hires"]
    boxes = small.obsm["histoclip_patch_box"]
    expected = np.stack([PatchReader(resolve(small), boxes, 22)(i) for i in range(small.n_obs)])
    img = {
        "grayscale": ref_img[..., 0],
        "rgba": np.dstack([ref_img, np.full(ref_img.shape[:2], 7, np.uint8)]),
        "uint16": ref_img.astype(np.uint16) * 257,
        "float01": ref_img.astype(np.float32) / 255,
        "float255": ref_img.astype(np.float32),
    }[kind]
    if kind == "grayscale":
        expected = np.repeat(expected[..., :1], 3, axis=-1)
    other = small.copy()
    other.uns["spatial"]["toy"]["images"]["hires"] = img
    hc.pp.extract_patches(other, size_um=110)
    np.testing.assert_array_equal(other.obsm["histoclip_patch_box"], boxes)
    got = np.stack([PatchReader(resolve(other), boxes, 22)(i) for i in range(other.n_obs)])
    assert got.dtype == np.uint8 and got.shape[-1] == 3
    np.testing.assert_array_equal(got, expected)


def test_image_missing(small):
    small.uns["spatial"]["toy"]["images"] = {}
    rejects(small, KeyError, r"Library 'toy' has no image .*set_fullres_image")


def test_fullres_image_file_missing(small, tmp_path):
    small.uns["spatial"]["toy"]["metadata"]["fullres_image"] = str(tmp_path / "gone.tif")
    rejects(small, FileNotFoundError, r"gone.tif.* was not found; .*set_fullres_image", img_key="fullres")


def test_several_libraries_without_library_id(small):
    small.uns["spatial"]["other"] = copy.deepcopy(small.uns["spatial"]["toy"])
    rejects(small, ValueError, r"2 libraries \['toy', 'other'\]; pass library_id=.*library_key=")


def test_spots_with_zero_counts_are_kept_and_logged(small, caplog):
    x = small.X.toarray()
    x[[2, 5, 9]] = 0
    small.X = sp.csr_matrix(x)
    hc.pp.extract_patches(small, size_um=110)
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        model = hc.tl.train(small, max_epochs=1, batch_size=64, rng=0, accelerator="cpu", **TINY)
        hc.tl.embed(small, model)
    assert re.search(r"3 of 64 spots have zero counts \(first: \['spot_2', 'spot_5', 'spot_9'\]\); they are kept",
                     caplog.text)
    z = small.obsm["X_histoclip"]
    assert z.shape[0] == 64 and np.isfinite(z).all()
    expr = hc.pp._genes.expression_matrix(small, model.genes)
    assert (expr[[2, 5, 9]] == 0).all() and (expr.sum(axis=1) > 0).sum() == 61


def test_duplicated_obs_names(small):
    small.obs_names = ["spot_0", *small.obs_names[1:-1], "spot_0"]
    rejects(small, ValueError, r"1 duplicated spot names \(first: \['spot_0'\]\).*adata.obs_names_make_unique\(\)")


def test_duplicated_obs_names_in_spatialdata_table(toy_sdata):
    sdata = toy_sdata
    table = sdata.tables["table"]
    table.obs_names = ["a"] * table.n_obs
    rejects(sdata, ValueError, r"sdata.tables\['table'\].obs_names has 255 duplicated.*obs_names_make_unique")


def test_query_genes_do_not_match_model(tiny_model):
    model, adata = tiny_model
    query = adata.copy()
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    rejects(query, KeyError, r"20 of the model's 20 genes are absent .*model.genes", fn=hc.tl.embed, model=model)


def test_fewer_spots_than_domains(small):
    small.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(small.n_obs, 4)).astype(np.float32)
    rejects(small, ValueError, r"n_domains=100 needs at least 200 spots.*got 64", fn=hc.tl.domains, n_domains=100)


def test_spatialdata_without_table(toy_sdata):
    from spatialdata import SpatialData

    full = toy_sdata
    sdata = SpatialData(images=dict(full.images), shapes=dict(full.shapes))
    rejects(sdata, KeyError, r"no table 'table'; tables: \[\].*TableModel.parse")


def test_spatialdata_table_not_linked_to_shapes(toy_sdata):
    from spatialdata import SpatialData

    full = toy_sdata
    table = full.tables["table"].copy()
    del table.uns["spatialdata_attrs"]
    sdata = SpatialData(images=dict(full.images), shapes=dict(full.shapes), tables={"table": table})
    rejects(sdata, ValueError, r"not linked to spot shapes.*TableModel.parse\(table, region=")


def test_spatialdata_other_coordinate_system(toy_sdata):
    from spatialdata.transformations import get_transformation, set_transformation

    sdata = toy_sdata
    image = sdata.images["he"]
    set_transformation(image, {"aligned": get_transformation(image)}, set_all=True)  # shapes stay in "global"
    rejects(sdata, ValueError, r"share no coordinate system; add a transformation with .*set_transformation")
    rejects(sdata, ValueError, r"coordinate_system 'aligned' is not shared", coordinate_system="aligned")


def test_patch_smaller_than_a_pixel(small):
    rejects(small, ValueError, r"smaller than one pixel.*larger size_um", size_um=1.0)  # 5 um per hires pixel


def test_patch_larger_than_image(small):
    rejects(small, ValueError, r"larger than image 'hires'.*smaller size_um", size_um=1e5)


def test_empty_anndata(small):
    empty = small[:0].copy()
    rejects(empty, ValueError, r"empty \(0 spots\)")


def test_every_test_is_a_row_of_the_docs_table():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and "`test_" in line]
    documented = set(re.findall(r"`(test_\w+)`", "\n".join(rows)))
    here = {name for name in globals() if name.startswith("test_") and name != "test_every_test_is_a_row_of_the_docs_table"}
    assert here == documented
