"""Expression prediction from the image alone: retrieval (BLEEP) and regression heads on a trained HistoCLIP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._settings import logger
from ..pp._genes import expression_matrix
from ..pp._graph import knn_graph, row_normalize

if TYPE_CHECKING:
    from ._histoclip import HistoCLIP, _Section


def _context(z: np.ndarray, section: _Section, weight: float) -> np.ndarray:
    """Mix each spot's embedding with the mean of its spatial neighbours' (weight of the neighbours)."""
    if weight <= 0:
        return z
    a = row_normalize(knn_graph(section.spots.coords(), 6, section.spots.library_labels()), self_loops=False)
    out = (1 - weight) * z + weight * (a @ z)
    return out.astype(np.float32)


def reference_bank(model: HistoCLIP, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Expression embeddings, image embeddings and log-normalised expression of the training spots."""
    if not model._sections:
        raise RuntimeError(
            "The model holds no training data to build its reference from; load it with "
            "HistoCLIP.load(dir, training_data) or train it in this session."
        )
    emb, img, expr = [], [], []
    for section, inputs in zip(model._sections, model._train_inputs, strict=True):
        emb.append(model._embed(section, inputs, "expression", batch_size))
        img.append(model._embed(section, None, "image", batch_size))
        expr.append(expression_matrix(section.spots.adata, model.genes, layer=model.init_params["layer"]))
    bank = {"expression_embedding": np.concatenate(emb), "image_embedding": np.concatenate(img),
            "expression": expr[0] if len(expr) == 1 else np.concatenate(expr)}
    logger.info("Reference bank: %d training spots", bank["expression"].shape[0])
    return bank


CHUNK_BYTES = 128 * 2**20


