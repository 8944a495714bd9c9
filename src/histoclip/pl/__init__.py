"""Figures. Every function returns matplotlib objects and takes ``save=``; none calls ``plt.show()``."""

from ._domain_genes import domain_genes
from ._plots import domains, embedding, loss
from ._prediction import gene_correlation, predicted_expression
from ._shares import domain_shares
from ._weights import image_weight

__all__ = [
    "domain_genes", "domain_shares", "domains", "embedding", "gene_correlation", "image_weight", "loss",
    "predicted_expression",
]
