"""Evaluation: domain agreement (ARI, NMI, ...) and per-gene correlation of predicted expression."""

from ._metrics import adjusted_rand, completeness, domain_scores, gene_pearson, homogeneity, normalized_mutual_info

__all__ = ["adjusted_rand", "completeness", "domain_scores", "gene_pearson", "homogeneity", "normalized_mutual_info"]
