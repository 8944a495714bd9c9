"""Torch datasets over precomputed patch boxes: ``__getitem__`` is a cheap slice and a resize."""

from ._dataset import PatchDataset, PatchReader

__all__ = ["PatchDataset", "PatchReader"]
