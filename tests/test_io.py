import json

import anndata as ad
import numpy as np
import pytest

import histoclip as hc
from histoclip.io import resolve


def test_resolve_anndata_scales_to_image(toy):
    spots = resolve(toy)
    (slide,) = spots.slides
    assert slide.img_key == "hires"
    np.testing.assert_allclose(slide.coords, toy.obsm["spatial"] * 0.2)
    assert slide.um_per_px == pytest.approx(55.0 / (55.0 * 0.2))


def test_missing_spatial_names_what_to_run(toy):
    del toy.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\].*read_visium"):
        resolve(toy)


def test_missing_image_library(toy):
    del toy.uns["spatial"]
    with pytest.raises(KeyError, match=r"uns\['spatial'\]"):
        resolve(toy)


def test_unknown_library_lists_choices(toy):
    with pytest.raises(KeyError, match=r"'nope'.*\['toy'\]"):
        resolve(toy, library_id="nope")


def test_several_libraries_need_a_choice(toy):
    toy.uns["spatial"]["other"] = toy.uns["spatial"]["toy"]
    with pytest.raises(ValueError, match="library_id"):
        resolve(toy)
    toy.obs["lib"] = "toy"
    spots = resolve(toy, library_key="lib")
    assert [s.library_id for s in spots.slides] == ["toy"]


def test_unknown_img_key(toy):
    with pytest.raises(KeyError, match=r"'lowres' not found.*\['hires'\]"):
        resolve(toy, img_key="lowres")


def test_nan_coordinates_rejected(toy):
    toy.obsm["spatial"][3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        resolve(toy)


def test_empty_anndata():
    with pytest.raises(ValueError, match="empty"):
        resolve(ad.AnnData(np.zeros((0, 3), dtype=np.float32)))


def test_fullres_image_file(toy, tmp_path):
    from PIL import Image

    hires = toy.uns["spatial"]["toy"]["images"]["hires"]
    full = np.asarray(Image.fromarray(hires).resize((hires.shape[1] * 5, hires.shape[0] * 5)))
    Image.fromarray(full).save(tmp_path / "full.jpg", quality=95)
    hc.io.set_fullres_image(toy, tmp_path / "full.jpg")
    spots = resolve(toy, img_key="fullres")
    (slide,) = spots.slides
    np.testing.assert_allclose(slide.coords, toy.obsm["spatial"])
    assert slide.um_per_px == pytest.approx(1.0)
    assert slide.image.shape == full.shape[:2]


def test_spatialdata_alignment_matches_anndata(toy, toy_sdata):
    spots = resolve(toy_sdata)
    (slide,) = spots.slides
    np.testing.assert_allclose(slide.coords, toy.obsm["spatial"] * 0.2, atol=1e-6)
    # a circle's diameter is read as Space Ranger's 65 um spot (SpatialData carries no spot_diameter_um metadata; the
    # AnnData toy says its 55 px spots are 55 um)
    assert slide.um_per_px == pytest.approx(65.0 / (55.0 * 0.2))
    assert resolve(toy_sdata, spot_diameter_um=55).slides[0].um_per_px == pytest.approx(5.0)
    assert spots.adata is toy_sdata.tables["table"]


def test_spatialdata_errors(toy_sdata):
    with pytest.raises(KeyError, match=r"no table 'counts'.*\['table'\]"):
        resolve(toy_sdata, table_key="counts")
    with pytest.raises(KeyError, match="Image 'nope' not found"):
        resolve(toy_sdata, image_key="nope")
    with pytest.raises(ValueError, match="coordinate_system 'other'"):
        resolve(toy_sdata, coordinate_system="other")
    toy_sdata.tables["table"].uns["spatialdata_attrs"] = {}
    with pytest.raises(ValueError, match="not linked to spot shapes"):
        resolve(toy_sdata)


def test_spatialdata_io_visium_folder(visium_folder):
    spatialdata_io = pytest.importorskip("spatialdata_io")
    sdata = spatialdata_io.visium(visium_folder, dataset_id="toy")
    spots = resolve(sdata, image_key="toy_hires_image")
    (slide,) = spots.slides
    table = sdata.tables["table"]
    # spot centres land where Space Ranger's scale factor puts them in the hires image
    scalef = json.loads((visium_folder / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    np.testing.assert_allclose(slide.coords, table.obsm["spatial"] * scalef, rtol=1e-4)
    # and one spot_diameter_fullres spans 65 um (Space Ranger's definition)
    assert 65.0 / slide.um_per_px == pytest.approx(89.4275 * scalef, rel=1e-3)
    assert slide.image.channels == 4  # RGBA, converted to RGB when read
    assert slide.image.read(0, 0, 4, 4).shape == (4, 4, 3)
    hc.pp.extract_patches(sdata, image_key="toy_lowres_image")
    assert "histoclip_patch_box" in table.obsm
