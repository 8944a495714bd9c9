"""The package-wide settings object: ``histoclip.settings``."""

from __future__ import annotations

import logging
import math
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
        ``None``) to read a larger whole-slide JPEG or PNG. TIFF files are read lazily without a limit, unless their
        strips or tiles are too large to read lazily (over 64 MiB each): then this limit applies to them too.
    n_jobs
        CPU threads for training, embedding and image-feature extraction on the CPU (scanpy's name). Reading it
        gives the number in use; set a positive int, ``-1`` for every CPU this process may use, or ``None`` for
        the default, :func:`default_n_jobs` (every usable CPU when OpenMP's waiting threads sleep, half of them
        otherwise). DataLoader workers (``num_workers``) count against it. torch's thread count is set for the
        duration of each call and restored afterwards: set this, not ``torch.set_num_threads``.

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
        self._n_jobs: int | None = None  # None: default_n_jobs()

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

    # --- threads (issue 13) ---
    @property
    def n_jobs(self) -> int:
        """CPU threads used by training, embedding and feature extraction (see the class docstring)."""
        return default_n_jobs() if self._n_jobs is None else self._n_jobs

    @n_jobs.setter
    def n_jobs(self, value: int | None) -> None:
        if value is None:
            self._n_jobs = None
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"n_jobs must be a positive int, -1 (all usable CPUs) or None (default), got {value!r}.")
        if value == -1:
            value = available_cpus()
        if value < 1:
            raise ValueError(f"n_jobs must be a positive int, -1 (all usable CPUs) or None (default), got {value}.")
        self._n_jobs = value

    # --- end threads ---

    def __repr__(self) -> str:
        fields = ("verbosity", "device", "num_workers", "n_jobs", "datasetdir", "cachedir", "progress",
                  "max_image_pixels")
        return "HistoclipSettings(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


# --- threads (issue 13) ---
def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None when unlimited."""
    root = Path("/sys/fs/cgroup")
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2
                candidates.append(("v2", root / path.lstrip("/") / "cpu.max"))
            elif "cpu" in controllers.split(","):
                candidates.append(("v1", root / controllers / path.lstrip("/")))
    except (OSError, ValueError):
        pass
    candidates += [("v2", root / "cpu.max"), ("v1", root / "cpu"), ("v1", root / "cpu,cpuacct")]
    for kind, path in candidates:
        try:
            if kind == "v2":
                quota, period = path.read_text().split()[:2]
                if quota != "max":
                    return int(quota) / int(period)
                return None
            quota = int((path / "cpu.cfs_quota_us").read_text())
            period = int((path / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
        except (OSError, ValueError):
            continue
    return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``os.sched_getaffinity``), capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


# Whether OpenMP's waiting threads sleep in this process: histoclip/__init__.py sets OMP_WAIT_POLICY=PASSIVE when it
# is imported before torch and the user chose no policy; OpenMP reads it once, when torch loads.
OMP_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def default_n_jobs() -> int:
    """The default of ``settings.n_jobs``.

    ``OMP_NUM_THREADS`` when the user set it (capped by the usable CPUs). Otherwise every CPU this process may use
    (:func:`available_cpus`) when OpenMP's waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``, which
    ``import histoclip`` sets when it comes before ``import torch``), and half of them, at least one, when they spin:
    spinning threads fight any other work on the machine for the cores and wait on each other, and training ran
    5-10x slower with a thread per core. See ``benchmarks/threads.py`` and the *Threads* section of
    ``docs/performance.md`` for the measurements.
    """
    n = available_cpus()
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return min(n, int(omp))
    return n if OMP_PASSIVE else max(1, n // 2)


# --- end threads ---


settings = HistoclipSettings()
