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
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
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
            r"48 of 64 spots .* entirely outside image 'hires' .*first: \['spot_4'"
            r".*scalefactors\['tissue_hires_scalef'\]")


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


def test_spatial_coordinates_with_three_columns(small):
    small.obsm["spatial"] = np.column_stack([small.obsm["spatial"], np.zeros(small.n_obs)])
    rejects(small, ValueError, r"shape \(n_obs, 2\).*got \(64, 3\).*obsm\['spatial'\]\[:, :2\]")


def test_key_added_over_the_users_data(small):
    rejects(small, ValueError, r"key_added='spatial' would overwrite adata.obsm\['spatial'\]", size_um=110,
            key_added="spatial")
    small.obsm["my_boxes"] = np.ones((small.n_obs, 4))
    rejects(small, ValueError, r"obsm\['my_boxes'\], which histoclip did not write.*del adata.obsm", size_um=110,
            key_added="my_boxes")
    small.obs["cell_type"] = "a"
    small.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(small.n_obs, 4)).astype(np.float32)
    rejects(small, ValueError, r"obs\['cell_type'\], which histoclip did not write", fn=hc.tl.domains, n_domains=2,
            use_rep="X_histoclip", key_added="cell_type")
    hc.tl.domains(small, n_domains=2, use_rep="X_histoclip", key_added="my_domains")
    hc.tl.domains(small, n_domains=3, use_rep="X_histoclip", key_added="my_domains")  # its own key: replaced
    assert small.obs["my_domains"].nunique() == 3 and (small.obs["cell_type"] == "a").all()


def test_library_key_together_with_library_id(small):
    small.obs["lib"] = "toy"
    rejects(small, ValueError,
            r"Pass library_key \('lib'.*or library_id \('toy'.*not both.*adata\[adata.obs\['lib'\] == 'toy'\].copy\(\)",
            size_um=110, library_key="lib", library_id="toy")


def test_spatialdata_table_annotating_two_shape_elements(toy_sdata):
    from spatialdata.models import TableModel

    sdata = toy_sdata
    sdata.shapes["more"] = sdata.shapes["spots"].copy()
    table = sdata.tables["table"]
    region = np.where(np.arange(table.n_obs) < 100, "spots", "more")
    table.obs["region"] = pd.Categorical(region)
    del table.uns["spatialdata_attrs"]
    sdata.tables["table"] = TableModel.parse(table, region=["spots", "more"], region_key="region",
                                             instance_key="spot_id")
    rejects(sdata, ValueError, r"also annotates \['more'\] \(156 of its 256 rows\).*TableModel.parse.*region='spots'",
            size_um=110, shapes_key="spots")


def test_batch_size_of_one(small):
    hc.pp.extract_patches(small, size_um=110)
    rejects(small, ValueError, r"batch_size must be an integer >= 2, got 1.*nothing to contrast", fn=hc.tl.train,
            max_epochs=1, batch_size=1, accelerator="cpu", **TINY)


def test_zero_epochs(small):
    hc.pp.extract_patches(small, size_um=110)
    rejects(small, ValueError, r"max_epochs must be a positive integer, got 0.*untrained", fn=hc.tl.train,
            max_epochs=0, accelerator="cpu", **TINY)


def test_as_many_domains_as_spots(small):
    three = small[:3].copy()
    three.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    rejects(three, ValueError, r"n_domains=3 needs at least 6 spots.*got 3", fn=hc.tl.domains, n_domains=3,
            use_rep="X_histoclip")


def test_duplicated_var_names(small):
    hc.pp.extract_patches(small, size_um=110)
    small.var_names = ["g0", *small.var_names[1:-1], "g0"]
    rejects(small, ValueError, r"var_names has 1 duplicated gene names \(first: \['g0'\]\).*var_names_make_unique",
            fn=hc.tl.train, max_epochs=1, accelerator="cpu", **TINY)
    rejects(small, ValueError, r"duplicated gene names", fn=hc.tl.domains, n_domains=2)


@pytest.mark.parametrize("value", [0, float("nan"), -1.0, "0.2", None])
@pytest.mark.parametrize("field", ["tissue_hires_scalef", "spot_diameter_fullres"])
def test_bad_scale_factor_or_spot_diameter(small, field, value):
    small.uns["spatial"]["toy"]["scalefactors"][field] = value
    exc = TypeError if isinstance(value, str) or value is None else ValueError
    rejects(small, exc, rf"\['scalefactors'\]\['{field}'\] must be a positive.*scalefactors_json.json", size_um=110)


@pytest.mark.parametrize("value", [0, float("nan"), -55.0, "55"])
def test_bad_spot_diameter_um(small, value):
    exc = TypeError if isinstance(value, str) else ValueError
    rejects(small, exc, r"spot_diameter_um must be a positive.*65 for Space Ranger", spot_diameter_um=value)


def test_backed_anndata(small, tmp_path):
    import anndata as ad

    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"backed mode .*small.h5ad.*adata.to_memory\(\)"):
        hc.pp.extract_patches(backed, size_um=110)
    with pytest.raises(ValueError, match=r"backed mode"):
        hc.pp.select_genes(backed, 10)
    backed.file.close()
    assert "histoclip" not in ad.read_h5ad(path).uns


