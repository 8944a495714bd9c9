"""Lazy access to slide images of any dtype and layout, always handed out as RGB uint8.

Conversion rules (documented in :func:`histoclip.pp.extract_patches`):

* ``uint8``: used as is.
* ``uint16``: scaled from [0, 65535] to [0, 255] (``round(v / 257)``).
* other integer types: values must lie in [0, 255]; anything else is an error.
* ``bool``: ``False`` -> 0, ``True`` -> 255.
* floating point: values in [0, 1] are scaled by 255, values in [0, 255] are kept; which of the two
  is decided once per image from a strided sample (maximum <= 1 means [0, 1]). Values are clipped.
* grayscale (``(H, W)`` or one channel): repeated into three channels.
* RGBA (four channels): the alpha channel is dropped.
* any other channel count: :class:`ValueError`.

Areas outside the image are filled with ``pad_value`` (white, 255, by default: the slide background).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._settings import logger, settings

_SAMPLE_POINTS = 256


class ImageSource:
    """A read-only, lazily sliced image.

    Parameters
    ----------
    array
        Anything sliceable with numpy semantics: a numpy array or memmap, a dask array, a zarr array,
        an :class:`xarray.DataArray`'s ``.data``. Only the slices asked for are ever read.
    layout
        ``"yxc"`` (height, width, channels), ``"cyx"`` (SpatialData images) or ``"yx"`` (grayscale).
    name
        A label used in messages.

    """

    def __init__(self, array: Any, layout: Literal["yxc", "cyx", "yx"] = "yxc", name: str = "image") -> None:
        shape = tuple(int(s) for s in array.shape)
        if layout == "yx" or len(shape) == 2:
            if len(shape) != 2:
                raise ValueError(f"Image {name!r}: expected a 2-D grayscale array for layout 'yx', got shape {shape}.")
            layout = "yx"
            height, width, channels = shape[0], shape[1], 1
        elif len(shape) != 3:
            raise ValueError(
                f"Image {name!r}: expected an array of shape (height, width[, channels]) or (channels, height, width), "
                f"got shape {shape}."
            )
        elif layout == "yxc":
            height, width, channels = shape
        elif layout == "cyx":
            channels, height, width = shape
        else:
            raise ValueError(f"layout must be 'yxc', 'cyx' or 'yx', got {layout!r}.")
        if channels not in (1, 3, 4):
            raise ValueError(
                f"Image {name!r} has {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA). "
                f"Shape {shape}, layout {layout!r}."
            )
        if height < 1 or width < 1:
            raise ValueError(f"Image {name!r} is empty: shape {shape}.")
        self.array = array
        self.layout = layout
        self.name = name
        self.height = height
        self.width = width
        self.channels = channels
        self.dtype = np.dtype(array.dtype)
        self._float_scale = self._find_float_scale() if self.dtype.kind == "f" else 1.0
        if self.dtype.kind not in "uifb":
            raise TypeError(f"Image {name!r} has dtype {self.dtype}; expected an integer, float or bool image.")

    # -- conversion ----------------------------------------------------------------------------------------------
    def _find_float_scale(self) -> float:
        step_y = max(1, self.height // _SAMPLE_POINTS)
        step_x = max(1, self.width // _SAMPLE_POINTS)
        sample = np.asarray(self._raw(0, self.height, 0, self.width, step_y, step_x), dtype=np.float64)
        finite = sample[np.isfinite(sample)]
        vmax = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if vmax <= 1.0 else 1.0
        logger.info("Image %r: float image with sampled maximum %.3g, read as [0, %s].", self.name, vmax,
                    "1" if scale == 255.0 else "255")
        return scale

    def _raw(self, y0: int, y1: int, x0: int, x1: int, sy: int = 1, sx: int = 1) -> np.ndarray:
        if self.layout == "yxc":
            block = self.array[y0:y1:sy, x0:x1:sx, :]
        elif self.layout == "cyx":
            block = self.array[:, y0:y1:sy, x0:x1:sx]
        else:
            block = self.array[y0:y1:sy, x0:x1:sx]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        if self.layout == "cyx":
            block = np.moveaxis(block, 0, -1)
        return block

    def to_rgb_uint8(self, block: np.ndarray) -> np.ndarray:
        """Convert a raw block (h, w[, c]) to RGB uint8 following the module's rules."""
        if block.ndim == 2:
            block = block[..., None]
        if block.shape[-1] == 4:
            block = block[..., :3]
        kind = block.dtype.kind
        if block.dtype == np.uint8:
            out = block
        elif block.dtype == np.uint16:
            out = np.round(block.astype(np.float32) / 257.0).astype(np.uint8)
        elif kind == "b":
            out = block.astype(np.uint8) * 255
        elif kind in "ui":
            if block.size and (block.min() < 0 or block.max() > 255):
                raise ValueError(
                    f"Image {self.name!r} has dtype {block.dtype} with values outside [0, 255]; "
                    "convert it to uint8 or uint16 first."
                )
            out = block.astype(np.uint8)
        else:
            vals = np.nan_to_num(block.astype(np.float32) * self._float_scale, nan=0.0)
            out = np.round(np.clip(vals, 0, 255)).astype(np.uint8)
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        return np.ascontiguousarray(out)

    # -- public ----------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.height, self.width

    def read(self, x0: int, y0: int, x1: int, y1: int, pad_value: int = 255) -> np.ndarray:
        """RGB uint8 pixels of the box ``[x0, x1) x [y0, y1)``; parts outside the image are ``pad_value``."""
        h, w = y1 - y0, x1 - x0
        if h <= 0 or w <= 0:
            raise ValueError(f"Empty box x=[{x0}, {x1}), y=[{y0}, {y1}).")
        out = np.full((h, w, 3), pad_value, dtype=np.uint8)
        cy0, cy1 = max(y0, 0), min(y1, self.height)
        cx0, cx1 = max(x0, 0), min(x1, self.width)
        if cy0 < cy1 and cx0 < cx1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.to_rgb_uint8(self._raw(cy0, cy1, cx0, cx1))
        return out

    def thumbnail(self, max_size: int = 1000) -> tuple[np.ndarray, float]:
        """A downsampled RGB uint8 copy no larger than ``max_size`` and its scale (thumbnail px per image px)."""
        step = max(1, int(np.ceil(max(self.height, self.width) / max_size)))
        return self.to_rgb_uint8(self._raw(0, self.height, 0, self.width, step, step)), 1.0 / step

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, {self.height}x{self.width}x{self.channels}, {self.dtype}, {self.layout})"


