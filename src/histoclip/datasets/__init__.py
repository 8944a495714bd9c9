"""Datasets: the bundled DLPFC slide, a seeded toy generator, and downloads of larger public data."""

from ._datasets import dlpfc, toy

__all__ = ["dlpfc", "toy"]
