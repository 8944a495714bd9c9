"""Preprocessing: patch boxes, gene selection, spatial graphs, tile grids."""

from ._genes import select_genes
from ._graph import spatial_neighbors
from ._patches import extract_patches
from ._stain import fit_stain, normalize_stain
from ._tiles import tile_grid

__all__ = ["extract_patches", "fit_stain", "normalize_stain", "select_genes", "spatial_neighbors", "tile_grid"]
