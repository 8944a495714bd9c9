"""Figures. Every function returns matplotlib objects and takes ``save=``; none calls ``plt.show()``."""

from ._domain_genes import domain_genes
from ._plots import domains, embedding, loss

__all__ = ["domain_genes", "domains", "embedding", "loss"]