def _cache_path(path: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(settings.cachedir) / f"{path.stem}-{digest}.npy"


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open an image file lazily.

    TIFF files are memory-mapped (or read tile by tile through their zarr view when compressed). Other
    formats (JPEG, PNG) cannot be sliced without decoding, so they are decoded once into an uncompressed
    ``.npy`` file in ``histoclip.settings.cachedir`` and memory-mapped from there: patches read only the
    pages they touch, and the decoded image never has to stay in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.memmap(path, mode="r")
        except (ValueError, tifffile.TiffFileError):
            import zarr

            arr = zarr.open(tifffile.imread(path, aszarr=True, level=0), mode="r")
        layout = "yx" if arr.ndim == 2 else ("cyx" if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4)
                                               else "yxc")
        return ImageSource(arr, layout=layout, name=path.name)
    cache = _cache_path(path)
    if not cache.is_file():
        from PIL import Image

        cache.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Decoding %s once into the memory-mapped cache %s", path, cache)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # whole-slide images are legitimately large
        try:
            with Image.open(path) as im:
                im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
                arr = np.asarray(im)
        finally:
            Image.MAX_IMAGE_PIXELS = old
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, arr)
        del arr
        os.replace(tmp, cache)
    arr = np.load(cache, mmap_mode="r")
    return ImageSource(arr, layout="yx" if arr.ndim == 2 else "yxc", name=path.name)
