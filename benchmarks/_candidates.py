"""Other representations a trained model gives, each a candidate for what ``tl.domains`` clusters after ``tl.embed``.

The joint embedding ``X_histoclip`` is ``[skip, fused]``: the model-free representation (the expression skip,
``model.module.skip_components`` columns) beside the fused latent, each block scaled to unit mean squared norm over
the training spots. Development runs on saved embeddings put three other blocks ahead of it in mean ARI on the slides
at hand, none of them on every slide (docs/benchmarks.md, "Which of the model's blocks to cluster"); which one
carries to slides nobody tuned on is what held-out sections decide. The benchmarks score them beside the joint so
that one run on a held-out slide answers it:

- the fused latent alone (the joint without its skip);
- ``[expression, fused]``: the expression latent beside the fused latent, each at unit mean squared norm;
- the joint with its skip at half weight.

``X_histoclip_expression`` alone is scored by the benchmarks already. Each candidate is clustered as the joint is:
10 principal components, the tied mixture, no further smoothing (``n_hops=0``: every block already averages the
neighbourhood).

Usage from a benchmark (run from the repository root, or with ``benchmarks/`` on ``sys.path``)::

    from _candidates import add_candidates

    for key, description in add_candidates(adata, model).items():
        hc.tl.domains(adata, n_domains=k, use_rep=key, n_hops=0, rng=seed)
"""

from __future__ import annotations

import anndata as ad
import numpy as np

import histoclip as hc


def _unit(block: np.ndarray) -> np.ndarray:
    """``block`` scaled to unit mean squared norm per spot (the scaling of the joint embedding's blocks)."""
    block = np.asarray(block, dtype=np.float64)
    norm = np.sqrt(np.mean(np.sum(block**2, axis=1)))
    return block / norm if norm > 0 else block


def add_candidates(adata: ad.AnnData, model: hc.HistoCLIP) -> dict[str, str]:
    """Write each candidate to ``adata.obsm`` (keys ``X_candidate_*``); returns ``{key: description}``.

    Needs ``tl.embed`` first (``obsm["X_histoclip"]`` and ``obsm["X_histoclip_expression"]``); a model without an
    expression skip gives only the ``[expression, fused]`` candidate.
    """
    for key in ("X_histoclip", "X_histoclip_expression"):
        if key not in adata.obsm:
            raise KeyError(f"adata.obsm[{key!r}] not found; run histoclip.tl.embed(adata, model) first.")
    joint = np.asarray(adata.obsm["X_histoclip"], dtype=np.float64)
    n_skip = int(model.module.skip_components)
    skip, fused = joint[:, :n_skip], joint[:, n_skip:]
    reps = {"X_candidate_expression_fused": (np.c_[_unit(adata.obsm["X_histoclip_expression"]), _unit(fused)],
                                             "[expression latent, fused latent], each at unit mean square")}
    if n_skip:
        reps["X_candidate_fused"] = (fused, "fused latent alone (the joint without its skip)")
        reps["X_candidate_half_skip"] = (np.c_[0.5 * skip, fused], "joint with the skip at half weight")
    out = {}
    for key, (value, description) in reps.items():
        adata.obsm[key] = value.astype(np.float32)
        out[key] = description
    return out
