from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._constants import Key
from .._settings import logger
from .._utils import RNGLike, get_table, is_spatialdata, resolve_seed, timed, write_results
from ..io._slide import resolve_table_key
from ..model import HistoCLIP
from ..pp._patches import patch_image_key
from ..train._loop import cpu_threads, torch_threads

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def train(
    data: AnnData | SpatialData | Sequence[AnnData],
    *,
    max_epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    accelerator: str = "auto",
    rng: RNGLike = 0,
    **model_kwargs: Any,
) -> HistoCLIP:
    """Train a contrastive image-expression model on one or several slides.

    Parameters
    ----------
    data
        AnnData or SpatialData with patches from :func:`histoclip.pp.extract_patches`, or a list of AnnData
        (several sections, each with its own image).
    max_epochs, batch_size, lr, accelerator
        See :meth:`histoclip.model.HistoCLIP.train`.
    rng
        Seed for everything random in training.
    **model_kwargs
        Passed to :class:`histoclip.model.HistoCLIP` (``n_genes``, ``image_backbone``, ``latent_dim``, ...).
        With SpatialData, ``image_key`` defaults to the image :func:`histoclip.pp.extract_patches` cut the patch
        boxes from (recorded with them); naming another one is an error, and so is naming none when the object
        holds several images and none is recorded.

    Returns
    -------
    The trained :class:`~histoclip.model.HistoCLIP`; ``data`` is not modified. Use :func:`histoclip.tl.embed`
    to write the embeddings.

    """
    seed = resolve_seed(rng)
    if is_spatialdata(data):  # Visium HD: the model records the bins' table ("square_008um" by default), not "table"
        model_kwargs["table_key"] = resolve_table_key(data, model_kwargs.get("table_key", "table"))
    if model_kwargs.get("image_features_key") is None and model_kwargs.get("use_image") is not False:
        # patches are read from the image the boxes belong to
        patch_image_key(data, model_kwargs.get("table_key", "table"), model_kwargs.get("image_key"))
    with timed("train"):
        model = HistoCLIP(data, **model_kwargs)
        model.train(max_epochs, batch_size=batch_size, lr=lr, accelerator=accelerator, rng=seed)
    return model


# The most memory one batch of the image tower may take in embed: a float32 3 x px x px patch costs about 32 times
# its size in activations (measured: small CNN ~24x, ResNet-18 ~12x, ResNet-50 ~26x), so batches of large patches
# are cut down to fit, whatever batch_size or a model file's patch_px asks for.
EMBED_BATCH_BYTES = 256 * 2**20