def test_layer_name_typo(small):
    hc.pp.extract_patches(small, size_um=110)
    small.layers["counts"] = small.X.copy()
    rejects(small, KeyError, r"Layer 'count' not found; adata.layers has \['counts'\]", fn=hc.tl.train,
            max_epochs=1, accelerator="cpu", layer="count", **{k: v for k, v in TINY.items()})


def test_two_spots(small):
    two = small[:2].copy()
    hc.pp.extract_patches(two, size_um=110)
    rejects(two, ValueError, r"Only 2 spots: genes are chosen among those detected in at least three spots.*genes=",
            fn=hc.tl.train, max_epochs=1, accelerator="cpu", **TINY)


def test_integer_image_above_255_is_rejected_before_work(small):
    img = small.uns["spatial"]["toy"]["images"]["hires"].astype(np.int32)
    img[0, 0, 0] = 4095  # 12-bit camera values
    small.uns["spatial"]["toy"]["images"]["hires"] = img
    rejects(small, ValueError, r"dtype int32 with values in \[\d+, 4095\], outside \[0, 255\].*uint8.*uint16",
            size_um=110)


def _fullres_file(small, tmp_path, name: str, data: bytes | None = None) -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(small.uns["spatial"]["toy"]["images"]["hires"]).save(path)
    if data is not None:
        path.write_bytes(data)
    lib = small.uns["spatial"]["toy"]
    lib["metadata"]["fullres_image"] = str(path)
    small.obsm["spatial"] = small.obsm["spatial"] * lib["scalefactors"]["tissue_hires_scalef"]
    lib["scalefactors"]["spot_diameter_fullres"] *= lib["scalefactors"]["tissue_hires_scalef"]
    return path


def test_truncated_jpeg_names_the_path(small, tmp_path):
    path = _fullres_file(small, tmp_path, "slide.jpg")
    path.write_bytes(path.read_bytes()[:2000])
    rejects(small, ValueError, r"slide.jpg' cannot be decoded \(truncated or corrupted\?\)", img_key="fullres",
            size_um=110)


def test_corrupted_decode_cache_is_rebuilt(small, tmp_path, caplog):
    from histoclip.io._image import _cache_path

    path = _fullres_file(small, tmp_path, "slide.png")
    hc.pp.extract_patches(small, img_key="fullres", size_um=110)
    expected = PatchReader(resolve(small, img_key="fullres"), small.obsm["histoclip_patch_box"], 16)(5)
    cache = _cache_path(path)
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a disk filled up while it was written
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        got = PatchReader(resolve(small, img_key="fullres"), small.obsm["histoclip_patch_box"], 16)(5)
    assert "is unreadable" in caplog.text and "decoding the image again" in caplog.text
    np.testing.assert_array_equal(got, expected)


def test_singular_coordinate_transformation(toy_sdata):
    from spatialdata.transformations import Scale, set_transformation

    set_transformation(toy_sdata.images["he"], Scale([0.0, 5.0], axes=("y", "x")), to_coordinate_system="global")
    rejects(toy_sdata, ValueError, r"transformation of image 'he' to coordinate system 'global' is singular.*"
            "set_transformation", size_um=110)


def test_sixteen_bit_greyscale_png(small, tmp_path):
    from PIL import Image

    grey = small.uns["spatial"]["toy"]["images"]["hires"][..., 1]
    path = _fullres_file(small, tmp_path, "slide16.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 16-bit greyscale ("I;16")
    hc.pp.extract_patches(small, img_key="fullres", size_um=110)
    got = resolve(small, img_key="fullres").slides[0].image.read(0, 0, grey.shape[1], grey.shape[0])
    np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, axis=-1))


def test_float_image_slightly_above_one(small, caplog):
    img = small.uns["spatial"]["toy"]["images"]["hires"].astype(np.float32) / 255
    img.reshape(-1)[::997] = 1.02  # a few pixels over 1 after stain normalisation
    small.uns["spatial"]["toy"]["images"]["hires"] = img
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        image = resolve(small).slides[0].image
    assert re.search(r"float image in \[0, 1\].*above 1.*clipped", caplog.text)
    got = image.read(0, 0, img.shape[1], img.shape[0])
    np.testing.assert_array_equal(got, np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))


def test_image_larger_than_the_pixel_limit(small, tmp_path, monkeypatch):
    path = _fullres_file(small, tmp_path, "bomb.png")
    monkeypatch.setattr(hc.settings, "max_image_pixels", 1000)
    rejects(small, ValueError, r"bomb.png' decodes to .* pixels, more than histoclip.settings.max_image_pixels = 1,000"
            r".*raise the limit.*tiled TIFF", img_key="fullres", size_um=110)
    assert not list(Path(hc.settings.cachedir).glob("bomb-*"))  # nothing decoded
    monkeypatch.setattr(hc.settings, "max_image_pixels", None)
    hc.pp.extract_patches(small, img_key="fullres", size_um=110)
    assert path.is_file()


def test_every_test_is_a_row_of_the_docs_table():
    text = DOC.read_text().split("\n## ", 1)[0]  # the first table (the others name tests of other files)
    rows = [line for line in text.splitlines() if line.startswith("|") and "`test_" in line]
    documented = set(re.findall(r"`(test_\w+)`", "\n".join(rows)))
    this = "test_every_test_is_a_row_of_the_docs_table"
    here = {name for name in globals() if name.startswith("test_") and name != this}
    assert here == documented
