"""histoclip: contrastive image-expression embeddings of spatial transcriptomics slides.

The submodules (``pp``, ``tl``, ``pl``, ``datasets``, ``io``, ...) and :class:`HistoCLIP` are imported on first use,
so ``import histoclip`` and ``histoclip --help`` do not load torch, scanpy or matplotlib until they are needed.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while they wait take the cores that other work on the machine needs, and torch's threads
# then wait on each other: training ran 5-10x slower on a shared machine (benchmarks/threads.py). Ask OpenMP to let
# waiting threads sleep. OpenMP reads this once, when torch loads, so it is set only if torch is not loaded yet and
# the user has not chosen a policy (docs/performance.md, "Threads").
if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from ._constants import Key  # noqa: E402
from ._settings import settings  # noqa: E402
from ._version import __version__  # noqa: E402

if TYPE_CHECKING:  # for type checkers and IDEs: the names the lazy loader below gives
    from . import data, datasets, io, metrics, model, module, pl, pp, tl, train  # noqa: F401
    from .model import HistoCLIP

_SUBMODULES = ("data", "datasets", "io", "metrics", "model", "module", "pl", "pp", "tl", "train")

__all__ = ["HistoCLIP", "Key", "datasets", "io", "metrics", "pl", "pp", "settings", "tl", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod  # later look-ups skip this function
        return mod
    if name == "HistoCLIP":
        from .model import HistoCLIP

        globals()[name] = HistoCLIP
        return HistoCLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | {"HistoCLIP"})
