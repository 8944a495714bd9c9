"""Lazy access to slide images of any dtype and layout, always handed out as RGB uint8.

Conversion rules (documented in :func:`histoclip.pp.extract_patches`):

* ``uint8``: used as is.
* ``uint16``: scaled from [0, 65535] to [0, 255] (``round(v / 257)``); a uint16 TIFF from its own range instead
  (``BitsPerSample`` below 16, else ``SMinSampleValue``/``SMaxSampleValue``, else 10-, 12- or 14-bit data when the
  sampled maximum says so; logged).
* other integer types: values must lie in [0, 255]; anything else is an error.
* ``bool``: ``False`` -> 0, ``True`` -> 255.
* floating point: values in [0, 1] are scaled by 255, values in [0, 255] are kept; which of the two
  is decided once per image from a strided sample: [0, 1] when its 99th percentile is <= 1 (a few pixels
  slightly above 1, e.g. after stain normalisation, do not flip the whole image to [0, 255]; they are clipped
  and a warning says how many), [0, 255] otherwise. Values are clipped NaN is white (255), like the padding.
* grayscale (``(H, W)`` or one channel): repeated into three channels.
* RGBA (four channels): the alpha channel is dropped.
* TIFF colour tags: CMYK (photometric separated) is converted to RGB, min-is-white grey is inverted; other
  encodings (CIELab, palette, ...) are an error naming the file.
* any other channel count: :class:`ValueError`.

Areas outside the image are filled with ``pad_value`` (white, 255, by default: the slide background).

Multiscale images (a SpatialData ``DataTree``, e.g. the full-resolution slide of ``spatialdata_io.visium(...,
fullres_image_file=...)``) are read through :class:`MultiscaleImageSource`: coordinates stay in the pixels of the
full-resolution level, and a patch of ``out_px`` pixels is cut from the coarsest level that still holds at least
``out_px`` pixels across the box (:meth:`ImageSource.read_patch`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._settings import logger, settings
from .._utils import current_umask

_SAMPLE_POINTS = 256
# The most one TIFF strip or tile may decode to for the file to be read lazily: every patch decodes the strips or
# tiles it touches whole, so one 2.6 MB deflate strip of a 30,000 x 30,000 slide would cost 2.7 GB and 10 s per patch.
MAX_TIFF_CHUNK_BYTES = 64 * 2**20
_MATERIALISE_BYTES = 256 * 2**20
_COMPUTED_LEVELS: dict[str, np.ndarray] = {}  # the last few computed pyramid levels (see MultiscaleImageSource)
_COMPUTED_LEVELS_KEPT = 2


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
    photometric
        How the channels encode colour: ``"rgb"`` (grey, RGB or RGBA, the default), ``"miniswhite"`` (grey with 0 as
        white: inverted) or ``"cmyk"`` (four ink channels, converted as ``R = 255 (1 - C) (1 - K)``, ...).
    value_range
        For integer images, the stored values that mean black and white (e.g. ``(0, 4095)`` for 12-bit data in a
        uint16 array); scaled linearly to [0, 255] and clipped. Default: the dtype's rule (uint16: [0, 65535]).

    """

    def __init__(self, array: Any, layout: Literal["yxc", "cyx", "yx"] = "yxc", name: str = "image", *,
                 photometric: Literal["rgb", "miniswhite", "cmyk"] = "rgb",
                 value_range: tuple[float, float] | None = None, _inspect: bool = True) -> None:
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
        if photometric not in ("rgb", "miniswhite", "cmyk"):
            raise ValueError(f"photometric must be 'rgb', 'miniswhite' or 'cmyk', got {photometric!r}.")
        if photometric == "cmyk" and channels != 4:
            raise ValueError(f"Image {name!r}: a CMYK image needs 4 channels, got {channels} (shape {shape}).")
        if value_range is not None and not (np.isfinite(value_range).all() and value_range[1] > value_range[0]):
            raise ValueError(f"Image {name!r}: value_range must be two finite numbers (black, white) with black < "
                             f"white, got {value_range!r}.")
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
        self.photometric = photometric
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        if self.dtype.kind not in "uifb":
            raise TypeError(f"Image {name!r} has dtype {self.dtype}; expected an integer, float or bool image.")
        self._float_scale = 1.0
        if _inspect:  # (a pyramid inspects its coarsest level only)
            self._float_scale = self._find_float_scale() if self.dtype.kind == "f" else 1.0
            if self.dtype.kind in "ui" and self.dtype not in (np.uint8, np.uint16) and self.value_range is None:
                self._check_integer_range()

    # -- conversion ----------------------------------------------------------------------------------------------
    def _in_memory(self) -> bool:
        return isinstance(self.array, np.ndarray) and not isinstance(self.array, np.memmap)

    def _sample(self) -> np.ndarray:
        """A strided sample of about ``_SAMPLE_POINTS`` x ``_SAMPLE_POINTS`` pixels (small in-memory arrays: whole)."""
        if self._in_memory() and self.height * self.width <= 4 * _SAMPLE_POINTS**2:
            return np.asarray(self.array)
        step_y = max(1, self.height // _SAMPLE_POINTS)
        step_x = max(1, self.width // _SAMPLE_POINTS)
        return self._raw(0, self.height, 0, self.width, step_y, step_x)

    def _find_float_scale(self) -> float:
        sample = np.asarray(self._sample(), dtype=np.float64)
        if sample.ndim == 3 and sample.shape[-1] == 4 and self.photometric != "cmyk":
            sample = sample[..., :3]  # alpha does not say which range the colours are in
        finite = sample[np.isfinite(sample)]
        if not finite.size:
            return 255.0
        vmax, q99 = float(finite.max()), float(np.quantile(finite, 0.99))
        scale = 255.0 if q99 <= 1.0 else 1.0
        if scale == 255.0 and vmax > 1.0:
            logger.warning(
                "Image %r: a float image in [0, 1] (99th percentile %.3g) with %.2g%% of its sampled values above 1 "
                "(maximum %.3g); they are clipped to 1 (white). Rescale the image to [0, 1] first if that is wrong.",
                self.name, q99, 100.0 * float((finite > 1.0).mean()), vmax,
            )
        logger.info("Image %r: float image with sampled 99th percentile %.3g, read as [0, %s].", self.name, q99,
                    "1" if scale == 255.0 else "255")
        return scale

    def _check_integer_range(self) -> None:
        """Integer images other than uint8/uint16 must hold values in [0, 255]: checked before any work starts.

        Arrays in memory are checked whole; lazy ones (dask, zarr, memory maps) from a strided sample, and every
        block read is checked again.
        """
        sample = np.asarray(self.array if self._in_memory() else self._sample())  # min/max: no copy
        if sample.size and (sample.min() < 0 or sample.max() > 255):
            raise ValueError(
                f"Image {self.name!r} has dtype {self.dtype} with values in [{sample.min()}, {sample.max()}], outside "
                "[0, 255]; convert it to uint8 (e.g. np.clip(img, 0, 255).astype(np.uint8)) or to uint16 "
                "(scaled to [0, 65535]) first."
            )

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
        if block.shape[-1] == 4 and self.photometric != "cmyk":
            block = block[..., :3]
        kind = block.dtype.kind
        if self.value_range is not None and kind in "ui":
            lo, hi = self.value_range
            vals = (block.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
            out = np.round(np.clip(vals, 0, 255)).astype(np.uint8)
        elif block.dtype == np.uint8:
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
        else:  # NaN (no data) reads as the slide background, like the padding outside the image
            vals = np.nan_to_num(block.astype(np.float32) * self._float_scale, nan=255.0, posinf=255.0, neginf=0.0)
            out = np.round(np.clip(vals, 0, 255)).astype(np.uint8)
        if self.photometric == "cmyk":  # ink amounts: white paper minus cyan, magenta, yellow, scaled by black
            ink = out.astype(np.uint32)
            out = ((255 - ink[..., :3]) * (255 - ink[..., 3:4]) + 127) // 255
            out = out.astype(np.uint8)
        elif self.photometric == "miniswhite":
            out = 255 - out
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

    def read_patch(self, x0: int, y0: int, x1: int, y1: int, out_px: int, pad_value: int = 255) -> np.ndarray:
        """The box ``[x0, x1) x [y0, y1)`` resized (bilinear) to ``out_px`` x ``out_px`` RGB uint8."""
        return _resize(self.read(x0, y0, x1, y1, pad_value), out_px)

    def thumbnail(self, max_size: int = 1000) -> tuple[np.ndarray, float]:
        """A downsampled RGB uint8 copy no larger than ``max_size`` and its scale (thumbnail px per image px)."""
        step = max(1, int(np.ceil(max(self.height, self.width) / max_size)))
        return self.to_rgb_uint8(self._raw(0, self.height, 0, self.width, step, step)), 1.0 / step

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, {self.height}x{self.width}x{self.channels}, {self.dtype}, {self.layout})"


def _resize(crop: np.ndarray, out_px: int) -> np.ndarray:
    if crop.shape[0] == out_px and crop.shape[1] == out_px:
        return crop
    from PIL import Image

    return np.array(Image.fromarray(crop).resize((out_px, out_px), Image.BILINEAR))


class MultiscaleImageSource(ImageSource):
    """An image pyramid read lazily, addressed in the pixels of its full-resolution level.

    Parameters
    ----------
    levels
        Arrays from full resolution (level 0) to the coarsest level, all with the same layout and channels.
    to_level
        For each level, the 3 x 3 affine map from level-0 pixel coordinates (x, y) to that level's pixel coordinates
        (the identity for level 0); a diagonal scale, possibly with a translation.
    layout, name
        As for :class:`ImageSource`.

    :meth:`read` and :meth:`thumbnail` behave as for the full-resolution level; :meth:`read_patch` reads the box
    from the coarsest level whose side over the box is still at least ``out_px`` pixels, so a 32-pixel patch of a
    40,000-pixel slide is not decoded from level 0.

    """

    def __init__(self, levels: list, to_level: list[np.ndarray], layout: Literal["yxc", "cyx", "yx"] = "cyx",
                 name: str = "image") -> None:
        if not levels or len(levels) != len(to_level):
            raise ValueError(f"Image {name!r}: expected one transformation per level, got {len(levels)} levels and "
                             f"{len(to_level)} transformations.")
        n = len(levels)
        self.levels = [ImageSource(a, layout=layout, name=f"{name}[level {k}]", _inspect=k == n - 1) if k else None
                       for k, a in enumerate(levels)]
        super().__init__(levels[0], layout=layout, name=name)
        self.levels[0] = self
        self.scales: list[tuple[float, float]] = []
        self.offsets: list[tuple[float, float]] = []
        for k, m in enumerate(to_level):
            m = np.asarray(m, dtype=np.float64)
            sx, sy = float(m[0, 0]), float(m[1, 1])
            if (m.shape != (3, 3) or abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9 or not np.isfinite(m).all()
                    or not 0 < sx <= 1 + 1e-6 or not 0 < sy <= 1 + 1e-6):
                raise ValueError(f"Image {name!r}: level {k} is not a downscaled copy of level 0 (its map from level 0 "
                                 f"pixels is {m.tolist()}).")
            self.scales.append((sx, sy))
            self.offsets.append((float(m[0, 2]), float(m[1, 2])))
        for lvl in self.levels[1:]:
            if lvl.channels != self.channels or lvl.dtype != self.dtype:
                raise ValueError(f"Image {name!r}: {lvl!r} differs in channels or dtype from level 0 {self!r}.")
            lvl._float_scale = self._float_scale  # one conversion rule for the whole pyramid

    def _sample(self) -> np.ndarray:
        # the coarsest level stands for the whole pyramid: a strided read of a lazy full-resolution level can
        # decode all of it
        coarsest = self.levels[-1] if len(self.levels) > 1 else None
        return coarsest._sample() if coarsest is not None else super()._sample()

    def level_for(self, side_px: float, out_px: int) -> int:
        """The coarsest level where a box of ``side_px`` level-0 pixels still spans at least ``out_px`` pixels."""
        ok = [k for k, (sx, sy) in enumerate(self.scales) if side_px * min(sx, sy) >= out_px - 1e-6]
        return min(ok, key=lambda k: min(self.scales[k])) if ok else 0

    def _level(self, k: int) -> ImageSource:
        """Level ``k``, computed once if it is a small (``_MATERIALISE_BYTES``) downscaled level held by dask.

        Dask pyramids are often computed from the full-resolution image (``spatialdata_io.visium`` reads a
        plain TIFF as one chunk and coarsens it), so every lazy read of such a level would decode the whole slide.
        """
        lvl = self.levels[k]
        arr = lvl.array
        if k and hasattr(arr, "compute") and hasattr(arr, "dask") and arr.nbytes <= _MATERIALISE_BYTES:
            key = str(getattr(arr, "name", id(arr)))  # dask names are content tokens: the same level, the same name
            if key not in _COMPUTED_LEVELS:
                t0 = time.perf_counter()
                _COMPUTED_LEVELS[key] = np.asarray(arr.compute())
                logger.info("Image %r: level %d (%s, %.0f MiB) computed once in %.1f s.", self.name, k,
                            "x".join(map(str, arr.shape)), arr.nbytes / 2**20, time.perf_counter() - t0)
                while len(_COMPUTED_LEVELS) > _COMPUTED_LEVELS_KEPT:
                    _COMPUTED_LEVELS.pop(next(iter(_COMPUTED_LEVELS)))
            lvl.array = _COMPUTED_LEVELS[key]
        return lvl

    def read_patch(self, x0: int, y0: int, x1: int, y1: int, out_px: int, pad_value: int = 255) -> np.ndarray:
        k = self.level_for(min(x1 - x0, y1 - y0), out_px)
        if k == 0:
            return super().read_patch(x0, y0, x1, y1, out_px, pad_value)
        (sx, sy), (tx, ty) = self.scales[k], self.offsets[k]
        lx0, lx1 = int(np.floor(x0 * sx + tx + 1e-6)), int(np.ceil(x1 * sx + tx - 1e-6))
        ly0, ly1 = int(np.floor(y0 * sy + ty + 1e-6)), int(np.ceil(y1 * sy + ty - 1e-6))
        crop = self._level(k).read(lx0, ly0, max(lx1, lx0 + 1), max(ly1, ly0 + 1), pad_value)
        return _resize(crop, out_px)

    def thumbnail(self, max_size: int = 1000) -> tuple[np.ndarray, float]:
        # the coarsest level still at least max_size wide, strided down from there
        k = 0
        for j, (sx, sy) in enumerate(self.scales):
            if max(self.height * sy, self.width * sx) >= max_size:
                k = j
        if k == 0:
            return super().thumbnail(max_size)
        thumb, scale = self._level(k).thumbnail(max_size)
        return thumb, scale * self.scales[k][0]

    def __repr__(self) -> str:
        return (f"MultiscaleImageSource({self.name!r}, {len(self.levels)} levels, {self.height}x{self.width}x"
                f"{self.channels}, {self.dtype}, {self.layout})")


def max_pixels_error(path: Path, n_pixels: int, limit: int) -> ValueError:
    return ValueError(
        f"Image {str(path)!r} decodes to {n_pixels:,} pixels, more than histoclip.settings.max_image_pixels = "
        f"{limit:,} (a guard against decompression bombs: a small file that decodes to gigabytes). If this is a real "
        "whole-slide image, raise the limit (histoclip.settings.max_image_pixels = None for no limit; decoding needs "
        "about 3 bytes per pixel of memory and of disk in histoclip.settings.cachedir), or convert it to a tiled "
        "TIFF, which is read lazily without a limit."
    )


def _cache_path(path: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(settings.cachedir) / f"{path.stem}-{digest}.npy"


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open an image file lazily.

    TIFF files are memory-mapped (or read strip by strip or tile by tile through their zarr view when compressed),
    whatever their size; the largest image of the file is read (not a thumbnail stored first). A compressed TIFF
    whose strips or tiles each decode to more than ``MAX_TIFF_CHUNK_BYTES`` (64 MiB) cannot be read lazily: it is
    decoded once into the cache like a JPEG, under ``max_image_pixels``, and refused above it (a decompression
    bomb, or a slide to re-save as a tiled pyramidal TIFF). Other formats (JPEG, PNG) cannot be sliced without
    decoding, so they are decoded once into an uncompressed ``.npy`` file in ``histoclip.settings.cachedir`` and
    memory-mapped from there: patches read only the pages they touch, and the decoded image never has to stay in
    memory. Decoding is refused for images of more than ``histoclip.settings.max_image_pixels`` pixels (a guard
    against decompression bombs; raise it for real whole-slide JPEGs or PNGs). 16-bit greyscale PNGs are read as
    uint16. A cache file that cannot be read back
    (truncated, corrupted) is decoded again.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _open_tiff(path)
    cache = _cache_path(path)
    arr = _load_cache(cache) if cache.is_file() else None
    if arr is None:
        _decode_to_cache(path, cache)
        arr = _load_cache(cache)
        if arr is None:
            raise OSError(f"The decoded copy {cache} of {str(path)!r} cannot be read back; check the free space in "
                          "histoclip.settings.cachedir.")
    return ImageSource(arr, layout="yx" if arr.ndim == 2 else "yxc", name=path.name)


_PHOTOMETRIC = {"MINISBLACK": "rgb", "RGB": "rgb", "MINISWHITE": "miniswhite", "SEPARATED": "cmyk",
                "YCBCR": "rgb"}


def _tiff_error(path: Path, what: str) -> ValueError:
    return ValueError(f"Image file {str(path)!r} {what}")


_RESAVE = ("Re-save it as a tiled pyramidal TIFF, e.g. with tifffile: `tifffile.imwrite(out, image, tile=(512, 512), "
           "compression='zlib', photometric='rgb')`, or with libvips: `vips tiffsave in.tif out.tif --tile --pyramid "
           "--compression deflate`")


def _open_tiff(path: Path) -> ImageSource:
    """A TIFF file: its largest image, read lazily strip by strip or tile by tile, with its colour tags applied.

    Checked before any pixel is decoded: the file is whole (every strip or tile lies inside it), its colour encoding
    (photometric) is one histoclip converts, and no strip or tile decodes to more than
    :data:`MAX_TIFF_CHUNK_BYTES` (a file whose strips are larger is decoded once into the cache, like a JPEG, under
    ``settings.max_image_pixels``).
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = [s for s in tif.series if len(s.shape) >= 2]
            if not series:
                raise _tiff_error(path, "is not a readable TIFF: it holds no image (truncated or corrupted?).")
            areas = [int(s.levels[0].keyframe.imagelength) * int(s.levels[0].keyframe.imagewidth) for s in series]
            index = int(np.argmax(areas))  # the full-resolution image, not a thumbnail or label stored first
            chosen = series[index].levels[0]
            page = chosen.keyframe
            axes, shape, dtype = chosen.axes, tuple(int(d) for d in chosen.shape), np.dtype(chosen.dtype)
            name = page.photometric.name if hasattr(page.photometric, "name") else str(page.photometric)
            compression = int(page.compression)
            extra = len(page.extrasamples)
            inkset = page.tags.get("InkSet")
            bits = int(page.bitspersample)
            tags = {k: page.tags.get(k).value for k in ("SMinSampleValue", "SMaxSampleValue", "MaxSampleValue")
                    if page.tags.get(k) is not None}
            chunk_bytes = int(np.prod(page.chunks)) * dtype.itemsize
            contiguous = compression == 1 and bool(page.is_contiguous)
            size = path.stat().st_size
            ends = [int(o) + int(n) for p in chosen.pages if p is not None
                    for o, n in zip(p.dataoffsets, p.databytecounts, strict=False) if n]
            if ends and max(ends) > size:
                raise _tiff_error(path, f"is truncated: its image data runs to byte {max(ends):,} but the file has "
                                        f"{size:,} bytes. Copy or export it again.")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 (any parser error: name the file)
        raise _tiff_error(path, f"is not a readable TIFF (truncated or corrupted?): {type(err).__name__}: {err}") \
            from err
    if len(series) > 1 and index:
        logger.info("Image %r: reading series %d (%s), the largest of its %d images (the first is %s).", path.name,
                    index, "x".join(map(str, shape)), len(series), "x".join(map(str, series[0].shape)))
    photometric = _PHOTOMETRIC.get(name)
    if name == "YCBCR" and compression not in (6, 7):  # tifffile converts JPEG-compressed YCbCr to RGB only
        photometric = None
    if name == "SEPARATED" and (inkset not in (None, 1) and getattr(inkset, "value", inkset) != 1
                                or page.samplesperpixel - extra != 4 or extra):
        photometric = None
    if photometric is None:
        raise _tiff_error(path, f"stores colours as photometric={name} ({page.samplesperpixel} samples, {extra} "
                                "extra); histoclip reads grey, RGB(A), CMYK and JPEG-compressed YCbCr TIFFs. Convert "
                                "it to RGB first, e.g. `PIL.Image.open(path).convert('RGB').save(out)`.")
    value_range = _tiff_value_range(path, dtype, bits, tags)
    layout = "yx" if len(shape) == 2 else ("yxc" if axes.endswith("S") else "cyx")
    n_pixels = shape[-2] * shape[-1] if layout != "yxc" else shape[0] * shape[1]
    arr = None
    if contiguous:
        try:
            arr = tifffile.memmap(path, mode="r", series=index, level=0)
        except (ValueError, tifffile.TiffFileError):
            arr = None
    if arr is None and chunk_bytes > MAX_TIFF_CHUNK_BYTES:
        limit = settings.max_image_pixels
        if limit is not None and n_pixels > limit:
            raise _tiff_error(
                path, f"stores its {'x'.join(map(str, shape))} pixels in strips or tiles of {chunk_bytes / 2**20:,.0f} "
                      f"MiB each, decoded whole for every patch that touches one (a decompression bomb, or a slide "
                      f"written without tiles); histoclip reads TIFF strips or tiles of up to "
                      f"{MAX_TIFF_CHUNK_BYTES / 2**20:.0f} MiB lazily, and decodes smaller images whole only up to "
                      f"histoclip.settings.max_image_pixels = {limit:,} pixels. {_RESAVE}.")
        cache = _cache_path(path)
        arr = _load_cache(cache, dtype) if cache.is_file() else None
        if arr is None:
            _decode_tiff_to_cache(path, cache, index, shape, dtype, chunk_bytes)
            arr = _load_cache(cache, dtype)
            if arr is None:
                raise OSError(f"The decoded copy {cache} of {str(path)!r} cannot be read back; check the free space "
                              "in histoclip.settings.cachedir.")
    if arr is None:
        import zarr

        try:
            arr = zarr.open(tifffile.imread(path, aszarr=True, series=index, level=0), mode="r")
        except Exception as err:  # noqa: BLE001 (any decoder error: name the file)
            raise _tiff_error(path, f"is not a readable TIFF (truncated or corrupted?): {type(err).__name__}: {err}") \
                from err
    source = ImageSource(arr, layout=layout, name=path.name, photometric=photometric,
                         value_range=None if isinstance(value_range, bool) else value_range)
    if value_range is True:
        _observed_bits(source)
    return source


def _tiff_value_range(path: Path, dtype: np.dtype, bits: int, tags: dict) -> tuple[float, float] | None | bool:
    """The stored values of black and white in a uint16 TIFF, from its tags.

    BitsPerSample below 16 gives ``(0, 2**bits - 1)``; else SMinSampleValue/SMaxSampleValue (or MaxSampleValue)
    when they narrow the range; else ``True``: the observed maximum decides (:func:`_observed_bits`). Other dtypes:
    None (the dtype's rule).
    """
    if dtype != np.uint16:
        return None

    def first(v):
        return float(v[0] if isinstance(v, tuple | list) else v)

    if 8 < bits < 16:
        logger.info("Image %r: %d-bit samples (BitsPerSample) read as [0, %d].", path.name, bits, 2**bits - 1)
        return 0.0, float(2**bits - 1)
    hi_tag = "SMaxSampleValue" if "SMaxSampleValue" in tags else "MaxSampleValue" if "MaxSampleValue" in tags else None
    lo = first(tags["SMinSampleValue"]) if "SMinSampleValue" in tags else 0.0
    hi = first(tags[hi_tag]) if hi_tag else 65535.0
    if (lo, hi) != (0.0, 65535.0) and hi > lo:
        logger.info("Image %r: uint16 samples read as [%g, %g] from its %s tag%s.", path.name, lo, hi,
                    hi_tag or "SMinSampleValue", "s" if hi_tag and "SMinSampleValue" in tags else "")
        return lo, hi
    return True


def _observed_bits(source: ImageSource) -> None:
    """uint16 TIFFs without tags saying their range: 10-, 12- or 14-bit data when the sampled maximum says so."""
    vmax = int(np.asarray(source._sample()).max()) if source.height and source.width else 0
    for b in (10, 12, 14):
        if vmax < 2**b and vmax >= 2 ** (b - 2):
            logger.warning(
                "Image %r: uint16 with no tag giving its range and a sampled maximum of %d: read as %d-bit data "
                "([0, %d] to [0, 255]) rather than [0, 65535], which would be %dx too dark. Set the TIFF's "
                "SMaxSampleValue tag, or rescale it to [0, 65535], if that is wrong.",
                source.name, vmax, b, 2**b - 1, 2 ** (16 - b))
            source.value_range = (0.0, float(2**b - 1))
            return
    source.value_range = None


def _decode_tiff_to_cache(path: Path, cache: Path, index: int, shape: tuple[int, ...], dtype: np.dtype,
                          chunk_bytes: int) -> None:
    """Decode a TIFF with strips or tiles too large to read lazily once into the memory-mapped ``.npy`` cache."""
    import tifffile

    cache.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Decoding %s (strips or tiles of %.0f MiB, too large to read lazily) once into the memory-mapped "
                "cache %s", path, chunk_bytes / 2**20, cache)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        try:
            tifffile.imread(path, series=index, level=0, out=out)
        except Exception as err:  # noqa: BLE001 (any decoder error: name the file)
            raise _tiff_error(path, f"cannot be decoded (truncated or corrupted?): {type(err).__name__}: {err}") \
                from err
        out.flush()
        del out
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_cache(cache: Path, dtype: np.dtype | None = None) -> np.ndarray | None:
    """The memory-mapped decoded image, or None (and the file removed) when it cannot be read back."""
    try:
        arr = np.load(cache, mmap_mode="r", allow_pickle=False)
        if arr.ndim not in (2, 3) or arr.dtype not in ((np.uint8, np.uint16) if dtype is None else (dtype,)):
            raise ValueError(f"unexpected array {arr.shape} {arr.dtype}")
        return arr
    except (ValueError, OSError, EOFError) as err:
        logger.warning("The decoded image cache %s is unreadable (%s); decoding the image again.", cache, err)
        cache.unlink(missing_ok=True)
        return None


def _decode_to_cache(path: Path, cache: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    cache.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Decoding %s once into the memory-mapped cache %s", path, cache)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size is checked below, against histoclip's own (raisable) limit
    try:
        with Image.open(path) as im:
            n_pixels = int(im.size[0]) * int(im.size[1])
            limit = settings.max_image_pixels
            if limit is not None and n_pixels > limit:
                raise max_pixels_error(path, n_pixels, limit)
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                arr = np.asarray(im).astype(np.uint16)  # 16-bit greyscale: scaled by 1/257 when read
            elif im.mode in ("RGB", "L"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Image file {str(path)!r} cannot be decoded (truncated or corrupted?): "
                         f"{type(err).__name__}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = old
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, arr)
        del arr
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would keep a shared cache private to one user
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
