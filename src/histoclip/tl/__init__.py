"""Tools: one-call wrappers that train, embed and annotate."""

from ._domains import domains
from ._train import embed, train

__all__ = ["domains", "embed", "train"]
