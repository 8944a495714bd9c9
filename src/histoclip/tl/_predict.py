from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._settings import logger
from .._utils import get_table, timed, write_results
from ..model import HistoCLIP
from ..model._predict import (
    _context,
    apply_ridge,
    context_features,
    cv_groups,
    decode_genes,
    encode_genes,
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
    table = get_table(query, model.setup_params["table_key"])
    if key in table.obsm:
        return
    fp = model.patch_settings.get("image_features")
    if not fp:
        raise KeyError(
            f"The query has no obsm[{key!r}] and the model does not record how its features were made; compute them "
            "with histoclip.tl.image_features(query, ...) using the training settings."
        )
    from ._features import image_features

    backbones = [fp["backbone"]] if isinstance(fp["backbone"], str) else [str(b) for b in fp["backbone"]]
    if any(b.startswith("module:") for b in backbones):
        raise KeyError(
            f"The query has no obsm[{key!r}], and the model's features came from a torch.nn.Module ({backbones}) that "
            "cannot be rebuilt from the record: compute them with histoclip.tl.image_features(query, backbone=<the "
            f"same module>, ..., key_added={key!r}) first."
        )
    logger.info("Computing the query's image features with the training settings %s", fp)
    extra = {k: (dict(fp[k]) if k == "model_kwargs" else [float(v) for v in fp[k]])
             for k in ("model_kwargs", "mean", "std") if k in fp}
    image_features(query, backbone=fp["backbone"], weights=fp.get("weights"), sizes_um=list(fp["sizes_um"]),
                   patch_px=int(fp["patch_px"]), tta=bool(fp["tta"]), stain_norm=fp.get("stain_norm"),
                   img_key=fp.get("img_key"), key_added=key, **extra)


def _features_text(model: HistoCLIP) -> str:
    """Which image features a prediction runs on, for the log."""
    key = model.init_params.get("image_features_key")
    if key is None:
        size = model.patch_settings.get("size_um")
        return (f"the trained {model.init_params['image_backbone']!r} image tower on "
                f"{f'{size:g} um ' if size else ''}patches")
    fp = model.patch_settings.get("image_features", {})
    if not fp:
        return f"precomputed features obsm[{key!r}]"
    return (f"precomputed features obsm[{key!r}] ({fp.get('backbone')}, {list(fp.get('sizes_um', []))} um, "
            f"image {fp.get('img_key', '?')!r}, stain_norm={fp.get('stain_norm')}, tta={fp.get('tta')})")


def _resolve_genes(model: HistoCLIP, genes) -> list[str]:
    """The genes to predict: the model's, or any that every training section measured."""
    if genes is None:
        return list(model.genes)
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        raise ValueError(f"genes must be a non-empty list of distinct gene names, got {genes[:5]}...")
    if not model._sections:
        return genes  # checked against what the saved predictors cover
    for i, s in enumerate(model._sections):
        missing = [g for g in genes if g not in s.spots.adata.var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of the {len(genes)} requested genes are not measured in training section {i} "
                f"(first: {missing[:5]}); predict_expression can predict only genes every training section measured."
            )
    return genes


def _state_key(kind: str, genes: list[str], model: HistoCLIP) -> str:
    if list(genes) == list(model.genes):
        return kind
    return f"{kind}_{hashlib.sha1(chr(10).join(genes).encode()).hexdigest()[:16]}"


def _training_expression(model: HistoCLIP, genes: list[str], what: str) -> list[np.ndarray]:
    if not model._sections:
        raise RuntimeError(
            f"The model holds no training data, and its saved predictors do not cover these genes ({what}); load it "
            "with HistoCLIP.load(dir, training_data) to predict other genes than the model's."
        )
    return [expression_matrix(s.spots.adata, genes, layer=model.init_params["layer"]) for s in model._sections]


def predict_expression(
    query: AnnData | SpatialData,
    model: HistoCLIP,
    *,
    method: Literal["regression", "retrieval"] = "regression",
    genes: Sequence[str] | None = None,
    k: int = 50,
    temperature: float | None = None,
    context: float = 0.5,
    key_added: str = Key.layers.predicted,
    batch_size: int = 512,
) -> AnnData | None:
    """Predict expression from the image alone.

    The query needs spots and an image (patches from :func:`histoclip.pp.extract_patches` at the model's patch
    size, or the model's precomputed image features, which are computed with the training settings when missing);
    it may carry no counts at all, e.g. a tile grid from :func:`histoclip.pp.tile_grid`. Never evaluate on a
    section the model was trained on. The log says which path ran (method and image features).

    Parameters
    ----------
    query
        AnnData (or SpatialData) of the section to predict.
    model
        A trained :class:`~histoclip.model.HistoCLIP`, trained on other sections. The retrieval reference bank and
        the regression head are built from its training spots on first use and kept in ``model.predictor_state``;
        :meth:`~histoclip.model.HistoCLIP.save` stores them, so a model loaded without its training data
        predicts with every method (and gene list) that was used before it was saved.
    method
        ``"regression"`` (default): a ridge head on the image tower's features (the precomputed multi-scale features,
        or the CNN's), z-scored within each section and joined with the mean of each spot's spatial neighbours
        (within 1.5 spot spacings); 256 principal components; penalty chosen by cross-validation on the training
        sections only (leave one section out; with fewer than three sections, five spatial stripes). It is
        deterministic and, on HER2ST, the more accurate path both across patients and within one patient
        (``benchmarks/prediction.py``; best with ``hc.tl.image_features(..., stain_norm="macenko")``).
        ``"retrieval"`` (BLEEP): the prediction of a spot is the softmax-weighted mean log-normalised expression of the
        ``k`` training spots whose expression embeddings are closest to its image embedding (the contrastive space).
    genes
        Genes to predict (default: the model's genes). Any gene that every training section measured can be
        predicted: the regression head is fitted for them, and retrieval averages their expression with the
        same weights.
    k
        Reference spots averaged by retrieval.
    temperature
        Softmax temperature of the retrieval weights (default: the model's contrastive temperature).
    context
        Retrieval: weight of the spatial neighbours' image embeddings mixed into each query spot's (0: the spot
        alone).
    key_added
        Layer written when the query's genes are exactly the predicted genes.
    batch_size
        Spots per forward pass.

    Returns
    -------
    When ``query.var_names`` hold exactly the predicted genes (any order), ``None``: the predictions go to
    ``query.layers["histoclip_predicted"]`` (float32, log1p of counts per 10,000). Otherwise a new AnnData with one
    column per predicted gene (``X``: the predictions), the query's ``obs``, ``obsm["spatial"]`` and
    ``uns["spatial"]``, so :func:`histoclip.pl.predicted_expression` and scanpy work on it. Either way
    ``uns["histoclip"]["params"]["predict_expression"]`` records the settings (method, features, genes).

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
    genes = _resolve_genes(model, genes)
    temperature = float(model.init_params["temperature"] if temperature is None else temperature)
    features = _features_text(model)
    logger.info("predict_expression: %s on %s, %d genes", method, features, len(genes))
    state = model.predictor_state
    key = _state_key("bank" if method == "retrieval" else "ridge", genes, model)
    if key in state and key != ("bank" if method == "retrieval" else "ridge"):
        if decode_genes(state[key]["genes"]) != genes:
            raise RuntimeError(f"predictor_state[{key!r}] holds other genes than requested; drop it and retry.")
    with timed(f"predict_expression ({method})"):
        _ensure_features(query, model)
        section, _ = model._resolve_query(query, "image")
        if method == "retrieval":
            z = _context(model._embed(section, None, "image", batch_size), section, context)
            if "bank" not in state:
                state["bank"] = reference_bank(model, batch_size)
            bank = state["bank"]
            if key != "bank":
                if key not in state:
                    expr = _training_expression(model, genes, "retrieval")
                    state[key] = {"expression": np.concatenate(expr), "genes": encode_genes(genes)}
                bank = {**bank, "expression": state[key]["expression"]}
            pred = retrieve(z, bank, k, temperature)
            n_ref = bank["expression"].shape[0]
        else:
            if key not in state:
                ys = _training_expression(model, genes, "regression")
                xs = [context_features(image_representation(model, s), s) for s in model._sections]
                state[key] = fit_ridge(np.concatenate(xs), np.concatenate(ys), cv_groups(model._sections))
                if key != "ridge":
                    state[key]["genes"] = encode_genes(genes)
            pred = apply_ridge(context_features(image_representation(model, section), section), state[key])
            n_ref = int(state[key].get("n_train", np.int64(-1)))
    pred = pred.astype(np.float32)
    table = section.spots.adata
    params = {"method": method, "features": features, "k": k if method == "retrieval" else None,
              "temperature": temperature if method == "retrieval" else None,
              "context": context if method == "retrieval" else None, "n_reference": int(n_ref),
              "n_genes": len(genes), "key_added": key_added}
    if method == "regression":
        params["alpha"] = float(state[key]["alpha"])
    params = {k_: v for k_, v in params.items() if v is not None}
    if set(table.var_names) == set(genes) and table.n_vars == len(genes):
        order = pd.Index(genes).get_indexer(table.var_names)
        write_results(table, layers={key_added: pred[:, order]}, params=("predict_expression", params))
        return None
    out = AnnData(X=pred, obs=table.obs.copy(), var=pd.DataFrame(index=pd.Index(genes, name=None)))
    out.obsm[Key.obsm.spatial] = np.asarray(table.obsm[Key.obsm.spatial]).copy()
    if Key.uns.spatial in table.uns:
        out.uns[Key.uns.spatial] = table.uns[Key.uns.spatial]
    write_results(out, params=("predict_expression", params))
    return out
