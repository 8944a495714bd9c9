"""The package-wide settings object: ``histoclip.settings``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

logger = logging.getLogger("histoclip")
logger.addHandler(logging.NullHandler())

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


class HistoclipSettings:
    """Global options for histoclip.

    Attributes
    ----------
    verbosity
        Level of the ``"histoclip"`` logger: ``"error"``, ``"warning"``, ``"info"`` or ``"debug"``.
        Setting it attaches one stream handler to that logger (never to the root logger).
    device
        Default device for training and inference: ``"auto"`` (CUDA, then MPS, then CPU), or a torch
        device string such as ``"cpu"`` or ``"cuda:1"``.
    num_workers
        Default number of DataLoader worker processes.
    datasetdir
        Folder where downloaded datasets are cached (``$HISTOCLIP_DATA`` if set).
    cachedir
        Folder for decoded full-resolution images kept on disk as memory maps (``$HISTOCLIP_CACHE`` if set).
    progress
        Show a progress bar during training.
    max_image_pixels
        Largest JPEG/PNG (width x height) :func:`histoclip.io.open_image` decodes, 300 megapixels by default (about
        900 MB decoded): a guard against decompression bombs, small files that decode to gigabytes. Raise it (or set
        ``None``) to read a larger whole-slide JPEG or PNG; TIFF files are read lazily and have no limit.

    """

    def __init__(self) -> None:
        self._verbosity: str = "warning"
        self.device: str = "auto"
        self.num_workers: int = 0
        self.datasetdir: Path = Path(os.environ.get("HISTOCLIP_DATA", Path.home() / ".cache" / "histoclip" / "data"))
        self.cachedir: Path = Path(os.environ.get("HISTOCLIP_CACHE", Path.home() / ".cache" / "histoclip" / "images"))
        self.progress: bool = True
        self.max_image_pixels: int | None = 300_000_000
        self._handler: logging.Handler | None = None

    @property
    def verbosity(self) -> str:
        """Level of the package logger."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: Literal["error", "warning", "info", "debug"]) -> None:
        if value not in _LEVELS:
            raise ValueError(f"verbosity must be one of {list(_LEVELS)}, got {value!r}.")
        self._verbosity = value
        logger.setLevel(_LEVELS[value])
        if self._handler is None:
            self._handler = logging.StreamHandler()
            self._handler.setFormatter(logging.Formatter("%(levelname)s histoclip: %(message)s"))
            logger.addHandler(self._handler)

    def __repr__(self) -> str:
        fields = ("verbosity", "device", "num_workers", "datasetdir", "cachedir", "progress", "max_image_pixels")
        return "HistoclipSettings(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


settings = HistoclipSettings()
