from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch.utils.data import ConcatDataset, DataLoader, Subset

from .._constants import Key
from .._settings import logger, settings
from .._utils import RNGLike, resolve_seed
from ..data import PatchDataset, PatchReader
from ..io._slide import SpotData, check_counts_table, resolve
from ..module import HistoclipModule
from ..pp._genes import FIT_SAMPLE, LogExpression, fit_rows, select_genes
from ..pp._graph import (
    gaussian_graph,
    knn_graph,
    physical_hops,
    radius_graph,
    row_normalize,
    smooth_features,
    spot_coords_um,
)
from ..train import pick_device
from ..train._distributed import fit_with_strategy
from . import _save
from ._save import FILE_NAME, OPTIMIZER_FILE  # noqa: F401 (re-exported: where checkpoints are written)

if TYPE_CHECKING:
    from spatialdata import SpatialData

Modality = Literal["joint", "image", "expression"]

#: the expression skip is smoothed like the model-free representation of tl.domains: 2 hops within 150 um
SKIP_RADIUS_UM = 150.0
SKIP_HOPS = 2


@dataclass
class _Section:
    spots: SpotData
    reader: PatchReader | None
    features: np.ndarray | None
    graph: Any  # row-normalised sparse neighbour averaging (with self loops)


class _EpochEnd:
    """The per-epoch callback of :meth:`HistoCLIP.train`; inert once pickled into a spawned worker process."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args) -> None:
        if self.fn is not None:
            self.fn(*args)

    def __getstate__(self) -> dict:
        return {"fn": None}  # a closure over the model cannot (and need not) travel to another process


def _has_image(data, library_id: str | None = None) -> bool:
    """Whether every section of ``data`` has an image to cut patches from (or patch boxes already cut)."""
    from .._utils import is_spatialdata
    from ..io._slide import library_has_image

    for d in _as_list(data):
        if is_spatialdata(d):
            if not len(d.images):
                return False
            continue
        if Key.obsm.patch_box in d.obsm:
            continue
        spatial = d.uns.get(Key.uns.spatial)
        if not isinstance(spatial, dict) or not spatial:
            return False
        libs = [library_id] if library_id is not None and library_id in spatial else list(spatial)
        if not all(library_has_image(spatial[lib]) for lib in libs):
            return False
    return True


# Finer than this (microns per pixel) an H&E image resolves nuclei: a 20x scan is ~0.5, a 10x ~1, Visium's hires
# image ~3.5 (HER2ST: 0.69 full resolution, 3.4 in the 2000 px image)
CELL_RESOLVING_UM_PER_PX = 2.0


def _as_list(data) -> list:
    if isinstance(data, list | tuple):
        if not data:
            raise ValueError("An empty list of sections was given.")
        return list(data)
    return [data]


def _box_sides(boxes: np.ndarray) -> np.ndarray:
    """Side in image pixels of each ``[x0, y0, x1, y1)`` patch box (the shorter one, should a box not be square)."""
    return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def _auto_patch_px(sections: list) -> int:
    """Median patch side in image pixels, rounded up to a multiple of 8, clipped to [16, 32]."""
    sides = np.concatenate([_box_sides(s.reader.boxes) for s in sections])
    side = float(np.median(sides)) if sides.size else 32.0
    return int(np.clip(8 * np.ceil(side / 8), 16, 32))


def _log_patch_resolution(sections: list, patch_px: int) -> None:
    """Log at which resolution the image branch sees the tissue.

    The patch in microns, its side in the image's own pixels, and what ``patch_px`` pixels make of it; where the image
    resolves cells and the patches do not, how to use it at full resolution.
    """
    seen: set[tuple] = set()
    for sec in sections:
        sides = _box_sides(sec.reader.boxes)
        for sl in sec.spots.slides:
            side = float(np.median(sides[sl.index])) if len(sl.index) else 0.0
            key = (sl.img_key, round(sl.um_per_px, 3), round(side))
            if side <= 0 or key in seen:
                continue
            seen.add(key)
            size_um, fed = side * sl.um_per_px, side * sl.um_per_px / patch_px
            logger.info("HistoCLIP: the image branch sees %.0f um patches from image %r of library %r (%.3g um/px, "
                        "%d px) at %d px: %.3g um/px.", size_um, sl.img_key, sl.library_id, sl.um_per_px, side,
                        patch_px, fed)
            if sl.um_per_px <= CELL_RESOLVING_UM_PER_PX < fed:
                logger.info("HistoCLIP: the image resolves cells (%.3g um/px) and the small CNN sees tissue texture "
                            "(%.3g um/px); frozen features of the full-resolution patch are one call away "
                            "(histoclip.tl.image_features, then image_features_key=; see the image encoders page).",
                            sl.um_per_px, fed)


def _input_covariance(logs: list[LogExpression], mean: np.ndarray, std: np.ndarray, *, block: int = 8192,
                      max_rows: int = 20_000) -> np.ndarray:
    """Gene-gene covariance ``(n_genes, n_genes)`` float64 of the standardised inputs of the training spots.

    On an even subsample of at most ``max_rows`` spots (every ``step``-th spot of each section), densified
    ``block`` rows at a time: memory ``n_genes ** 2`` plus one block, not another copy of the data; the axes of 1M
    spots cost 20k's.
    """
    g = mean.size
    cov = np.zeros((g, g), dtype=np.float64)
    n = 0
    step = max(1, sum(lg.n_obs for lg in logs) // max_rows)
    m, sd = mean.astype(np.float64), std.astype(np.float64)
    for lg in logs:
        for start, chunk in lg.chunks():
            rows = np.flatnonzero(np.arange(start, start + chunk.shape[0]) % step == 0)
            for i in range(0, rows.size, block):
                z = (chunk[rows[i : i + block]].toarray().astype(np.float64) - m) / sd
                cov += z.T @ z
                n += z.shape[0]
    return cov / max(n - 1, 1)


def _principal_axes(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` eigenvectors of ``cov`` (signed so that each one's largest entry is positive) and eigenvalues."""
    k = int(min(k, cov.shape[0]))
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    vecs = vecs[:, order]
    vecs *= np.where(vecs[np.abs(vecs).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)
    return vecs, vals[order]


def _expression_basis(cov: np.ndarray, n_components: int) -> np.ndarray:
    """The top principal axes of the standardised expression, ``(n_genes, k)`` float32.

    Axes are signed deterministically and scaled by ``1 / sd`` of the first component, so the projections the model
    sees are of order one.
    """
    vecs, vals = _principal_axes(cov, n_components)
    scale = 1.0 / np.sqrt(max(vals[0], 1e-12))
    return (vecs * scale).astype(np.float32)


def _skip_basis(cov: np.ndarray, gene_std: np.ndarray, k: int) -> np.ndarray:
    """Axes that project *standardised* inputs on the principal components of the log expression itself.

    The log expression (centred, not scaled per gene) is ``u * std`` for standardised inputs ``u``; its covariance is
    ``S C S`` (``S = diag(std)``) and its principal components are ``(u * std) @ V = u @ (S V)``: the representation
    :func:`histoclip.tl.domains` clusters without a model, computed from the model's own inputs.
    """
    if k <= 0:
        return np.zeros((cov.shape[0], 0), dtype=np.float32)
    std = gene_std.astype(np.float64)
    vecs, _ = _principal_axes(cov * std[:, None] * std[None, :], k)
    return (vecs * std[:, None]).astype(np.float32)


def default_max_epochs(n_obs: int) -> int:
    """Epochs for ``n_obs`` training spots: ``round(120_000 / n_obs)`` clipped to [1, 30].

    30 epochs up to 4,000 spots (one Visium slide: ~470 steps at batch 256), 12 at 10,000, 1 from about 80,000 on:
    the number of optimisation steps stays roughly constant, so training time grows linearly with the data
    instead of with data x epochs.
    """
    return int(min(30, max(1, round(120_000 / max(int(n_obs), 1)))))


def _log_moments(logs: list[LogExpression]) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (floored at 1e-3) of the log expression over all training spots.

    Sums and sums of squares in float64, streamed over sparse row blocks: memory stays at one block.
    """
    n = sum(lg.n_obs for lg in logs)
    if n == 0:
        raise ValueError("No training spots.")
    total = np.zeros(logs[0].columns.size, dtype=np.float64)
    sq = np.zeros_like(total)
    for lg in logs:
        for _, chunk in lg.chunks():
            total += np.asarray(chunk.sum(axis=0, dtype=np.float64)).ravel()
            sq += np.asarray(chunk.multiply(chunk).sum(axis=0, dtype=np.float64)).ravel()
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(sq / n - mean**2, 0.0)), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def _projections(log: LogExpression, mean: np.ndarray, std: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``((x - mean) / std) @ axes`` for every spot of ``log``, ``(n_obs, k)`` float32, from sparse row blocks.

    Computed as ``x @ (axes / std) - (mean / std) @ axes`` so the standardised (dense) expression is never formed:
    what the model holds of a slide is ``n_obs x k`` (k = the expression and skip components), not spots x genes.
    """
    w = axes.astype(np.float64) / std.astype(np.float64)[:, None]
    offset = mean.astype(np.float64) @ w
    out = np.empty((log.n_obs, axes.shape[1]), dtype=np.float32)
    for start, chunk in log.chunks():
        out[start : start + chunk.shape[0]] = chunk @ w - offset
    return out


@dataclass
class _Inputs:
    """What the model holds of a section's expression: projections on its principal axes, not spots x genes."""

    expression: np.ndarray  # (n_obs, n_components): the standardised inputs on the expression basis
    skip: np.ndarray  # (n_obs, skip_components): the same on the skip's axes

    @property
    def n_obs(self) -> int:
        return self.expression.shape[0]


class HistoCLIP:
    """A contrastive image-expression model of spatial transcriptomics slides.

    An expression encoder (the spot's log-normalised, standardised counts of the selected genes projected on the
    training data's principal components, joined with its spatial neighbourhood's mean: a one-hop graph layer) and an
    image encoder (a small CNN, a ResNet, or precomputed features) each give a latent; an attention layer weighs the
    two per spot (SpatialGlue's fusion) into the joint embedding. Training asks the joint embedding to reconstruct
    both modalities (so it keeps what each knows on its own), aligns the two latents by symmetric InfoNCE (BLEEP,
    MicNet: the shared part, also the retrieval space of :func:`histoclip.tl.predict_expression`), and pulls a spot's
    expression latent towards a random spatial neighbour's (see :class:`histoclip.module.HistoclipModule`).

    Parameters
    ----------
    data
        The training data: an AnnData (scanpy/squidpy layout), a SpatialData object, or a list of AnnData
        (several sections, each with its own image and scale). Patches must have been computed with
        :func:`histoclip.pp.extract_patches` unless ``image_features_key`` is given.
    genes
        Genes the model uses; default: the ``n_genes`` genes with the highest spatial autocorrelation (Moran's I)
        in the training data (:func:`histoclip.pp.select_genes`).
    n_genes
        Number of genes when ``genes`` is not given.
    layer
        Layer holding raw counts (default: ``X``).
    spatial_context
        Give the expression encoder each spot's neighbourhood (the mean of its neighbours' expression) and contrast
        its latent with a random neighbour's, so the embeddings are spatially coherent.
    context_um
        Scale of the neighbourhood in microns: neighbours within ``3 * context_um`` weighted
        ``exp(-d^2 / (2 context_um^2))`` (a Gaussian graph within each section; microns from the scale factors, so
        Visium, legacy ST and Visium HD get the same physical neighbourhood).
    n_neighbors
        Use the ``n_neighbors`` nearest spots (unweighted) instead of ``context_um`` (the setting of earlier versions).
    image_backbone
        ``"cnn"`` (trained from scratch), ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (torchvision-compatible;
        pass ``weights=`` for pretrained weights), or ``"features"`` (set by ``image_features_key``).
    weights
        Path to torchvision ResNet weights (``.pth``/``.safetensors``), loaded without unpickling.
    freeze_backbone
        Keep the image backbone fixed and train only the heads.
    image_features_key
        Key in ``obsm`` of precomputed image features (e.g. from a pathology foundation model) used instead of
        patches.
    patch_px
        Side in pixels of the patches given to the image tower. Default (``None``): the median side of the
        training patches in the image's own pixels, rounded up to a multiple of 8 and clipped to [16, 32], so
        patches are never upsampled beyond what the image holds (DLPFC's lowres image gives ~9 px patches: 16;
        a full-resolution image: 32). The chosen value is kept in ``init_params`` and in saved models.
    hidden_dim, latent_dim, embedding_dim, n_components, dropout, temperature, loss, spatial_weight, spatial_temperature
        Network and loss settings (see :class:`histoclip.module.HistoclipModule`).
    reconstruction_weight, image_reconstruction_weight, cross_modal_weight, mask_rate, fusion
        Loss terms and fusion (see :class:`histoclip.module.HistoclipModule`); the zero weights are the ablations of
        ``benchmarks/domains.py``.
    use_image
        Train the image branch. Default (``None``): when the data has an image (or ``image_features_key``); a slide
        without one gets an expression-only model (logged as a warning), whose joint embedding holds no image part and
        which writes no image weight.
    skip_components
        Principal components of the log expression kept beside the learned embedding in the joint embedding
        ``X_histoclip`` (an expression skip path, 0 turns it off): each spot's components averaged twice over its
        neighbours within 150 um, exactly the representation :func:`histoclip.tl.domains` clusters without a model.
        Training only adds to it, so the joint embedding keeps its own expression input whatever the seed or the size
        of the slide. Both blocks are scaled to unit mean squared norm over the training spots.
    init_expression
        ``"pca"``: the expression latent starts as the spot's smoothed principal components (``0.5 * (own +
        neighbourhood)`` of the first ``embedding_dim``), so an untrained model is already the expression PCA and
        training depends less on the seed; ``"random"``: torch's default initialisation.
    init_seed
        Seed of the initial weights of every other layer (torch's default initialisation), independent of the ``rng``
        of :meth:`train`, which seeds only the order of the spots, augmentation, dropout and the neighbour draws: the
        model then starts from the same weights whatever the seed, and its domains hardly depend on the seed (on
        small slides the starting weights, not the training noise, were what moved them; see the docs' benchmarks
        page). ``None``: the weights are drawn from :meth:`train`'s ``rng``, as the seed-spread benchmark does.
    library_key, library_id, table_key, image_key, shapes_key, coordinate_system
        How to find the spots and images (see :func:`histoclip.pp.extract_patches`).

    """

    def __init__(
        self,
        data: AnnData | SpatialData | Sequence[AnnData],
        *,
        genes: Sequence[str] | None = None,
        n_genes: int = 2000,
        layer: str | None = None,
        spatial_context: bool = True,
        context_um: float = 100.0,
        n_neighbors: int | None = None,
        image_backbone: str = "cnn",
        weights: str | os.PathLike | None = None,
        freeze_backbone: bool = False,
        image_features_key: str | None = None,
        patch_px: int | None = None,
        hidden_dim: int = 256,
        latent_dim: int = 64,
        embedding_dim: int = 32,
        n_components: int = 50,
        dropout: float = 0.1,
        temperature: float = 0.1,
        loss: Literal["clip", "pml"] = "clip",
        spatial_weight: float = 1.0,
        spatial_temperature: float = 0.5,
        reconstruction_weight: float = 1.0,
        image_reconstruction_weight: float = 1.0,
        cross_modal_weight: float = 1.0,
        mask_rate: float = 0.2,
        fusion: Literal["attention", "mean"] = "attention",
        use_image: bool | None = None,
        skip_components: int = 10,
        init_expression: Literal["pca", "random"] = "pca",
        init_seed: int | None = 0,
        library_key: str | None = None,
        library_id: str | None = None,
        table_key: str = "table",
        image_key: str | None = None,
        shapes_key: str | None = None,
        coordinate_system: str | None = None,
    ) -> None:
        if n_genes < 1:
            raise ValueError(f"n_genes must be positive, got {n_genes}.")
        if not (isinstance(context_um, int | float) and np.isfinite(context_um) and context_um > 0):
            raise ValueError(f"context_um must be a positive number of microns, got {context_um!r}.")
        if n_neighbors is not None and n_neighbors < 1:
            raise ValueError(f"n_neighbors must be at least 1 (or None for context_um), got {n_neighbors}.")
        if patch_px is not None and patch_px < 8:
            raise ValueError(f"patch_px must be at least 8, got {patch_px}.")
        if (isinstance(skip_components, bool) or not isinstance(skip_components, int | np.integer)
                or skip_components < 0):
            raise ValueError(f"skip_components must be a non-negative integer (0: no skip), got {skip_components!r}.")
        if init_expression not in ("pca", "random"):
            raise ValueError(f"init_expression must be 'pca' or 'random', got {init_expression!r}.")
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int | np.integer)
                                      or not 0 <= init_seed < 2**63):
            raise ValueError(f"init_seed must be a non-negative integer or None (from train's rng), got {init_seed!r}.")
        if use_image is None:  # an image (or image features) when the data has one, else an expression-only model
            use_image = image_features_key is not None or _has_image(data, library_id)
            if not use_image:
                logger.warning("HistoCLIP: the data has no image; training an expression-only model (use_image=False).")
        if image_features_key is not None:
            image_backbone = "features"
        self.init_params: dict[str, Any] = {
            "n_genes": n_genes,
            "layer": layer,
            "spatial_context": spatial_context,
            "context_um": float(context_um),
            "n_neighbors": n_neighbors,
            "image_backbone": image_backbone,
            "weights": str(weights) if weights is not None else None,
            "freeze_backbone": freeze_backbone,
            "image_features_key": image_features_key,
            "patch_px": patch_px,
            "hidden_dim": hidden_dim,
            "latent_dim": latent_dim,
            "embedding_dim": embedding_dim,
            "n_components": n_components,
            "dropout": dropout,
            "temperature": temperature,
            "loss": loss,
            "spatial_weight": spatial_weight,
            "spatial_temperature": spatial_temperature,
            "reconstruction_weight": reconstruction_weight,
            "image_reconstruction_weight": image_reconstruction_weight,
            "cross_modal_weight": cross_modal_weight,
            "mask_rate": mask_rate,
            "fusion": fusion,
            "use_image": bool(use_image),
            "skip_components": int(skip_components),
            "init_expression": init_expression,
            "init_seed": None if init_seed is None else int(init_seed),
        }
        self.setup_params: dict[str, Any] = {
            "library_key": library_key,
            "library_id": library_id,
            "table_key": table_key,
            "image_key": image_key,
            "shapes_key": shapes_key,
            "coordinate_system": coordinate_system,
        }
        self._data = _as_list(data)
        if patch_px is None:
            self.init_params["patch_px"] = 32 if image_features_key is not None or not use_image else None
        sections = [self._section(d, need_counts=True) for d in self._data]  # validates everything first
        for sec in sections:
            check_counts_table(sec.spots.adata, layer)
        if self.init_params["patch_px"] is None:
            px = self.init_params["patch_px"] = _auto_patch_px(sections)
            sections = [replace(s, reader=PatchReader(s.spots, s.reader.boxes, px)) for s in sections]
        if image_features_key is None and use_image:
            _log_patch_resolution(sections, int(self.init_params["patch_px"]))
        tables = [s.spots.adata for s in sections]
        if genes is None:
            genes = self._pick_genes(sections, n_genes, layer)
        self.genes = [str(g) for g in genes]
        if not self.genes:
            raise ValueError("No genes to train on.")
        # the expression is streamed in sparse row blocks three times (moments, axes, projections): the model then
        # holds each spot's projections on its principal axes, never a dense spots x genes array
        logs = [LogExpression(t, self.genes, layer=layer) for t in tables]
        self.gene_mean, self.gene_std = _log_moments(logs)
        cov = _input_covariance(logs, self.gene_mean, self.gene_std)
        self._basis = _expression_basis(cov, int(n_components))
        self._skip = _skip_basis(cov, self.gene_std, int(skip_components))
        del cov
        self._sections = sections
        feat_dim = sections[0].features.shape[1] if image_features_key is not None else None
        self.init_params["image_in_features"] = feat_dim
        self.patch_settings = self._patch_settings(tables[0])
        self.module = self._build_module(seed=0)
        self._train_inputs = [self._inputs(lg) for lg in logs]
        del logs
        self.history = pd.DataFrame(columns=["epoch", "loss", "image_to_expression", "expression_to_image"])
        self.is_trained = False
        self.train_params: dict[str, Any] = {}
        self._optimizer_state: dict | None = None  # set by load() from a checkpoint, used by the next train()
        # what predict_expression builds from the training spots (reference bank, regression head); saved with the
        # model, cleared whenever the weights or the training data change
        self.predictor_state: dict[str, dict[str, np.ndarray]] = {}
        self.device = torch.device("cpu")
        logger.info("HistoCLIP: %d sections, %d spots, %d genes, image backbone %r", len(sections),
                    sum(s.spots.n_obs for s in sections), len(self.genes), image_backbone)

    # ---------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _pick_genes(sections: list[_Section], n_genes: int, layer: str | None) -> list[str]:
        """Moran's I genes over all training sections (coordinates from each section's own image frame)."""
        import anndata as ad

        tables = [s.spots.adata for s in sections]
        common = tables[0].var_names
        for t in tables[1:]:
            common = common.intersection(t.var_names, sort=False)
        if len(common) == 0:
            raise ValueError("The training sections share no gene names.")
        parts = []
        for i, s in enumerate(sections):
            # the table itself when it holds just the common genes (one section): a view would copy the counts
            t = s.spots.adata if s.spots.adata.var_names.equals(common) else s.spots.adata[:, common]
            part = AnnData(X=t.layers[layer] if layer else t.X)
            part.obsm["spatial"] = s.spots.coords()
            part.obs["library"] = [f"{i}/{lib}" for lib in s.spots.library_labels()]
            parts.append(part)
        merged = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
        merged.var_names = common
        return select_genes(merged, n_genes, library_key="library")

    def _patch_settings(self, adata: AnnData) -> dict[str, Any]:
        params = adata.uns.get(Key.uns.histoclip, {}).get("params", {})
        rec = params.get("patches", {})
        out: dict[str, Any] = {"size_um": float(rec["size_um"])} if "size_um" in rec else {}
        feats = params.get("image_features", {})
        if feats and feats.get("key_added") == self.init_params.get("image_features_key"):
            out["image_features"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in feats.items()}
        return out

    def _section(self, data, *, need_counts: bool) -> _Section:
        sp = self.setup_params
        uses_features = self.init_params["image_features_key"] is not None
        use_image = bool(self.init_params.get("use_image", True))
        from ..pp._patches import patch_image_key  # issue 13: reuse the image the patch boxes were cut from

        spots = resolve(
            data,
            library_id=sp["library_id"],
            library_key=sp["library_key"],
            table_key=sp["table_key"],
            image_key=patch_image_key(data, sp["table_key"], sp["image_key"], strict=False),  # the boxes' image
            shapes_key=sp["shapes_key"],
            coordinate_system=sp["coordinate_system"],
            img_key=self._img_key_of(data),
            need_image=use_image and not uses_features,
        )
        adata = spots.adata
        reader, feats = None, None
        if not use_image:
            pass  # an expression-only model reads no patches and no image features
        elif uses_features:
            key = self.init_params["image_features_key"]
            if key not in adata.obsm:
                raise KeyError(f"Image features adata.obsm[{key!r}] not found; obsm has {list(adata.obsm.keys())}.")
            feats = np.asarray(adata.obsm[key], dtype=np.float32)
            if not np.isfinite(feats).all():
                raise ValueError(f"adata.obsm[{key!r}] has NaN or inf values.")
        else:
            if Key.obsm.patch_box not in adata.obsm:
                raise KeyError(
                    f"No patch boxes in adata.obsm[{Key.obsm.patch_box!r}]; run histoclip.pp.extract_patches(data, "
                    "size_um=...) first (or pass image_features_key=... to use precomputed image features)."
                )
            px = self.init_params["patch_px"] or 32  # None only while __init__ picks it from these boxes
            reader = PatchReader(spots, np.asarray(adata.obsm[Key.obsm.patch_box]), px)
        if need_counts and adata.n_vars == 0:
            raise ValueError("The AnnData has no genes.")
        return _Section(spots, reader, feats, self._context_graph(spots))

    @staticmethod
    def _img_key_of(data) -> str | None:
        if not isinstance(data, AnnData):
            return None
        rec = data.uns.get(Key.uns.histoclip, {}).get("params", {}).get("patches", {})
        keys = rec.get("img_key")
        if isinstance(keys, dict) and keys:
            vals = set(keys.values())
            return vals.pop() if len(vals) == 1 else None
        return None

    def _inputs(self, log: LogExpression) -> _Inputs:
        """A section's expression as the model sees it: projections on the module's expression and skip axes."""
        m = self.module
        k = m.expression_basis.shape[1]
        axes = torch.cat([m.expression_basis, m.skip_basis], dim=1).detach().cpu().numpy()
        proj = _projections(log, self.gene_mean, self.gene_std, axes)
        return _Inputs(np.ascontiguousarray(proj[:, :k]), np.ascontiguousarray(proj[:, k:]))

    def _n_inputs(self) -> int:
        return len(self.genes)

    def _build_module(self, seed: int) -> HistoclipModule:
        p = self.init_params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = HistoclipModule(
                self._n_inputs(),
                image_backbone=p["image_backbone"],
                weights=p["weights"],
                freeze_backbone=p["freeze_backbone"],
                image_in_features=p["image_in_features"],
                hidden_dim=p["hidden_dim"],
                latent_dim=p["latent_dim"],
                embedding_dim=p["embedding_dim"],
                n_components=p["n_components"],
                dropout=p["dropout"],
                temperature=p["temperature"],
                loss=p["loss"],
                spatial_weight=p["spatial_weight"],
                spatial_temperature=p["spatial_temperature"],
                reconstruction_weight=p["reconstruction_weight"],
                image_reconstruction_weight=p["image_reconstruction_weight"],
                cross_modal_weight=p["cross_modal_weight"],
                mask_rate=p["mask_rate"],
                fusion=p["fusion"],
                use_image=p["use_image"],
                spatial_context=p["spatial_context"],
                skip_components=p.get("skip_components", 0),
            )
        # the expression basis comes from the training data (a new model) or from the weights already held (a loaded
        # model: its file carries the basis), never from a fresh zero buffer
        basis, skip = getattr(self, "_basis", None), getattr(self, "_skip", None)
        if basis is not None:
            module.expression_basis.copy_(torch.from_numpy(basis))
        elif getattr(self, "module", None) is not None:
            module.expression_basis.copy_(self.module.expression_basis.detach().cpu())
        if skip is not None and skip.shape == tuple(module.skip_basis.shape):
            module.skip_basis.copy_(torch.from_numpy(skip))
        elif getattr(self, "module", None) is not None:
            module.skip_basis.copy_(self.module.skip_basis.detach().cpu())
        if p.get("init_expression", "random") == "pca" and module.expression_basis.device.type != "meta":
            module.init_expression_latent_from_pca()
        return module

    # ---------------------------------------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        accelerator: str = "auto",
        augment: bool = True,
        precision: Literal["auto", "32", "bf16", "16"] = "auto",
        num_workers: int | None = None,
        devices: int | Literal["auto"] = 1,
        strategy: Literal["auto", "ddp"] = "auto",
        rng: RNGLike = 0,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> HistoCLIP:
        """Train the model.

        Parameters
        ----------
        max_epochs
            Passes over the training spots. Default (``None``): :func:`~histoclip.model.default_max_epochs` of the
            number of training spots, 30 for a Visium slide (up to 4,000 spots) and fewer for larger data, so that every
            slide gets about the same number of optimisation steps (the heuristic of scvi-tools' models).
        batch_size
            Spots per batch; every other spot of the batch is a negative for the contrastive loss.
        lr, weight_decay
            AdamW settings (cosine learning-rate decay over the epochs).
        accelerator
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``/``"gpu"``, ``"mps"``, or a device string.
        augment
            Random flips, 90-degree rotations and mild colour jitter of the patches.
        precision
            ``"auto"``: bf16 (or fp16 with loss scaling) autocast on CUDA, fp32 elsewhere; ``"32"`` forces fp32.
        num_workers
            DataLoader workers (default ``histoclip.settings.num_workers``).
        devices
            Data-parallel processes: ``n`` starts ``n`` worker processes on this machine (one per GPU on CUDA, the
            cores shared on CPU); ``"auto"``: every visible GPU, else 1. Under ``torchrun`` the launcher decides
            and this is ignored.
        strategy
            ``"auto"``: one process unless ``devices > 1`` or running under ``torchrun``; ``"ddp"``: distributed
            data parallel (NCCL on CUDA, gloo on CPU), with every process's embeddings as negatives in the loss.
        rng
            Seed (or Generator) for shuffling, augmentation, dropout, masking and the neighbour draws (and for the
            weight initialisation when the model's ``init_seed`` is ``None``). The first call initialises the weights;
            later calls continue from the current weights.
        checkpoint_dir
            Folder to write a checkpoint to at the end of every epoch: ``model.safetensors`` (what :meth:`save`
            writes) and ``optimizer.safetensors`` (Adam's state), both replaced atomically. Resume an interrupted
            run with ``HistoCLIP.load(checkpoint_dir, data).train(remaining_epochs, ...)`` and the same settings:
            the epoch count, the learning-rate schedule and the optimizer state continue where they stopped.

        Returns
        -------
        The model itself; ``model.history`` gains one row per epoch.

        """
        if max_epochs is None:
            max_epochs = default_max_epochs(sum(s.spots.n_obs for s in self._sections))
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int | np.integer) or max_epochs < 1:
            raise ValueError(
                f"max_epochs must be a positive integer, got {max_epochs!r}: with no epoch, train() would return the "
                f"model {'unchanged' if self.is_trained else 'untrained'}. Pass max_epochs=None for the default."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 2:
            raise ValueError(
                f"batch_size must be an integer >= 2, got {batch_size!r}: the contrastive loss tells each spot apart "
                "from the other spots of its batch, so one spot per batch has nothing to contrast (the loss is 0 and "
                "nothing is learned). Use the default 256, or as many spots as memory allows."
            )
        seed = resolve_seed(rng)
        device = pick_device(accelerator)
        if not self._sections:
            raise RuntimeError("The model has no training data attached; load it with HistoCLIP.load(dir_path, data).")
        stored = self.init_params.get("weights")
        if not self.is_trained and stored is not None and hasattr(self, "_weights_named"):
            # an untrained model read from a file: its backbone is built again, but a path stored in a file is
            # never opened unless the caller names it
            if self._weights_named is None:
                raise ValueError(
                    f"This untrained model was loaded from a file that names backbone weights {stored!r}. Paths stored "
                    "in model files are never opened: name the file yourself, HistoCLIP.load(path, data, "
                    f"weights={stored!r}), to initialise the backbone from it."
                )
            self.init_params["weights"] = self._weights_named
        self.predictor_state = {}  # built from the weights about to change
        if not self.is_trained:
            init = self.init_params.get("init_seed")
            self.module = self._build_module(seed if init is None else int(init))
        context = bool(self.init_params["spatial_context"])
        dataset = ConcatDataset([
            # with spatial context each item is [own inputs, neighbourhood mean], built per item from the sparse
            # graph: the (n_obs, 2 * n_genes) matrix is never materialised
            PatchDataset(s.reader, x.expression, s.features, context=s.graph if context else None,
                         positives=context and self.init_params["spatial_weight"] > 0, seed=seed + 7 * i)
            for i, (s, x) in enumerate(zip(self._sections, self._train_inputs, strict=True))
        ])
        start = int(self.history["epoch"].max()) if len(self.history) else 0
        base_history, new_rows = self.history, []

        def record_epoch(epoch: int, optimizer: torch.optim.Optimizer, row: dict) -> None:
            # after each completed epoch: the model stays usable (and checkpointed) if a later epoch fails
            new_rows.append(row)
            done = pd.DataFrame(new_rows, columns=list(row))
            self.history = done if not len(base_history) else pd.concat([base_history, done], ignore_index=True)
            self.is_trained, self.device = True, device
            self.train_params = {
                "max_epochs": max_epochs, "epochs_completed": int(epoch), "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "augment": augment, "precision": precision, "seed": seed,
                "device": str(device), "interrupted": epoch < start + max_epochs,
            }
            self._scale_stale = True  # the fused block changed: rescale before the next embedding
            if checkpoint_dir is not None:
                self._set_block_scale()
                self.module.train()
                self._save_checkpoint(checkpoint_dir, optimizer.state_dict(), epoch)
        result = fit_with_strategy(
            self.module,
            dataset,
            devices=devices,
            strategy=strategy,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            augment=augment and self.init_params["image_backbone"] != "features" and self.init_params["use_image"],
            precision=precision,
            num_workers=settings.num_workers if num_workers is None else num_workers,
            start_epoch=start,
            optimizer_state=self._take_optimizer_state(),
            on_epoch_end=_EpochEnd(record_epoch),
        )
        self.device = device
        hist = result.history
        self.history = hist if not len(base_history) else pd.concat([base_history, hist], ignore_index=True)
        self.is_trained = self.is_trained or result.epochs_completed > 0
        if result.epochs_completed > 0 or getattr(self, "_scale_stale", False):
            self._set_block_scale()
        self.train_params = {
            "max_epochs": max_epochs, "epochs_completed": int(start + result.epochs_completed),
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "augment": augment,
            "precision": precision, "seed": seed, "device": str(device), "interrupted": result.interrupted,
            "devices": devices, "strategy": strategy,
        }
        if checkpoint_dir is not None and result.epochs_completed > 0 and not result.interrupted:
            # the final state once more, with the complete train_params (and for runs in spawned workers)
            self._save_checkpoint(checkpoint_dir, result.extras.get("optimizer_state"), start + result.epochs_completed)
        return self

    # ---------------------------------------------------------------------------------------------- inference
    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("The model is not trained yet; call model.train() (or histoclip.tl.train) first.")

    def _resolve_query(self, data, modality: str) -> tuple[_Section, np.ndarray | None]:
        if data is None:
            if len(self._data) != 1:
                raise ValueError("The model was trained on several sections; pass the section to embed as data=....")
            data = self._data[0]
        needs_expr = modality in ("joint", "expression")
        needs_image = modality in ("joint", "image")
        section = self._section(data, need_counts=needs_expr) if needs_image else self._expr_only_section(data)
        inputs = None
        if needs_expr:
            inputs = self._inputs(LogExpression(section.spots.adata, self.genes, layer=self.init_params["layer"]))
        return section, inputs

    def _expr_only_section(self, data) -> _Section:
        spots = resolve(data, library_key=self.setup_params["library_key"], library_id=self.setup_params["library_id"],
                        table_key=self.setup_params["table_key"], shapes_key=self.setup_params["shapes_key"],
                        need_image=False)
        return _Section(spots, None, None, self._context_graph(spots))

    def _context_graph(self, spots: SpotData):
        """Row-normalised neighbour averaging (no self loops; an isolated spot averages itself)."""
        k = self.init_params.get("n_neighbors")
        if k is not None:
            graph = knn_graph(spots.coords(), int(k), spots.library_labels())
        else:
            graph = gaussian_graph(spot_coords_um(spots), self.init_params.get("context_um", 100.0),
                                   spots.library_labels())
        return row_normalize(graph, self_loops=False, isolated_self=True)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        data: AnnData | SpatialData | None = None,
        *,
        modality: Modality = "joint",
        batch_size: int = 512,
    ) -> np.ndarray:
        """Embed spots.

        Parameters
        ----------
        data
            Data to embed (default: the training data, when it was one section).
        modality
            ``"image"`` (the image latent: needs patches, no counts), ``"expression"`` (the expression latent) or
            ``"joint"`` (the per-spot weighted fusion of both: what :func:`histoclip.tl.embed` writes to
            ``obsm["X_histoclip"]``).
        batch_size
            Spots per forward pass.

        Returns
        -------
        float32 array of shape ``(n_obs, embedding_dim)``.

        """
        if modality not in ("joint", "image", "expression"):
            raise ValueError(f"modality must be 'joint', 'image' or 'expression', got {modality!r}.")
        self._check_trained()
        if modality == "image" and not self.init_params.get("use_image", True):
            raise ValueError("This model was trained without its image branch (use_image=False); it has no image "
                             "embedding.")
        section, inputs = self._resolve_query(data, modality)
        return self._embeddings(section, inputs, batch_size, with_image=modality != "expression")[modality]

    @torch.inference_mode()
    def _embed(self, section: _Section, inputs: _Inputs | None, modality: str, batch_size: int) -> np.ndarray:
        """``"image"`` / ``"expression"``: the L2-normalised contrastive projections (the retrieval space)."""
        self.module.eval()
        dev = self.device
        out = []
        if modality == "image":
            ds = PatchDataset(section.reader, None, section.features)
            for img, _, _ in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
                out.append(self.module.encode_image(img.to(dev)).cpu().numpy())
        elif modality == "expression":
            for e in self._expression_batches(section, inputs, batch_size):
                out.append(self.module.encode_expression(e.to(dev)).cpu().numpy())
        else:
            raise ValueError(f"modality must be 'image' or 'expression', got {modality!r}.")
        return np.concatenate(out).astype(np.float32)

    def _expression_batches(self, section: _Section, inputs: _Inputs, batch_size: int, rows: np.ndarray | None = None):
        """``[own, neighbourhood mean]`` projected expression inputs in batches (own only without spatial context).

        ``rows``: only these spots (their neighbourhoods still come from every spot).
        """
        ctx = section.graph if self.init_params["spatial_context"] else None
        proj = inputs.expression
        n = proj.shape[0] if rows is None else len(rows)
        for i in range(0, n, batch_size):
            r = slice(i, i + batch_size) if rows is None else np.asarray(rows[i : i + batch_size])
            own = proj[r]
            parts = [own, np.asarray(ctx[r] @ proj, dtype=np.float32)] if ctx is not None else [own]
            yield torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=1)))

    @torch.inference_mode()
    def _embeddings(self, section: _Section, inputs: _Inputs | None, batch_size: int, *,
                    with_image: bool = True, scaled: bool = True,
                    rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The latents written by :func:`histoclip.tl.embed`.

        ``image``, and with ``inputs`` also ``expression``, ``joint`` and ``image_weight`` (the fusion's per-spot
        weight of the image; absent for a model without an image branch); ``with_image=False``: only ``expression``.
        With the expression skip (``skip_components > 0``) the joint embedding is ``[skip, fused]``: the spot's
        smoothed expression principal components (the model-free representation of :func:`histoclip.tl.domains`)
        beside the learned fusion, each block scaled to unit mean squared norm over the training spots
        (``scaled=False``: the two blocks unscaled, as ``skip`` and ``fused``). ``rows``: only these spots.
        """
        self.module.eval()
        dev = self.device
        out: dict[str, list] = {"image": [], "expression": [], "fused": [], "image_weight": []}
        use_image = bool(self.init_params.get("use_image", True)) and with_image
        if use_image:
            ds = PatchDataset(section.reader, None, section.features)
            if rows is not None:
                ds = Subset(ds, np.asarray(rows).tolist())
            for img, _, _ in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
                out["image"].append(self.module.image_embedding(img.to(dev)).float().cpu().numpy())
        if inputs is not None:
            z_img = np.concatenate(out["image"]) if use_image else None
            for j, e in enumerate(self._expression_batches(section, inputs, batch_size, rows)):
                z_e = self.module.expression_embedding(e.to(dev)).float()
                block = slice(j * batch_size, j * batch_size + len(e))
                zi = None if z_img is None else torch.from_numpy(z_img[block]).to(dev)
                joint, w = self.module.fuse(zi, z_e)
                out["expression"].append(z_e.cpu().numpy())
                out["fused"].append(joint.float().cpu().numpy())
                if use_image:
                    out["image_weight"].append(w.float().cpu().numpy())
        res = {k: np.concatenate(v).astype(np.float32) for k, v in out.items() if v}
        if inputs is None:
            return res
        fused = res.pop("fused")
        if self.module.skip_components == 0:
            res["joint"] = fused
            return res
        skip = self._skip_representation(section, inputs)
        if rows is not None:
            skip = skip[rows]
        if not scaled:
            return {**res, "skip": skip, "fused": fused}
        if getattr(self, "_scale_stale", False):
            self._set_block_scale()
        s_skip, s_fused = (float(v) for v in self.module.block_scale.detach().cpu())
        res["joint"] = np.concatenate([skip * s_skip, fused * s_fused], axis=1).astype(np.float32)
        return res

    def _skip_representation(self, section: _Section, inputs: _Inputs) -> np.ndarray:
        """The expression skip: principal components of the log expression, smoothed like the model-free PCA.

        Averaged twice over each spot's neighbours within 150 um (with itself), as :func:`histoclip.tl.domains` does;
        more often where the neighbour cap keeps the graph inside 150 um (Visium HD bins: :func:`physical_hops`).
        """
        proj = inputs.skip
        um = spot_coords_um(section.spots)
        graph = radius_graph(um, SKIP_RADIUS_UM, section.spots.library_labels())
        return smooth_features(proj, graph, physical_hops(graph, um, SKIP_RADIUS_UM, SKIP_HOPS))

    @torch.inference_mode()
    def _set_block_scale(self, batch_size: int = 512) -> None:
        """Scale the two blocks of the joint embedding (skip, fused) to unit mean squared norm over the training spots.

        The blocks are centred first; each then carries the same weight in the clustering of
        :func:`histoclip.tl.domains`. Above :data:`~histoclip.pp._genes.FIT_SAMPLE` training spots the scales are
        estimated on a seeded sample of that many (spread over the sections by size), so this costs one embedding of
        the sample, not of a million bins.
        """
        if self.module.skip_components == 0 or not self._sections:
            return
        total = sum(x.n_obs for x in self._train_inputs)
        parts = [self._embeddings(s, x, batch_size, scaled=False,
                                  rows=fit_rows(x.n_obs, 0, max(1, int(np.ceil(FIT_SAMPLE * x.n_obs / total)))))
                 for s, x in zip(self._sections, self._train_inputs, strict=True)]
        scale = []
        for key in ("skip", "fused"):
            z = np.concatenate([p[key] for p in parts]).astype(np.float64)
            ms = float(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean())
            scale.append(1.0 / np.sqrt(ms) if ms > 1e-12 else 1.0)
        self.module.block_scale.copy_(torch.tensor(scale, dtype=self.module.block_scale.dtype))
        self._scale_stale = False

    # ---------------------------------------------------------------------------------------------- save / load
    # (the work is done in model/_save.py, which also checks model files before loading them)
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the model: weights, genes, normalisation and settings, in one safetensors file.

        ``path`` is a folder (the file is ``path/model.safetensors``) or a file name ending in ``.safetensors``.
        What :func:`histoclip.tl.predict_expression` has built from the training spots (the retrieval reference
        bank: embeddings and expression of every training spot; the regression head) is saved too, so a loaded
        model predicts new slides without its training data: call ``predict_expression`` once with each method
        you will use before saving. The file is written to a temporary name and renamed, so an interrupted save
        never leaves a broken file. An existing file is only replaced with ``overwrite=True``; without it the file
        is created exclusively, so of two processes saving to one path at once, one gets :class:`FileExistsError`
        and the other's file stays whole.

        Returns
        -------
        The path of the file written.

        """
        return _save.save_model(self, path, overwrite=overwrite)

    def _save_checkpoint(self, dir_path: str | os.PathLike, optimizer_state: dict | None, epoch: int) -> None:
        _save.save_checkpoint(self, dir_path, optimizer_state, epoch)

    def _take_optimizer_state(self) -> dict | None:
        state, self._optimizer_state = getattr(self, "_optimizer_state", None), None
        return state

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        data: AnnData | SpatialData | Sequence[AnnData] | None = None,
        *,
        accelerator: str = "auto",
        weights: str | os.PathLike | None = None,
    ) -> HistoCLIP:
        """Load a model saved with :meth:`save` (no code is unpickled: safetensors + JSON).

        The file is checked before anything it describes is allocated: its settings against sane bounds, and the
        shapes of the network they describe (built on torch's ``"meta"`` device, without memory) against the
        tensors it holds; a file that fails gets a :class:`ValueError` saying what is wrong. Loading a
        ``checkpoint_dir`` of :meth:`train` also restores the optimizer state written by the same training run, so
        that ``HistoCLIP.load(checkpoint_dir, data).train(remaining_epochs)`` resumes it.

        Parameters
        ----------
        path
            The folder given to :meth:`save` (holding ``model.safetensors``), or the ``.safetensors`` file itself.
        data
            Data to attach (for embedding and further training): its genes must include the model's, and its
            patches must have the model's physical size. Optional for image-only use and for prediction with the
            saved reference bank and regression head; attaching data drops those, and they are rebuilt from the
            attached spots when next needed.
        accelerator
            Device to map the weights to.
        weights
            Pretrained backbone weights for an *untrained* model that is trained after loading. A weights path
            stored in the file is a record only: it is never opened unless named here.

        Returns
        -------
        The loaded model, in eval mode on the chosen device.

        """
        return _save.load_model(cls, path, data, accelerator=accelerator, weights=weights)

    def _attach(self, data) -> None:
        items = _as_list(data)
        for d in items:
            table = resolve(d, library_key=self.setup_params["library_key"], library_id=self.setup_params["library_id"],
                            table_key=self.setup_params["table_key"], shapes_key=self.setup_params["shapes_key"],
                            need_image=False).adata
            missing = [g for g in self.genes if g not in table.var_names]
            if missing:
                present = set(self.genes)
                raise KeyError(
                    f"{len(missing)} of the model's {len(self.genes)} genes are absent from the data (first: "
                    f"{missing[:5]}); the data has {table.n_vars} genes (e.g. {list(table.var_names[:5])}), "
                    f"{sum(g in present for g in table.var_names)} of them the model's. Attach data measured on the "
                    "model's genes (model.genes; e.g. the same gene identifiers: symbols vs. Ensembl ids, "
                    "var_names_make_unique suffixes), or load without data to embed images or predict expression."
                )
            size = table.uns.get(Key.uns.histoclip, {}).get("params", {}).get("patches", {}).get("size_um")
            want = self.patch_settings.get("size_um")
            if want is not None and size is not None and abs(float(size) - float(want)) > 1e-6:
                raise ValueError(
                    f"The data's patches are {float(size)} um but the model was trained on {want} um patches; rerun "
                    f"histoclip.pp.extract_patches(data, size_um={want})."
                )
        self._data = items
        self._sections = [self._section(d, need_counts=True) for d in items]
        self.predictor_state = {}  # built from other training spots
        self._train_inputs = [self._inputs(LogExpression(s.spots.adata, self.genes, layer=self.init_params["layer"]))
                              for s in self._sections]

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "untrained"
        return (f"HistoCLIP({state}, {len(self.genes)} genes, image backbone {self.init_params['image_backbone']!r}, "
                f"latent_dim={self.init_params['latent_dim']}, epochs={len(self.history)})")
