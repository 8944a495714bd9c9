"""Lazy access to slide images of any dtype and layout, always handed out as RGB uint8.

Conversion rules (documented in :func:`histoclip.pp.extract_patches`):

* ``uint8``: used as is.
* ``uint16``: scaled from [0, 65535] to [0, 255] (``round(v / 257)``).
* other integer types: values must lie in [0, 255]; anything else is an error.
* ``bool``: ``False`` -> 0, ``True`` -> 255.
* floating point: values in [0, 1] are scaled by 255, values in [0, 255] are kept; which of the two
  is decided once per image from a strided sample: [0, 1] when its 99th percentile is <= 1 (a few pixels
  slightly above 1, e.g. after stain normalisation, do not flip the whole image to [0, 255]; they are clipped
  and a warning says how many), [0, 255] otherwise. Values are clipped.
* grayscale (``(H, W)`` or one channel): repeated into three channels.
* RGBA (four channels): the alpha channel is dropped.
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

_SAMPLE_POINTS = 256
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

    """

    def __init__(self, array: Any, layout: Literal["yxc", "cyx", "yx"] = "yxc", name: str = "image", *,
                 _inspect: bool = True) -> None:
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
        if self.dtype.kind not in "uifb":
            raise TypeError(f"Image {name!r} has dtype {self.dtype}; expected an integer, float or bool image.")
        self._float_scale = 1.0
        if _inspect:  # (a pyramid inspects its coarsest level only)
            self._float_scale = self._find_float_scale() if self.dtype.kind == "f" else 1.0
            if self.dtype.kind in "ui" and self.dtype not in (np.uint8, np.uint16):
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
        if sample.ndim == 3 and sample.shape[-1] == 4:
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

    TIFF files are memory-mapped (or read tile by tile through their zarr view when compressed), whatever their
    size. Other formats (JPEG, PNG) cannot be sliced without decoding, so they are decoded once into an uncompressed
    ``.npy`` file in ``histoclip.settings.cachedir`` and memory-mapped from there: patches read only the pages they
    touch, and the decoded image never has to stay in memory. Decoding is refused for images of more than
    ``histoclip.settings.max_image_pixels`` pixels (a guard against decompression bombs; raise it for real
    whole-slide JPEGs or PNGs). 16-bit greyscale PNGs are read as uint16. A cache file that cannot be read back
    (truncated, corrupted) is decoded again.
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

            try:
                arr = zarr.open(tifffile.imread(path, aszarr=True, level=0), mode="r")
            except Exception as err:  # noqa: BLE001 (any decoder error: name the file)
                raise ValueError(f"Image file {str(path)!r} is not a readable TIFF (truncated or corrupted?): "
                                 f"{type(err).__name__}: {err}") from err
        layout = "yx" if arr.ndim == 2 else ("cyx" if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4)
                                               else "yxc")
        return ImageSource(arr, layout=layout, name=path.name)
    cache = _cache_path(path)
    arr = _load_cache(cache) if cache.is_file() else None
    if arr is None:
        _decode_to_cache(path, cache)
        arr = _load_cache(cache)
        if arr is None:
            raise OSError(f"The decoded copy {cache} of {str(path)!r} cannot be read back; check the free space in "
                          "histoclip.settings.cachedir.")
    return ImageSource(arr, layout="yx" if arr.ndim == 2 else "yxc", name=path.name)


def _load_cache(cache: Path) -> np.ndarray | None:
    """The memory-mapped decoded image, or None (and the file removed) when it cannot be read back."""
    try:
        arr = np.load(cache, mmap_mode="r", allow_pickle=False)
        if arr.ndim not in (2, 3) or arr.dtype not in (np.uint8, np.uint16):
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
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
