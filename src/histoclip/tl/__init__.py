"""Tools: one-call wrappers that train, embed and annotate."""

from ._domain_genes import domain_genes
from ._domain_shares import domain_shares
from ._domains import domains
from ._features import foundation_models, image_features
from ._match import match_labels
from ._predict import predict_expression
from ._train import embed, train

__all__ = [
    "domain_genes", "domain_shares", "domains", "embed", "foundation_models", "image_features", "match_labels",
    "predict_expression", "train",
]
