from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._settings import logger
from .._utils import timed, write_results
from ..model import HistoCLIP
from ..model._predict import (
    _context,
    apply_ridge,
    context_features,
    fit_ridge,
    image_representation,
    reference_bank,
    retrieve,
)
from ..pp._genes import expression_matrix

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
        A trained :class:`~histoclip.model.HistoCLIP`, trained on other sections. The retrieval reference bank and
        the regression head are built from its training spots on first use and kept in ``model.predictor_state``;
        :meth:`~histoclip.model.HistoCLIP.save` stores them, so a model loaded without its training data
        predicts with every method that was used before it was saved.
    method
        ``"retrieval"`` (BLEEP): the prediction of a spot is the softmax-weighted mean log-normalised expression of the
        ``k`` training spots whose expression embeddings are closest to its image embedding (the contrastive space).
        ``"regression"``: a ridge head on the image tower's features (the precomputed multi-scale features, or the
        CNN's), z-scored within each section and joined with the mean of each spot's spatial neighbours (within
        1.5 spot spacings); 256 principal components; penalty chosen by leave-one-section-out cross-validation on
        the training sections only. On HER2ST the regression head is the more accurate (``benchmarks/prediction.py``).
    k
        Reference spots averaged by retrieval.
    temperature
        Softmax temperature of the retrieval weights (default: the model's contrastive temperature).
    context
        Retrieval: weight of the spatial neighbours' image embeddings mixed into each query spot's (0: the spot
        alone).
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
        state = model.predictor_state
        if method == "retrieval":
            z = _context(model._embed(section, None, "image", batch_size), section, context)
            key = "bank"
            if key not in state:
                state[key] = reference_bank(model, batch_size)
            bank = state[key]
            pred = retrieve(z, bank, k, temperature)
            n_ref = bank["expression"].shape[0]
        else:
            if "ridge" not in state:
                xs = [context_features(image_representation(model, s), s) for s in model._sections]
                ys = [expression_matrix(s.spots.adata, model.genes, layer=model.init_params["layer"])
                      for s in model._sections]
                groups = np.concatenate([np.full(len(x), i) for i, x in enumerate(xs)])
                state["ridge"] = fit_ridge(np.concatenate(xs), np.concatenate(ys), groups)
            pred = apply_ridge(context_features(image_representation(model, section), section), state["ridge"])
            n_ref = int(sum(s.spots.n_obs for s in model._sections))
    pred = pred.astype(np.float32)
    table = section.spots.adata
    params = {"method": method, "k": k if method == "retrieval" else None,
              "temperature": temperature if method == "retrieval" else None,
              "context": context if method == "retrieval" else None, "n_reference": int(n_ref),
              "n_genes": len(model.genes), "key_added": key_added}
    if method == "regression":
        params["alpha"] = float(state["ridge"]["alpha"])
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
