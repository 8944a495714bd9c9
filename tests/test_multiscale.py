"""Multiscale (pyramid) SpatialData images: the full-resolution path every Visium user reads their slide by."""

import json

import numpy as np
import pytest

import histoclip as hc
from histoclip.data import PatchReader
from histoclip.io import resolve
from histoclip.io._image import MultiscaleImageSource

from .conftest import toy_spatialdata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def visium_fullres(tmp_path_factory):
    """The toy Space Ranger folder read with a full-resolution TIFF made from its hires image at the scale factor
    (13,332 px square, as large as the spot coordinates say the slide was)."""
    from pathlib import Path

    import tifffile
    from PIL import Image

    spatialdata_io = pytest.importorskip("spatialdata_io")
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "toy" / "scanpy_visium_data" / "1.0.0"
    if not folder.is_dir():
        pytest.skip(f"shared test data not found at {folder}")
    scalef = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    hires = np.asarray(Image.open(folder / "spatial" / "tissue_hires_image.png").convert("RGB"))
    side = int(round(hires.shape[0] / scalef))
    idx = np.minimum((np.arange(side) * scalef).astype(int), hires.shape[0] - 1)  # nearest-neighbour upscaling
    path = tmp_path_factory.mktemp("fullres") / "tissue_fullres.tif"
    tifffile.imwrite(path, hires[idx][:, idx])
    sdata = spatialdata_io.visium(folder, dataset_id="toy", fullres_image_file=path)
    return sdata, scalef


def test_spatialdata_io_fullres_image_is_read_at_the_level_that_fits(visium_fullres):
    sdata, scalef = visium_fullres
    assert type(sdata.images["toy_full_image"]).__name__ == "DataTree"  # what crashed: 'DataTree' has no .data
    table = sdata.tables["table"]
    hc.pp.extract_patches(sdata, image_key="toy_full_image", size_um=110)
    spots = resolve(sdata, image_key="toy_full_image")
    image = spots.slides[0].image
    assert isinstance(image, MultiscaleImageSource) and len(image.levels) == 5
    assert image.shape == (13332, 13332)
    # boxes are in full-resolution pixels, centred on Space Ranger's spot centres
    boxes = table.obsm["histoclip_patch_box"]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    np.testing.assert_allclose(centres, table.obsm["spatial"], atol=1.0)
    side = int(boxes[0, 2] - boxes[0, 0])
    assert side == round(110 / (65 / 89.4275))  # 110 um, Space Ranger's 89.4 px spot diameter spanning 65 um: 151 px
    # a 32 px patch of a 179 px box comes from level 2 (45 px), not from level 0
    assert image.level_for(side, 32) == 2 and image.level_for(side, 128) == 0 and image.level_for(side, 64) == 1
    patches = np.stack([PatchReader(spots, boxes, 32)(i) for i in range(table.n_obs)])
    # the same tissue as cut from the hires image the TIFF was made from
    hc.pp.extract_patches(sdata, image_key="toy_hires_image", size_um=110, key_added="histoclip_patch_box_hires")
    hires = resolve(sdata, image_key="toy_hires_image")
    ref = np.stack([PatchReader(hires, table.obsm["histoclip_patch_box_hires"], 32)(i) for i in range(table.n_obs)])
    assert np.abs(patches.astype(int) - ref.astype(int)).mean() < 3


def test_model_trains_and_embeds_on_the_fullres_pyramid(visium_fullres):
    sdata, _ = visium_fullres
    hc.pp.extract_patches(sdata, image_key="toy_full_image", size_um=110)
    model = hc.tl.train(sdata, image_key="toy_full_image", max_epochs=1, batch_size=50, n_genes=20, hidden_dim=32,
                        latent_dim=8, accelerator="cpu", rng=0)
    assert model.init_params["patch_px"] == 32
    hc.tl.embed(sdata, model)
    z = sdata.tables["table"].obsm["X_histoclip"]
    assert z.shape == (100, 42) and np.isfinite(z).all()


def _pyramid_sdata(n_levels: int):
    """The toy slide's SpatialData with its image as a pyramid of ``n_levels`` levels (1: a plain DataArray)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sdata = toy_spatialdata()
    plain = sdata.images["he"]
    scale = None if n_levels == 1 else [2] * (n_levels - 1)
    sdata.images["he"] = Image2DModel.parse(plain.data, dims=("c", "y", "x"), scale_factors=scale,
                                            transformations=get_transformation(plain, get_all=True))
    return sdata


@pytest.mark.parametrize("n_levels", [2, 3, 4])
def test_pyramids_of_two_to_four_levels(n_levels):
    sdata = _pyramid_sdata(n_levels)
    hc.pp.extract_patches(sdata, size_um=110)
    plain = _pyramid_sdata(1)
    hc.pp.extract_patches(plain, size_um=110)
    boxes = sdata.tables["table"].obsm["histoclip_patch_box"]
    np.testing.assert_array_equal(boxes, plain.tables["table"].obsm["histoclip_patch_box"])  # level-0 pixels
    image = resolve(sdata).slides[0].image
    assert isinstance(image, MultiscaleImageSource) and len(image.levels) == n_levels
    side = int(boxes[0, 2] - boxes[0, 0])  # 19 px
    for out_px in (4, 8, 16, side):
        k = image.level_for(side, out_px)
        assert side * min(image.scales[k]) >= out_px  # never fewer pixels than asked for ...
        coarser = [j for j in range(n_levels) if min(image.scales[j]) < min(image.scales[k])]
        assert all(side * min(image.scales[j]) < out_px for j in coarser)  # ... from the coarsest level that has them
    # full-resolution patches are the plain image's, pixel for pixel; coarser ones show the same tissue
    for out_px, tol in ((side, 0.0), (8, 12.0)):
        got = np.stack([PatchReader(resolve(sdata), boxes, out_px)(i) for i in range(0, 256, 8)])
        ref = np.stack([PatchReader(resolve(plain), boxes, out_px)(i) for i in range(0, 256, 8)])
        assert np.abs(got.astype(float) - ref).mean() <= tol
    thumb, scale = image.thumbnail(100)
    assert max(thumb.shape[:2]) <= 100 and thumb.shape[-1] == 3
    assert scale == pytest.approx(thumb.shape[1] / image.width, rel=0.05)  # thumbnail px per full-resolution px
