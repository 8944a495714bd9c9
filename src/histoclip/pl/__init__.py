"""Figures. Every function returns matplotlib objects and takes ``ax=`` and ``save=``; none calls ``plt.show()``."""

from ._plots import domains, embedding, loss

__all__ = ["domains", "embedding", "loss"]
