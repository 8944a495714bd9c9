from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._settings import logger
from .._utils import timed, write_results
from ..model import HistoCLIP
from ..model._predict import _context, apply_ridge, fit_ridge, reference_bank, retrieve

if TYPE_CHECKING:
    from spatialdata import SpatialData


def _ensure_features(query, model: HistoCLIP) -> None:
    key = model.init_params.get("image_features_key")
    if key is None:
        return
    table = query.tables[model.setup_params["table_key"]] if hasattr(query, "tables") else query
    if key in table.obsm:
        return
    fp = model.patch_settings.get("image_features")
    if not fp:
        raise KeyError(
            f"The query has no obsm[{key!r}] and the model does not record how its features were made; compute them "
            "with histoclip.tl.image_features(query, ...) using the training settings."
        )
    from ._features import image_features

    logger.info("Computing the query's image features with the training settings %s", fp)
    image_features(query, backbone=fp["backbone"], weights=fp.get("weights"), sizes_um=list(fp["sizes_um"]),
                   patch_px=int(fp["patch_px"]), tta=bool(fp["tta"]), key_added=key)


def _state(model: HistoCLIP) -> dict:
    if not hasattr(model, "predictor_state") or model.predictor_state is None:
        model.predictor_state = {}
    return model.predictor_state


def predict_expression(
    query: AnnData | SpatialData,
    model: HistoCLIP,
    *,
    method: Literal["retrieval", "regression"] = "retrieval",
    k: int = 50,
    temperature: float | None = None,
    context: float = 0.5,
    key_added: str = Key.layers.predicted,
    batch_size: int = 512,
) -> AnnData | None:
    """Predict the expression of the model's genes from the image alone.

    The query needs spots and an image (patches from :func:`histoclip.pp.extract_patches` at the model's patch
    size, or the model's precomputed image features, which are computed with the training settings when missing);
    it may carry no counts at all, e.g. a tile grid from :func:`histoclip.pp.tile_grid`. Never evaluate on a
    section the model was trained on.

    Parameters
    ----------
    query
        AnnData (or SpatialData) of the section to predict.
    model
        A trained :class:`~histoclip.model.HistoCLIP`, trained on other sections.
    method
        ``"retrieval"`` (BLEEP): the prediction of a spot is the softmax-weighted mean log-normalised expression of the
        ``k`` training spots whose expression embeddings are closest to its image embedding. ``"regression"``: a ridge
        head from the image embedding to the log-normalised expression, fitted on the training spots (its penalty
        chosen by leave-one-section-out cross-validation on the training sections).
    k
        Reference spots averaged by retrieval.
    temperature
        Softmax temperature of the retrieval weights (default: the model's contrastive temperature).
    context
        Weight of the spatial neighbours' image embeddings mixed into each spot's (0: the spot alone). The same
        mixing is applied to training and query spots (within each section).
    key_added
        Layer written when the query's genes are exactly the model's genes.
    batch_size
        Spots per forward pass.

    Returns
    -------
    When ``query.var_names`` hold exactly the model's genes (any order), ``None``: the predictions go to
    ``query.layers["histoclip_predicted"]`` (float32, log1p of counts per 10,000). Otherwise a new AnnData with one
    column per model gene (``X``: the predictions), the query's ``obs``, ``obsm["spatial"]`` and ``uns["spatial"]``,
    so :func:`histoclip.pl.predicted_expression` and scanpy work on it. Either way
    ``uns["histoclip"]["params"]["predict_expression"]`` records the settings.
    """
    if method not in ("retrieval", "regression"):
        raise ValueError(f"method must be 'retrieval' or 'regression', got {method!r}.")
    if not isinstance(model, HistoCLIP):
        raise TypeError(f"model must be a histoclip HistoCLIP, got {type(model).__name__}.")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if not 0 <= context <= 1:
        raise ValueError(f"context must be in [0, 1], got {context}.")
    model._check_trained()
    temperature = float(model.init_params["temperature"] if temperature is None else temperature)
    with timed(f"predict_expression ({method})"):
        _ensure_features(query, model)
        section, _ = model._resolve_query(query, "image")
        z = _context(model._embed(section, None, "image", batch_size), section, context)
        state = _state(model)
        key = f"bank_context{context:g}"
        if key not in state:
            bank = reference_bank(model, batch_size)
            ctx = [_context(bank["image_embedding"][o : o + s.spots.n_obs], s, context)
                   for s, o in zip(model._sections, np.cumsum([0] + [s.spots.n_obs for s in model._sections]),
                                   strict=False)]
            bank["image_embedding_context"] = np.concatenate(ctx)
            bank["section"] = np.concatenate([np.full(s.spots.n_obs, i) for i, s in enumerate(model._sections)])
            state[key] = bank
        bank = state[key]
        if method == "retrieval":
            pred = retrieve(z, bank, k, temperature)
        else:
            head_key = f"ridge_context{context:g}"
            if head_key not in state:
                state[head_key] = fit_ridge(bank["image_embedding_context"], bank["expression"], bank["section"])
            pred = apply_ridge(z, state[head_key])
    pred = pred.astype(np.float32)
    table = section.spots.adata
    params = {"method": method, "k": k if method == "retrieval" else None, "temperature": temperature,
              "context": context, "n_reference": int(bank["expression"].shape[0]), "n_genes": len(model.genes),
              "key_added": key_added}
    if set(table.var_names) == set(model.genes) and table.n_vars == len(model.genes):
        order = pd.Index(model.genes).get_indexer(table.var_names)
        write_results(table, layers={key_added: pred[:, order]}, params=("predict_expression", params))
        return None
    out = AnnData(X=pred, obs=table.obs.copy(), var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    out.obsm[Key.obsm.spatial] = np.asarray(table.obsm[Key.obsm.spatial]).copy()
    if Key.uns.spatial in table.uns:
        out.uns[Key.uns.spatial] = table.uns[Key.uns.spatial]
    write_results(out, params=("predict_expression", params))
    return out
