"""histoclip: contrastive image-expression embeddings of spatial transcriptomics slides."""

from . import data, datasets, io, metrics, model, module, pl, pp, tl, train  # noqa: E402
from ._constants import Key
from ._settings import settings
from ._version import __version__
from .model import HistoCLIP

__all__ = ["HistoCLIP", "Key", "datasets", "io", "metrics", "pl", "pp", "settings", "tl", "__version__"]
