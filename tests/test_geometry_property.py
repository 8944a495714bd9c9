"""Property-based tests of patch geometry: centred, the requested physical size, consistent padding."""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import histoclip as hc
from histoclip.data import PatchReader
from histoclip.io import ImageSource
from histoclip.io._slide import Slide, SpotData
from histoclip.pp._patches import patch_boxes

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _spots(coords: np.ndarray, um_per_px: float, image: ImageSource) -> SpotData:
    adata = AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(coords))]))
    return SpotData(adata, [Slide("lib", np.arange(len(coords)), coords, um_per_px, "hires", image)])


def _expected_read(img: np.ndarray, box, pad: int) -> np.ndarray:
    """What reading ``box`` must give, built pixel by pixel: the image inside, ``pad`` outside."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.full((y1 - y0, x1 - x0, 3), pad, dtype=np.uint8)
    h, w = img.shape[:2]
    for r in range(y1 - y0):
        for c in range(x1 - x0):
            y, x = y0 + r, x0 + c
            if 0 <= y < h and 0 <= x < w:
                out[r, c] = img[y, x]
    return out


@FAST
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    um_per_px=st.floats(0.05, 20.0),
    side_frac=st.floats(0.0, 1.0),
    fx=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=4),
    fy=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=4, max_size=4),
    pad=st.integers(0, 255),
    seed=st.integers(0, 2**16),
)
def test_patch_centred_sized_and_padded(h, w, um_per_px, side_frac, fx, fy, pad, seed):
    side_px = 1.0 + side_frac * (max(h, w) - 1)  # between one pixel and the image's longer side
    size_um = side_px * um_per_px
    assume(1.0 <= size_um / um_per_px <= max(h, w))
    coords = np.column_stack([np.asarray(fx) * w, np.asarray(fy[: len(fx)]) * h])  # spot centres on the image
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    source = ImageSource(img)
    spots = _spots(coords, um_per_px, source)

    boxes, sides = patch_boxes(spots, size_um)

    side = round(size_um / um_per_px)
    assert sides == {"lib": side}
    np.testing.assert_array_equal(boxes[:, 2] - boxes[:, 0], side)  # square, of the requested physical size
    np.testing.assert_array_equal(boxes[:, 3] - boxes[:, 1], side)
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    assert np.abs(centres - coords).max() <= 0.5 + 1e-9  # centred within half a pixel
    reader = PatchReader(spots, boxes, side)  # no resize: the patch is exactly the box
    for i, box in enumerate(boxes):
        np.testing.assert_array_equal(source.read(*box, pad_value=pad), _expected_read(img, box, pad))
        np.testing.assert_array_equal(reader(i), _expected_read(img, box, 255))  # white by default


@FAST
@given(
    scalef=st.floats(0.05, 1.0),
    spot_diameter_fullres=st.floats(20.0, 200.0),
    size_um=st.floats(10.0, 300.0),
    seed=st.integers(0, 2**16),
)
def test_extract_patches_follows_scale_factors(scalef, spot_diameter_fullres, size_um, seed):
    rng = np.random.default_rng(seed)
    h, w = 120, 150  # image pixels
    um_per_px = 65.0 / spot_diameter_fullres / scalef  # um per image pixel: spot_diameter_fullres spans 65 um
    assume(1.0 <= size_um / um_per_px <= max(h, w))
    xy_img = rng.uniform([0, 0], [w, h], size=(6, 2))
    adata = AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(6)]))
    adata.obsm["spatial"] = xy_img / scalef  # full-resolution pixels
    adata.uns["spatial"] = {"lib": {
        "images": {"hires": rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)},
        "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": spot_diameter_fullres},
    }}
    hc.pp.extract_patches(adata, size_um=size_um)
    boxes = adata.obsm["histoclip_patch_box"]
    side = round(size_um / um_per_px)
    params = adata.uns["histoclip"]["params"]["patches"]
    assert params["size_px"]["lib"] == side
    assert params["um_per_px"]["lib"] == pytest.approx(um_per_px)
    np.testing.assert_array_equal(boxes[:, 2:] - boxes[:, :2], side)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.abs(centres - xy_img).max() <= 0.5 + 1e-6


@FAST
@given(
    w=st.integers(5, 40),
    h=st.integers(5, 40),
    side_px=st.integers(1, 5),
    gap=st.floats(0.0, 100.0),
    corner=st.sampled_from(["left", "right", "top", "bottom"]),
)
def test_patch_entirely_outside_is_an_error(w, h, side_px, gap, corner):
    """A patch that cannot hold a single image pixel always means coordinates and image disagree."""
    far = side_px / 2 + 0.5 + gap  # the box [round(c - side/2), +side) ends before 0 or starts after the edge
    sides = {"left": (-far, h / 2), "right": (w + far, h / 2), "top": (w / 2, -far), "bottom": (w / 2, h + far)}
    cx, cy = sides[corner]
    coords = np.array([[w / 2, h / 2], [cx, cy]])
    spots = _spots(coords, 1.0, ImageSource(np.zeros((h, w, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"1 of 2 spots .* entirely outside image .*first: \['s1'\]"):
        patch_boxes(spots, float(side_px))
