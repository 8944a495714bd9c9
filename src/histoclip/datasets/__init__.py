"""Datasets: the bundled DLPFC slide and Space Ranger folder, a seeded toy generator, downloads of larger data."""

from ._datasets import dlpfc, toy, visium_toy
from ._her2st import her2st, her2st_registry

__all__ = ["dlpfc", "her2st", "her2st_registry", "toy", "visium_toy"]
