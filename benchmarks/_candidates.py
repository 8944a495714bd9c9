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

    from _candidates import candidate_domains, seed_to_seed

    for description, labels, seconds in candidate_domains(adata, model, n_domains=k, seed=seed):
        ...

``seed_to_seed`` is the agreement between seeds the benchmarks report beside each ARI.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd

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


def candidate_domains(adata: ad.AnnData, model: hc.HistoCLIP, *, n_domains: int,
                      seed: int) -> Iterator[tuple[str, pd.Series, float]]:
    """Cluster each candidate of :func:`add_candidates` as the joint is clustered (no further smoothing).

    Yields ``(description, domains, seconds)`` per candidate; ``domains`` is a copy of ``obs["histoclip_domain"]``,
    which each clustering overwrites.
    """
    for key, description in add_candidates(adata, model).items():
        t = time.perf_counter()
        hc.tl.domains(adata, n_domains=n_domains, use_rep=key, n_hops=0, rng=seed)
        yield description, adata.obs["histoclip_domain"].copy(), time.perf_counter() - t


def seed_to_seed(labelings: Sequence[Sequence]) -> float:
    """Mean ARI between the domains of every pair of seeds (NaN with fewer than two)."""
    pairs = [hc.metrics.adjusted_rand(pd.Series(x), pd.Series(y)) for x, y in itertools.combinations(labelings, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")
