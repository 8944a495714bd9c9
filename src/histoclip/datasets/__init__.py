"""Datasets: the bundled DLPFC slide, a seeded toy generator, and downloads of larger public data."""

from ._datasets import dlpfc, toy
from ._her2st import her2st, her2st_registry

__all__ = ["dlpfc", "her2st", "her2st_registry", "toy"]