def _image_batch_size(model: HistoCLIP, batch_size: int) -> int:
    px = model.init_params.get("patch_px") if model.init_params.get("image_features_key") is None else None
    if not px:
        return batch_size
    fit = max(1, EMBED_BATCH_BYTES // (3 * 4 * 32 * int(px) ** 2))
    if fit < batch_size:
        logger.info("embed: %d spots per forward pass instead of %d (%d-px patches; batches are kept under %d MiB).",
                    fit, batch_size, px, EMBED_BATCH_BYTES // 2**20)
    return min(batch_size, fit)


def _model_fingerprint(model: HistoCLIP) -> str:
    """A hash of the model's weights: which model wrote an embedding."""
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    for name, value in model.module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _joint_record_kept(adata: AnnData, modality: str, key_added: str, model_id: str) -> dict | None:
    """For ``modality="image"`` over a stored joint of the same ``key_added``: the record to keep, or an error.

    The image-only call rewrites ``{key_added}_image`` only. When the joint, expression latent and image weight
    stored under ``key_added`` are this model's (the same weights), the record of the joint call still describes
    everything stored and is kept; when they are another model's, the image call would leave them out of step with
    their record, and is refused before any work.
    """
    if modality != "image" or key_added not in adata.obsm:
        return None
    root = adata.uns.get(Key.uns.histoclip, {})
    params = root.get("params", {}) if isinstance(root, Mapping) else {}
    record = params.get("embed") if isinstance(params, Mapping) else None
    if (isinstance(record, Mapping) and record.get("key_added") == key_added and record.get("modality") == "all"
            and record.get("model_fingerprint") == model_id):
        return dict(record)
    stale = [f"adata.obsm[{k!r}]" for k in (key_added, f"{key_added}_expression") if k in adata.obsm]
    stale += [f"adata.obs[{k!r}]" for k in (_weight_key(key_added),) if k in adata.obs]
    raise ValueError(
        f"{', '.join(stale)} hold the joint embedding of another model (or one with no record of its model); "
        f"embedding only the image with this model under key_added={key_added!r} would leave them out of step with "
        f"adata.obsm[{key_added + '_image'!r}] and with the record in uns['histoclip']['params']['embed']. Pass "
        "another key_added, embed with modality='all', or delete them first ("
        + "; ".join(f"del {k}" for k in stale) + ")."
    )


def _weight_key(key_added: str) -> str:
    if key_added == Key.obsm.joint:
        return Key.obs.image_weight
    return f"{key_added}_image_weight"


def embed(
    data: AnnData | SpatialData,
    model: HistoCLIP,
    *,
    modality: str = "all",
    image_key: str | None = None,
    key_added: str = Key.obsm.joint,
    batch_size: int = 512,
    copy: bool = False,
) -> AnnData | None:
    """Write the model's embeddings of each spot into ``obsm``.

    Parameters
    ----------
    data
        AnnData or SpatialData (results go to its table) with patches from :func:`histoclip.pp.extract_patches`
        and, for the expression and joint embeddings, the model's genes.
    model
        A trained :class:`~histoclip.model.HistoCLIP`.
    modality
        ``"all"`` (joint, image and expression) or ``"image"`` (image tower only, for sections without counts).
    image_key
        SpatialData only: the image to read patches from. Default: the one :func:`histoclip.pp.extract_patches`
        cut the boxes from (recorded with them); naming another one is an error.
    key_added
        Key of the joint embedding; the others get ``_image`` and ``_expression`` appended.
    batch_size
        Spots per forward pass; fewer for large patches, so that one batch of the image tower takes at most
        ``EMBED_BATCH_BYTES`` (256 MiB) of activations (logged).
    copy
        Return a copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy. Sets (float32):

    - ``obsm["X_histoclip"]``: the joint embedding (``modality="all"`` only), ``skip_components + embedding_dim``
      columns (42 by default): the spot's expression principal components smoothed over its neighbours (the
      representation :func:`histoclip.tl.domains` clusters without a model; the expression skip) beside the per-spot
      weighted fusion of the image and expression latents, each block scaled to unit mean squared norm over the
      training spots. :func:`histoclip.tl.domains` clusters it by default after this call;
    - ``obsm["X_histoclip_image"]``: the image latent (``embedding_dim`` columns, 32 by default; absent for a model
      without an image branch);
    - ``obsm["X_histoclip_expression"]``: the expression latent (``embedding_dim`` columns; ``modality="all"`` only);
    - ``obs["histoclip_image_weight"]``: the fusion's weight of the image for each spot, in [0, 1] (the expression's
      is one minus it; ``modality="all"`` only; named ``f"{key_added}_image_weight"`` when ``key_added`` is changed;
      absent for a model without an image branch), drawn by :func:`histoclip.pl.image_weight`;
    - ``uns["histoclip"]["params"]["embed"]``: the model's settings and training parameters, and
      ``model_fingerprint``, a hash of its weights. A ``modality="image"`` call over a joint of the same
      ``key_added`` keeps the joint call's record when that joint is the same model's, and is refused (before any
      work) when it is another model's, so the record always describes what is stored.

    Embeddings with NaN or inf values (a model whose weights overflow) are an error; nothing is written.

    """
    if modality not in ("all", "image"):
        raise ValueError(f"modality must be 'all' or 'image', got {modality!r}.")
    if not isinstance(model, HistoCLIP):
        raise TypeError(f"model must be a histoclip HistoCLIP (from histoclip.tl.train), got {type(model).__name__}.")
    model._check_trained()
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = _image_batch_size(model, int(batch_size))
    uses_patches = model.init_params.get("image_features_key") is None and model.init_params.get("use_image", True)
    if uses_patches:
        image_key = patch_image_key(data, model.setup_params["table_key"], image_key)
    model_id = _model_fingerprint(model)
    kept = _joint_record_kept(get_table(data, model.setup_params["table_key"]), modality, key_added, model_id)
    with timed("embed"), torch_threads(cpu_threads()), _setup_image_key(model, image_key):
        obs: dict[str, np.ndarray] = {}
        if modality == "image":
            if not model.init_params.get("use_image", True):
                raise ValueError("This model was trained without its image branch (use_image=False); it has no image "
                                 "embedding.")
            section, _ = model._resolve_query(data, "image")
            z = model._embeddings(section, None, batch_size)
            out: dict[str, np.ndarray] = {f"{key_added}_image": z["image"]}
        else:
            section, inputs = model._resolve_query(data, "joint")
            z = model._embeddings(section, inputs, batch_size)
            out = {key_added: z["joint"], f"{key_added}_expression": z["expression"]}
            if "image" in z:
                out[f"{key_added}_image"] = z["image"]
            if "image_weight" in z:  # absent (not zero-filled) for a model without an image branch
                obs[_weight_key(key_added)] = z["image_weight"]
    adata = section.spots.adata
    if copy:
        if section.spots.source != "anndata":
            raise ValueError("copy=True is only supported for AnnData input.")
        adata = adata.copy()
    bad = {k: int((~np.isfinite(v)).any(axis=-1).sum()) if v.ndim > 1 else int((~np.isfinite(v)).sum())
           for k, v in {**out, **obs}.items()}
    if any(bad.values()):
        source = getattr(model, "_loaded_from", None)
        raise ValueError(
            f"The model{f' loaded from {source}' if source else ''} gives NaN or inf embeddings for "
            f"{max(bad.values())} of {section.spots.n_obs} spots ({', '.join(f'{k}: {n}' for k, n in bad.items() if n)}"
            "): its weights overflow (finite but huge, or a diverged training run). Nothing was written. Retrain the "
            "model, or load one saved from a run whose history shows a finite loss."
        )
    params = {"modality": modality, "key_added": key_added, **model.init_params, **model.train_params,
              "patch_size_um": model.patch_settings.get("size_um"), "image_key": image_key,
              "model_fingerprint": model_id}
    if kept is not None:  # the joint of this key_added is this model's: the record still describes all of it
        params = kept
        logger.info("embed: adata.obsm[%r] and its expression latent are from this model too; the record keeps "
                    "modality 'all'.", key_added)
    write_results(adata, obsm=out, obs=obs or None, params=("embed", params))
    return adata if copy else None


@contextmanager
def _setup_image_key(model: HistoCLIP, image_key: str | None) -> Iterator[None]:
    """Read patches from ``image_key`` for this call (when the data record none); the model is left as it was."""
    before = model.setup_params["image_key"]
    if image_key is not None:
        model.setup_params["image_key"] = image_key
    try:
        yield
    finally:
        model.setup_params["image_key"] = before
