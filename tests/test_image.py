import numpy as np
import pytest

from histoclip.io import ImageSource, open_image


def test_uint8_passthrough_and_padding():
    arr = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    src = ImageSource(arr)
    np.testing.assert_array_equal(src.read(0, 0, 6, 5), arr)
    out = src.read(-2, -1, 3, 2)
    assert out.shape == (3, 5, 3)
    assert (out[0] == 255).all() and (out[:, :2] == 255).all()
    np.testing.assert_array_equal(out[1:, 2:], arr[:2, :3])


def test_box_fully_outside_is_all_padding():
    src = ImageSource(np.zeros((4, 4, 3), dtype=np.uint8))
    assert (src.read(10, 10, 14, 14, pad_value=7) == 7).all()


def test_uint16_scaled():
    arr = np.array([[[0, 257, 65535]]], dtype=np.uint16)
    np.testing.assert_array_equal(ImageSource(arr).read(0, 0, 1, 1)[0, 0], [0, 1, 255])


@pytest.mark.parametrize(("scale", "values"), [(1.0, [0.0, 0.5, 1.0]), (255.0, [0.0, 127.5, 255.0])])
def test_float_ranges(scale, values):
    arr = np.tile(np.array(values, dtype=np.float32), (4, 4, 1))
    out = ImageSource(arr).read(0, 0, 1, 1)[0, 0]
    np.testing.assert_array_equal(out, [0, 128, 255])


def test_rgba_drops_alpha_and_gray_repeats():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 99
    assert ImageSource(rgba).read(0, 0, 2, 2)[0, 0].tolist() == [10, 0, 0]
    gray = np.full((3, 3), 42, dtype=np.uint8)
    assert ImageSource(gray).read(0, 0, 1, 1)[0, 0].tolist() == [42, 42, 42]


def test_cyx_layout():
    arr = np.zeros((3, 4, 5), dtype=np.uint8)
    arr[1] = 200
    src = ImageSource(arr, layout="cyx")
    assert src.shape == (4, 5)
    assert src.read(0, 0, 5, 4)[2, 3].tolist() == [0, 200, 0]


def test_bad_channels_and_dtype():
    with pytest.raises(ValueError, match="channels"):
        ImageSource(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"outside \[0, 255\]"):
        ImageSource(np.full((2, 2, 3), 300, dtype=np.int32)).read(0, 0, 2, 2)


def test_open_jpeg_is_memory_mapped(tmp_path):
    from PIL import Image

    arr = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "slide.png")
    src = open_image(tmp_path / "slide.png")
    assert isinstance(src.array, np.memmap)
    np.testing.assert_array_equal(src.read(5, 6, 15, 16), arr[6:16, 5:15])


def test_open_tiff(tmp_path):
    import tifffile

    arr = (np.random.default_rng(1).random((30, 20, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "slide.tif", arr)
    src = open_image(tmp_path / "slide.tif")
    expected = np.round(arr[:10, :10].astype(np.float32) / 257).astype(np.uint8)
    np.testing.assert_array_equal(src.read(0, 0, 10, 10), expected)


def test_open_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image(tmp_path / "nope.jpg")
