"""Figures. Every function returns matplotlib objects and takes ``save=``; none calls ``plt.show()``."""

from ._domain_genes import domain_genes
from ._plots import domains, embedding, loss
from ._prediction import gene_correlation, predicted_expression

__all__ = ["domain_genes", "domains", "embedding", "gene_correlation", "loss", "predicted_expression"]
