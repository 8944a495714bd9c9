"""histoclip: contrastive image-expression embeddings of spatial transcriptomics slides."""

from ._version import __version__
from ._settings import settings
from ._constants import Key
from . import io, pp, data, module, train, model, tl, pl, metrics, datasets  # noqa: E402
from .model import HistoCLIP

__all__ = ["HistoCLIP", "Key", "datasets", "io", "metrics", "pl", "pp", "settings", "tl", "__version__"]
