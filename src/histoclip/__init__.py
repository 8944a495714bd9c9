"""histoclip: contrastive image-expression embeddings of spatial transcriptomics slides.

The submodules (``pp``, ``tl``, ``pl``, ``datasets``, ``io``, ...) and :class:`HistoCLIP` are imported on first use,
so ``import histoclip`` and ``histoclip --help`` do not load torch, scanpy or matplotlib until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._constants import Key
from ._settings import settings
from ._version import __version__

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
