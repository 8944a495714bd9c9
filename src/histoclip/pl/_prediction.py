from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..pp._genes import expression_matrix
from ._utils import draw_slide, finish, get_ax, plot_image_key, resolve_for_plot

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _predicted_values(predicted: AnnData, genes: Sequence[str], layer: str | None) -> np.ndarray:
    missing = [g for g in genes if g not in predicted.var_names]
    if missing:
        raise KeyError(f"Genes {missing} are not among the predicted genes (e.g. {list(predicted.var_names[:5])}).")
    idx = predicted.var_names.get_indexer(list(genes))
    x = predicted.layers[layer] if layer is not None else predicted.X
    x = x[:, idx]
    return np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float64)


def predicted_expression(
    measured: AnnData | SpatialData,
    predicted: AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
    library_id: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    cmap: str = "viridis",
    save: str | Path | None = None,
) -> Figure:
    """Measured and predicted expression side by side over the H&E image, one row per gene.

    Both maps of a gene share one colour scale (the 1st-99th percentile of the measured and predicted values
    together), so a difference in colour is a difference in value. Measured expression is log-normalised
    (``log1p`` of counts per 10,000), the scale the predictions are on.

    Parameters
    ----------
    measured
        The section with counts (spots, image, scale factors): an AnnData, or a SpatialData object whose table
        ``table_key`` holds the counts.
    predicted
        The output of :func:`histoclip.tl.predict_expression` for the same spots (same ``obs_names``).
    genes
        Genes to show.
    layer
        Layer of ``predicted`` holding the predictions (default ``X``; use ``"histoclip_predicted"`` when the
        predictions were written into the query's layers).
    library_id, spot_diameter_um, table_key, image_key
        As in :func:`histoclip.pl.domains`.
    cmap
        Colour map.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`; each row carries the gene's Pearson r in its title.

    """
    genes = list(genes)
    if not genes:
        raise ValueError("Pass at least one gene.")
    spots = resolve_for_plot(measured, library_id=library_id, spot_diameter_um=spot_diameter_um, table_key=table_key,
                             image_key=plot_image_key(measured, table_key, image_key))
    table, slide = spots.adata, spots.slides[0]
    pos = predicted.obs_names.get_indexer(table.obs_names[slide.index])  # the slide's spots among the predictions
    keep = pos >= 0
    if not keep.any():
        raise ValueError("measured and predicted share no obs_names; predict for the measured section's spots.")
    meas = expression_matrix(table[slide.index[keep]], genes)
    pred = _predicted_values(predicted[pos[keep]], genes, layer)
    slide = replace(slide, index=np.arange(int(keep.sum())), coords=slide.coords[keep])
    from ..metrics import gene_pearson
    from ..pp._patches import _spot_um

    r = gene_pearson(meas, pred, genes)
    xy = slide.coords
    aspect = float(np.clip(np.ptp(xy[:, 1]) / max(np.ptp(xy[:, 0]), 1e-9), 0.4, 2.5)) if len(xy) > 1 else 1.0
    fig, axes = plt.subplots(len(genes), 2, figsize=(7.2, (2.9 * aspect + 0.6) * len(genes)), squeeze=False)
    for j, g in enumerate(genes):
        both = np.concatenate([meas[:, j], pred[:, j]])
        vmin, vmax = np.percentile(both, [1, 99])
        vmax = vmax if vmax > vmin else vmin + 1e-6
        for k, (vals, label) in enumerate(((meas[:, j], "measured"), (pred[:, j], "predicted"))):
            ax = axes[j, k]
            m = draw_slide(ax, slide, vals[slide.index], spot_diameter_um=_spot_um(spots, spot_diameter_um),
                           categorical=False, cmap=cmap, vmin=vmin, vmax=vmax, alpha=1.0)
            ax.set_title(f"{g}: {label}" + (f" (r = {r[g]:.2f})" if k == 1 else ""), fontsize=10)
        fig.colorbar(m, ax=axes[j, :].tolist(), shrink=0.8, label="log1p(CP10k)")
    finish(axes[0, 0], save)
    return fig


def gene_correlation(
    r: pd.Series | dict,
    *,
    threshold: float = 0.3,
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Distribution of per-gene Pearson r (from :func:`histoclip.metrics.gene_pearson`), with its mean and median.

    ``r`` may also be a dict of such Series (one per method or section): they are drawn as overlapping histograms.

    Returns
    -------
    The :class:`matplotlib.axes.Axes`.

    """
    series = {"r": pd.Series(r)} if isinstance(r, pd.Series) else {k: pd.Series(v) for k, v in dict(r).items()}
    if not series or all(s.empty for s in series.values()):
        raise ValueError("No correlations to plot.")
    ax = get_ax(ax, figsize=(5, 3.5))
    bins = np.linspace(-1, 1, 41)
    for name, s in series.items():
        ax.hist(s.to_numpy(), bins=bins, alpha=0.55, label=f"{name}: mean {s.mean():.3f}, median {s.median():.3f}, "
                f"{int((s > threshold).sum())}/{len(s)} > {threshold}")
    ax.axvline(threshold, color="0.3", ls="--", lw=1)
    ax.set_xlabel("Pearson r per gene (held-out spots)")
    ax.set_ylabel("genes")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    finish(ax, save)
    return ax