def retrieve(query_img: np.ndarray, bank: dict[str, np.ndarray], k: int, temperature: float,
             chunk: int | None = None) -> np.ndarray:
    """BLEEP retrieval: softmax(similarity / T)-weighted mean expression of the k most similar reference spots.

    Similarities are between the query's image embedding and the reference spots' expression embeddings
    (the contrastive space). Queries are processed in chunks (default: as many as keep the chunk's float32
    similarities and the int64 indices ``argpartition`` returns for them, 12 bytes per reference spot and query,
    near ``CHUNK_BYTES``, 128 MiB), so memory does not grow with the query; time is ``n_query x n_reference``
    (exact search).
    """
    import scipy.sparse as sp

    ref = bank["expression_embedding"]
    expr = bank["expression"]
    k = int(min(k, ref.shape[0]))
    if chunk is None:
        chunk = int(np.clip(CHUNK_BYTES // (12 * ref.shape[0]), 16, 4096))
    out = np.zeros((query_img.shape[0], expr.shape[1]), dtype=np.float32)
    for s in range(0, query_img.shape[0], chunk):
        sim = query_img[s : s + chunk] @ ref.T
        top = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, -k:]
        ts = np.take_along_axis(sim, top, axis=1) / temperature
        w = np.exp(ts - ts.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        # (chunk x n_ref) sparse weights times the reference expression: no (chunk, k, n_genes) gather
        rows = np.repeat(np.arange(w.shape[0]), k)
        weights = sp.csr_matrix((w.ravel(), (rows, top.ravel())), shape=(w.shape[0], ref.shape[0]))
        out[s : s + chunk] = weights @ expr
    return out


ALPHAS = tuple(np.logspace(0, 5, 11))


def image_representation(model: HistoCLIP, section: _Section, batch_size: int = 256) -> np.ndarray:
    """The image tower's features before the projection head (the precomputed features themselves, or the CNN's)."""
    import torch

    if section.features is not None:
        return section.features
    from torch.utils.data import DataLoader

    from ..data import PatchDataset

    out = []
    model.module.eval()
    with torch.inference_mode():
        for img, _, _ in DataLoader(PatchDataset(section.reader), batch_size=batch_size, shuffle=False):
            out.append(model.module.image_encoder(img.to(model.device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def neighbour_mean(x: np.ndarray, section: _Section, radius: float = 1.5) -> np.ndarray:
    """Mean of ``x`` over same-library spots within ``radius`` x the median nearest-neighbour spacing.

    A spot without neighbours keeps its own row.
    """
    return neighbour_mean_xy(x, section.spots.coords(), section.spots.library_labels(), radius)


def neighbour_mean_xy(x: np.ndarray, coords: np.ndarray, libs: np.ndarray, radius: float = 1.5) -> np.ndarray:
    """:func:`neighbour_mean` from spot coordinates and library labels."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    out = x.copy()
    for lib in np.unique(libs):
        idx = np.flatnonzero(libs == lib)
        if idx.size < 2:
            continue
        nn = NearestNeighbors().fit(coords[idx])
        d1 = nn.kneighbors(coords[idx], n_neighbors=2)[0][:, 1]
        graph = nn.radius_neighbors_graph(coords[idx], radius=radius * float(np.median(d1)), mode="connectivity")
        graph = sp.csr_matrix(graph)
        graph.setdiag(0)
        graph.eliminate_zeros()
        deg = np.asarray(graph.sum(1)).ravel()
        mean = sp.diags(1.0 / np.maximum(deg, 1)) @ graph @ x[idx]
        out[idx] = np.where(deg[:, None] > 0, mean, x[idx])
    return out.astype(np.float32)


def context_features(x: np.ndarray, section: _Section) -> np.ndarray:
    """Per-section z-scored features next to the mean of their spatial neighbours' (NH2ST-style context)."""
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return np.concatenate([z, neighbour_mean(z, section)], axis=1).astype(np.float32)


N_STRIPES = 5


def cv_groups(sections: list[_Section]) -> np.ndarray:
    """Cross-validation groups of the training spots: sections, or spatial stripes with fewer than three sections.

    The stripes are ``N_STRIPES`` equal-count bands along each section's longer axis: neighbouring spots stay in one
    fold, so the neighbour-mean features do not leak the held-out spots' own tissue into training.
    """
    if len(sections) >= 3:
        return np.concatenate([np.full(s.spots.n_obs, i) for i, s in enumerate(sections)])
    return np.concatenate([spatial_stripes(s.spots.coords(), s.spots.library_labels()) for s in sections])


def spatial_stripes(coords: np.ndarray, libs: np.ndarray, n: int = N_STRIPES) -> np.ndarray:
    """Stripe index 0..n-1 of each spot: equal-count bands along its library's longer axis."""
    out = np.zeros(len(coords), dtype=np.int64)
    for lib in np.unique(libs):
        idx = np.flatnonzero(libs == lib)
        c = coords[idx]
        axis = int(np.ptp(c[:, 1]) > np.ptp(c[:, 0]))
        rank = np.argsort(np.argsort(c[:, axis], kind="stable"), kind="stable")
        out[idx] = (rank * n) // max(len(idx), 1)
    return out


def encode_genes(genes: list[str]) -> np.ndarray:
    """Gene names as a uint8 array (saved with the model's predictors)."""
    return np.frombuffer("\n".join(genes).encode(), dtype=np.uint8).copy()


def decode_genes(arr: np.ndarray) -> list[str]:
    return bytes(np.asarray(arr, dtype=np.uint8)).decode().split("\n")


def fit_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas=ALPHAS, n_pcs: int = 256) -> dict:
    """Ridge regression ``y ~ x`` on the top ``n_pcs`` principal components of the standardised ``x``.

    The penalty is chosen by leave-one-group-out cross-validation on the training data (``groups``: sections, or
    spatial stripes from :func:`cv_groups`), maximising the mean per-gene Pearson r.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.utils.extmath import randomized_svd

    if len(np.unique(groups)) < 2:
        raise ValueError("fit_ridge needs at least two cross-validation groups (sections or spatial stripes).")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    n_pcs = int(min(n_pcs, xs.shape[0] - 1, xs.shape[1]))
    _, _, vt = randomized_svd(xs, n_pcs, random_state=0)
    components = vt.T.astype(np.float32)
    xs = xs @ components
    best, best_score = alphas[0], -np.inf
    for a in alphas:
        scores = []
        for tr, te in LeaveOneGroupOut().split(xs, y, groups):
            pred = Ridge(alpha=a).fit(xs[tr], y[tr]).predict(xs[te])
            pc, yc = pred - pred.mean(0), y[te] - y[te].mean(0)
            den = np.sqrt((pc**2).sum(0) * (yc**2).sum(0))
            scores.append(np.mean(np.divide((pc * yc).sum(0), den, out=np.zeros(y.shape[1]), where=den > 0)))
        if np.mean(scores) > best_score:
            best, best_score = a, float(np.mean(scores))
    model = Ridge(alpha=best).fit(xs, y)
    logger.info("Regression head: ridge alpha %.3g (inner-CV mean r %.3f)", best, best_score)
    return {"mean": mu.astype(np.float32), "std": sd.astype(np.float32), "components": components,
            "coef": model.coef_.T.astype(np.float32), "intercept": model.intercept_.astype(np.float32),
            "alpha": np.float32(best), "n_train": np.int64(x.shape[0])}


def apply_ridge(x: np.ndarray, head: dict) -> np.ndarray:
    """Predictions of a head from :func:`fit_ridge`."""
    return (((x - head["mean"]) / head["std"]) @ head["components"]) @ head["coef"] + head["intercept"]
