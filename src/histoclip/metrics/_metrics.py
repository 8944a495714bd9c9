from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def _labelled(truth, pred) -> tuple[np.ndarray, np.ndarray]:
    truth = pd.Series(np.asarray(truth, dtype=object))
    pred = pd.Series(np.asarray(pred, dtype=object))
    if len(truth) != len(pred):
        raise ValueError(f"truth has {len(truth)} labels and pred {len(pred)}; they must match.")
    keep = truth.notna().to_numpy() & pred.notna().to_numpy() & (truth.astype(str) != "nan").to_numpy()
    if keep.sum() == 0:
        raise ValueError("No spot has both a true and a predicted label.")
    return truth[keep].astype(str).to_numpy(), pred[keep].astype(str).to_numpy()


def adjusted_rand(truth: Sequence, pred: Sequence) -> float:
    """Adjusted Rand index between two labelings, ignoring spots whose label is missing (NaN/None)."""
    return float(skm.adjusted_rand_score(*_labelled(truth, pred)))


def normalized_mutual_info(truth: Sequence, pred: Sequence) -> float:
    """Normalised mutual information (arithmetic mean normalisation), ignoring unlabelled spots."""
    return float(skm.normalized_mutual_info_score(*_labelled(truth, pred)))


def homogeneity(truth: Sequence, pred: Sequence) -> float:
    """Homogeneity: each predicted domain holds one true label. Unlabelled spots ignored."""
    return float(skm.homogeneity_score(*_labelled(truth, pred)))


def completeness(truth: Sequence, pred: Sequence) -> float:
    """Completeness: each true label falls in one predicted domain. Unlabelled spots ignored."""
    return float(skm.completeness_score(*_labelled(truth, pred)))


def domain_scores(truth: Sequence, pred: Sequence) -> dict[str, float]:
    """ARI, NMI, homogeneity and completeness in one dict."""
    t, p = _labelled(truth, pred)
    return {
        "ari": float(skm.adjusted_rand_score(t, p)),
        "nmi": float(skm.normalized_mutual_info_score(t, p)),
        "homogeneity": float(skm.homogeneity_score(t, p)),
        "completeness": float(skm.completeness_score(t, p)),
        "n_labelled": int(t.size),
    }


def gene_pearson(measured: np.ndarray, predicted: np.ndarray, genes: Sequence[str] | None = None) -> pd.Series:
    """Pearson r between measured and predicted expression, one value per gene (column).

    A gene that is constant in either input has an undefined r; it is reported as 0 (no predictive value),
    which is how the benchmarks count it.
    """
    m = np.asarray(measured.todense() if hasattr(measured, "todense") else measured, dtype=np.float64)
    p = np.asarray(predicted.todense() if hasattr(predicted, "todense") else predicted, dtype=np.float64)
    if m.shape != p.shape:
        raise ValueError(f"measured has shape {m.shape} and predicted {p.shape}; they must match.")
    mc = m - m.mean(axis=0)
    pc = p - p.mean(axis=0)
    denom = np.sqrt((mc**2).sum(axis=0) * (pc**2).sum(axis=0))
    r = np.divide((mc * pc).sum(axis=0), denom, out=np.zeros(m.shape[1]), where=denom > 1e-12)
    return pd.Series(r, index=list(genes) if genes is not None else None, name="pearson_r")
