from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from ..io._slide import SpotData


class PatchReader:
    """Reads the patch of each spot from its slide's image and resizes it to ``patch_px`` x ``patch_px``.

    Parameters
    ----------
    spots
        Resolved slides (:func:`histoclip.io.resolve`).
    boxes
        ``(n_obs, 4)`` integer boxes ``[x0, y0, x1, y1)`` in each slide's image pixels
        (``obsm["histoclip_patch_box"]`` from :func:`histoclip.pp.extract_patches`).
    patch_px
        Side of the patches handed to the network.
    cache
        Keep each resized patch in memory after its first read, so later epochs skip the crop and the resize.
        Default (``None``): only when all resized patches together fit in ``CACHE_BYTES`` (512 MiB, e.g. 170k
        spots at 32 px). The cache holds ``patch_px``-sized patches only; the slide image itself is never loaded
        whole (:class:`~histoclip.io.ImageSource` reads just the boxes asked for). Its pages are allocated lazily
        as patches are read, and it is not copied into pickles (DataLoader workers, spawned processes): each
        process fills its own.

    """

    CACHE_BYTES = 512 * 2**20

    def __init__(self, spots: SpotData, boxes: np.ndarray, patch_px: int, *, cache: bool | None = None) -> None:
        boxes = np.asarray(boxes)
        if boxes.shape != (spots.n_obs, 4):
            raise ValueError(f"Patch boxes must have shape ({spots.n_obs}, 4), got {boxes.shape}.")
        if patch_px < 1:
            raise ValueError(f"patch_px must be positive, got {patch_px}.")
        self.boxes = boxes.astype(np.int64)
        self.patch_px = int(patch_px)
        self.images = []
        self.slide_of = np.full(spots.n_obs, -1, dtype=np.int64)
        for j, s in enumerate(spots.slides):
            if s.image is None:
                raise ValueError(f"Library {s.library_id!r} has no image to read patches from.")
            self.images.append(s.image)
            self.slide_of[s.index] = j
        nbytes = self.boxes.shape[0] * self.patch_px**2 * 3
        self.cache = nbytes <= self.CACHE_BYTES if cache is None else bool(cache)
        self._reset_cache()

    def _reset_cache(self) -> None:
        n, p = self.boxes.shape[0], self.patch_px
        self._store = np.zeros((n, p, p, 3), dtype=np.uint8) if self.cache else None  # zero pages: lazy RSS
        self._filled = np.zeros(n, dtype=bool) if self.cache else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = state["_filled"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_cache()

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __call__(self, i: int) -> np.ndarray:
        """RGB uint8 patch ``(patch_px, patch_px, 3)`` of spot ``i``."""
        if self._filled is not None and self._filled[i]:
            return self._store[i].copy()
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        # resized (bilinear) to patch_px; a pyramid is read at the coarsest level that still holds patch_px pixels
        crop = self.images[self.slide_of[i]].read_patch(x0, y0, x1, y1, self.patch_px)
        if self._store is not None:
            self._store[i] = crop
            self._filled[i] = True
        return crop


class PatchDataset(Dataset):
    """(image, expression, index) triples for training and embedding.

    Parameters
    ----------
    reader
        A :class:`PatchReader` (patches are read lazily), or ``None`` when ``features`` is given or the model has no
        image branch (then each item's image is an empty tensor and ``expression`` is required).
    expression
        ``(n_obs, n_inputs)`` float32 inputs of the expression encoder, or ``None`` (image-only queries).
    features
        ``(n_obs, d)`` precomputed image features used instead of patches.
    context
        Optional ``(n_obs, n_obs)`` sparse, row-normalised neighbour graph. Each item's expression is then
        ``[expression[i], context[i] @ expression]`` (``2 * n_inputs`` values), computed when the item is read, so
        the neighbourhood means are never stored as a second dense matrix.
    positives
        With ``context``: also return a random neighbour ``j`` of each spot (drawn with the graph's weights) as
        ``[expression[j], context[j] @ expression]`` (``4 * n_inputs`` values in all): the positive of the model's
        neighbour contrast. Draws come from ``seed``, the item and how often it was read, so they are the same in
        every run with that seed.
    seed
        Seed of the neighbour draws.

    """

    def __init__(
        self,
        reader: PatchReader | None,
        expression: np.ndarray | None = None,
        features: np.ndarray | None = None,
        *,
        context: sp.spmatrix | None = None,
        positives: bool = False,
        seed: int = 0,
    ) -> None:
        if reader is None and features is None and expression is None:
            raise ValueError("PatchDataset needs patches (a PatchReader), precomputed image features or expression.")
        n = len(reader) if reader is not None else (features.shape[0] if features is not None else expression.shape[0])
        if expression is not None and expression.shape[0] != n:
            raise ValueError(f"expression has {expression.shape[0]} rows, expected {n}.")
        self.reader = reader
        self.expression = None if expression is None else np.ascontiguousarray(expression, dtype=np.float32)
        self.features = None if features is None else np.ascontiguousarray(features, dtype=np.float32)
        self.context = None
        if context is not None:
            if self.expression is None:
                raise ValueError("PatchDataset: context needs expression inputs to average.")
            if context.shape != (n, n):
                raise ValueError(f"context must be an ({n}, {n}) graph, got shape {context.shape}.")
            self.context = sp.csr_matrix(context, dtype=np.float32)
        if positives and self.context is None:
            raise ValueError("PatchDataset: positives need a context graph to draw neighbours from.")
        self.positives = bool(positives)
        self.seed = int(seed)
        self._draws = np.zeros(n, dtype=np.int64) if positives else None
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.features is not None:
            img = torch.from_numpy(self.features[i])
        elif self.reader is None:  # an expression-only model: no image input
            img = torch.zeros(0)
        else:
            img = torch.from_numpy(self.reader(i)).permute(2, 0, 1).contiguous()  # uint8 (3, p, p)
        if self.expression is None:
            expr = torch.zeros(0)
        elif self.context is None:
            expr = torch.from_numpy(self.expression[i])
        else:
            parts = [self.expression[i], self._neighbourhood(i)]
            if self.positives:
                j = self._draw_neighbour(i)
                parts += [self.expression[j], self._neighbourhood(j)]
            expr = torch.from_numpy(np.concatenate(parts))
        return img, expr, i

    def _neighbourhood(self, i: int) -> np.ndarray:
        g = self.context
        lo, hi = g.indptr[i], g.indptr[i + 1]
        if hi == lo:
            return np.zeros_like(self.expression[i])
        return (g.data[lo:hi] @ self.expression[g.indices[lo:hi]]).astype(np.float32, copy=False)

    def _draw_neighbour(self, i: int) -> int:
        g = self.context
        lo, hi = g.indptr[i], g.indptr[i + 1]
        idx, w = g.indices[lo:hi], g.data[lo:hi].astype(np.float64)
        others = idx != i
        idx, w = idx[others], w[others]
        if idx.size == 0:
            return i
        u = _uniform(self.seed, int(i), int(self._draws[i]))
        self._draws[i] += 1
        c = np.cumsum(w)
        return int(idx[min(int(np.searchsorted(c, u * c[-1], side="right")), idx.size - 1)])


_MASK = (1 << 64) - 1


def _uniform(seed: int, i: int, k: int) -> float:
    """A uniform number in [0, 1) from (seed, item, draw): a splitmix64 hash, far cheaper than a Generator per item."""
    x = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9 + (k + 1) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return x / 2.0**64
