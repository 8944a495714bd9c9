"""Property: the same tissue gives the same patch pixels, whatever the image's dtype, value range, channel count,
layout and number of pyramid levels, and whatever the TIFF file's layout (strips, tiles, planes, pages) and colour
encoding (photometric, bit depth)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histoclip.io._image import ImageSource, MultiscaleImageSource

ENCODINGS = ["uint8", "uint16", "float32_01", "float64_01", "float32_255", "int32"]


def encode(rgb: np.ndarray, encoding: str, channels: int, alpha: np.ndarray) -> np.ndarray:
    """The tissue ``rgb`` (uint8, h x w x 3) in another encoding of the same pixels."""
    x = rgb[..., :1] if channels == 1 else rgb
    if channels == 4:
        x = np.concatenate([x, alpha[..., None]], axis=-1)
    return {
        "uint8": lambda: x,
        "uint16": lambda: x.astype(np.uint16) * 257,
        "float32_01": lambda: x.astype(np.float32) / 255,
        "float64_01": lambda: x.astype(np.float64) / 255,
        "float32_255": lambda: x.astype(np.float32),
        "int32": lambda: x.astype(np.int32),
    }[encoding]()


def source(full: np.ndarray, n_levels: int, layout: str):
    """A single image (one level) or a pyramid whose level k is ``full`` strided by 2**k."""
    def arr(a):
        return np.ascontiguousarray(np.moveaxis(a, -1, 0)) if layout == "cyx" else a

    if n_levels == 1:
        return ImageSource(arr(full), layout=layout)
    levels = [arr(full[:: 2**k, :: 2**k]) for k in range(n_levels)]
    to_level = [np.diag([0.5**k, 0.5**k, 1.0]) for k in range(n_levels)]
    return MultiscaleImageSource(levels, to_level, layout=layout)


@st.composite
def slides(draw):
    n_levels = draw(st.integers(1, 4))
    f = 2 ** (n_levels - 1)  # the tissue is constant over f x f blocks, so every level holds it exactly
    h, w = draw(st.integers(3, 10)), draw(st.integers(3, 10))
    coarse = draw(arrays(np.uint8, (h, w, 3)))
    coarse[0] = 255  # a background row: real slides have white around the tissue
    channels = draw(st.sampled_from([1, 3, 4]))
    if channels == 1:
        coarse = np.repeat(coarse[..., :1], 3, axis=-1)
    encoding = draw(st.sampled_from(ENCODINGS))
    layout = draw(st.sampled_from(["yxc", "cyx"]))
    m = draw(st.integers(1, min(h, w)))  # box side in coarse pixels
    i, j = draw(st.integers(-m + 1, w - 1)), draw(st.integers(-m + 1, h - 1))  # may reach past the edge
    return n_levels, f, coarse, channels, encoding, layout, m, i, j


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slides(), st.data())
def test_same_tissue_same_patch_pixels(slide, data):
    n_levels, f, coarse, channels, encoding, layout, m, i, j = slide
    full = np.repeat(np.repeat(coarse, f, axis=0), f, axis=1)
    alpha = data.draw(arrays(np.uint8, full.shape[:2]))
    image = source(encode(full, encoding, channels, alpha), n_levels, layout)
    x0, y0 = i * f, j * f
    box = (x0, y0, x0 + m * f, y0 + m * f)

    # at the coarsest level's own resolution: exactly the tissue (white where the box leaves the image)
    truth = np.full((m, m, 3), 255, np.uint8)
    ys, xs = slice(max(j, 0), min(j + m, coarse.shape[0])), slice(max(i, 0), min(i + m, coarse.shape[1]))
    truth[ys.start - j : ys.stop - j, xs.start - i : xs.stop - i] = coarse[ys, xs]
    np.testing.assert_array_equal(image.read_patch(*box, out_px=m), truth)

    # at any patch size: the same pixels as the plain uint8 RGB image of the same pyramid
    out_px = data.draw(st.integers(1, m * f + 3))
    plain = source(full if channels != 1 else full, n_levels, "yxc")
    np.testing.assert_array_equal(image.read_patch(*box, out_px=out_px), plain.read_patch(*box, out_px=out_px))
    # and the full-resolution read does not depend on the encoding either
    np.testing.assert_array_equal(image.read(*box), plain.read(*box))


@pytest.mark.parametrize("n_levels", [2, 3, 4])
def test_level_choice_is_the_coarsest_with_enough_pixels(n_levels):
    full = np.zeros((64, 64, 3), np.uint8)
    image = source(full, n_levels, "yxc")
    for side in (1, 7, 16, 33, 64):
        for out_px in (1, 4, 8, 16, 32, 64):
            k = image.level_for(side, out_px)
            expected = max([lv for lv in range(n_levels) if side / 2**lv >= out_px], default=0)
            assert k == expected


# ---------------------------------------------------------------------------------------------- TIFF files
def _cmyk(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float64) / 255
    k = 1 - f.max(-1, keepdims=True)
    cmy = np.where(k < 1, (1 - f - k) / np.maximum(1 - k, 1e-12), 0)
    return np.round(np.concatenate([cmy, k], -1) * 255).astype(np.uint8)


TIFF_ENCODINGS = ["rgb8", "grey8", "miniswhite8", "cmyk8", "rgb16", "rgb12_tagged", "rgb12_untagged", "float32"]


def write_tiff(path, rgb: np.ndarray, encoding: str, layout: dict, thumbnail_first: bool, label_after: bool):
    """The tissue ``rgb`` (uint8, white first row) written as a TIFF in one of many encodings and layouts.

    Returns the RGB uint8 image a correct reader gives back.
    """
    import tifffile

    expected = rgb
    extratags = []
    photometric = "rgb"
    if encoding in ("grey8", "miniswhite8"):
        expected = np.repeat(rgb[..., :1], 3, axis=-1)
        data = rgb[..., 0] if encoding == "grey8" else 255 - rgb[..., 0]
        photometric = "minisblack" if encoding == "grey8" else "miniswhite"
    elif encoding == "cmyk8":
        data, photometric = _cmyk(rgb), "separated"
    elif encoding == "rgb16":
        data = rgb.astype(np.uint16) * 257
    elif encoding.startswith("rgb12"):
        data = np.round(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
        if encoding == "rgb12_tagged":
            extratags = [(341, "H", 3, (4095,) * 3, True)]  # SMaxSampleValue
    elif encoding == "float32":
        data = rgb.astype(np.float32) / 255
    else:
        data = rgb
    kwargs = dict(layout)
    if kwargs.pop("separate", False) and data.ndim == 3:
        data, kwargs["planarconfig"] = np.ascontiguousarray(np.moveaxis(data, -1, 0)), "separate"
    with tifffile.TiffWriter(path) as tif:
        if thumbnail_first:
            thumb = data[..., ::4, ::4] if kwargs.get("planarconfig") else data[::4, ::4]
            tif.write(np.ascontiguousarray(thumb), photometric=photometric, planarconfig=kwargs.get("planarconfig"))
        tif.write(data, photometric=photometric, extratags=extratags, **kwargs)
        if label_after:
            tif.write(np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    return expected


_COUNT = [0]


@st.composite
def tiff_slides(draw):
    h, w = 16 * draw(st.integers(1, 4)), 16 * draw(st.integers(1, 4))
    rgb = draw(arrays(np.uint8, (h, w, 3)))
    rgb[0] = 255  # a background row: real slides have white around the tissue (and it sets the observed maximum)
    encoding = draw(st.sampled_from(TIFF_ENCODINGS))
    layout = draw(st.sampled_from([
        {},  # one uncompressed strip (memory-mapped)
        {"compression": "zlib"},
        {"compression": "zlib", "rowsperstrip": 3},
        {"rowsperstrip": 5},
        {"tile": (16, 16)},
        {"tile": (16, 16), "compression": "zlib"},
        {"compression": "zlib", "separate": True},
        {"tile": (16, 32), "separate": True},
    ]))
    box = (draw(st.integers(-8, w - 1)), draw(st.integers(-8, h - 1)))
    side = draw(st.integers(1, 24))
    return rgb, encoding, layout, draw(st.booleans()), draw(st.booleans()), box, side, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tiff_slides())
def test_tiff_layouts_and_encodings_give_the_same_pixels(tmp_path, slide):
    """Strips or tiles, compressed or not, planar or interleaved, with a thumbnail first or a label after, in any
    encoding histoclip converts (grey, min-is-white, CMYK, 8/12/16 bits, float), read lazily or (strips or tiles
    over the size read lazily) from the decoded cache: the same RGB pixels."""
    import histoclip as hc
    from histoclip.io import _image, open_image

    rgb, encoding, layout, thumb, label, (x0, y0), side, small_budget = slide
    _COUNT[0] += 1
    path = tmp_path / f"slide{_COUNT[0]}.tif"  # a new name each time: the cache is keyed by path, size and mtime
    expected = write_tiff(path, rgb, encoding, layout, thumb, label)
    budget, cachedir = _image.MAX_TIFF_CHUNK_BYTES, hc.settings.cachedir
    try:
        _image.MAX_TIFF_CHUNK_BYTES = 512 if small_budget else budget
        hc.settings.cachedir = tmp_path / "cache"
        image = open_image(path)
    finally:
        _image.MAX_TIFF_CHUNK_BYTES, hc.settings.cachedir = budget, cachedir
    assert image.shape == rgb.shape[:2]
    got = image.read(x0, y0, x0 + side, y0 + side).astype(int)
    truth = np.full((side, side, 3), 255)
    ys, xs = slice(max(y0, 0), min(y0 + side, rgb.shape[0])), slice(max(x0, 0), min(x0 + side, rgb.shape[1]))
    if ys.stop > ys.start and xs.stop > xs.start:  # a box wholly outside the image is all padding
        truth[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = expected[ys, xs]
    tolerance = 1 if encoding in ("cmyk8",) or encoding.startswith("rgb12") else 0
    assert np.abs(got - truth).max() <= tolerance, (encoding, layout, thumb, label)
