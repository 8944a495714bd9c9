"""Preprocessing: patch boxes, gene selection, spatial graphs."""

from ._genes import select_genes
from ._graph import spatial_neighbors
from ._patches import extract_patches

__all__ = ["extract_patches", "select_genes", "spatial_neighbors"]
