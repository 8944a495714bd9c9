"""Match cluster labels to a reference labelling (Hungarian matching on the contingency table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._utils import get_table, is_spatialdata, timed, write_results

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def hungarian_match(labels: pd.Series, reference: pd.Series) -> dict[str, str]:
    """Pair each label with at most one reference label, maximising the number of spots the pairs share.

    Spots where either labelling is missing are ignored. Labels left without a partner (more labels than
    reference labels, or no overlap with any free reference label) are absent from the result.
    """
    from scipy.optimize import linear_sum_assignment

    lab = labels.astype("string").to_numpy(dtype=object, na_value=None)
    ref = reference.astype("string").to_numpy(dtype=object, na_value=None)
    ok = np.array([a is not None and b is not None for a, b in zip(lab, ref, strict=True)], dtype=bool)
    table = pd.crosstab(pd.Series(lab[ok], name="label"), pd.Series(ref[ok], name="reference"))
    if table.empty:
        return {}
    rows, cols = linear_sum_assignment(table.to_numpy(), maximize=True)
    return {str(table.index[r]): str(table.columns[c]) for r, c in zip(rows, cols, strict=True)
            if table.iat[r, c] > 0}


def match_labels(
    data: AnnData | SpatialData,
    reference: str,
    *,
    key: str = Key.obs.domain,
    key_added: str | None = None,
    table_key: str = "table",
    copy: bool = False,
) -> AnnData | None:
    """Rename clusters after the reference labels they overlap most, one to one (Hungarian matching).

    Cluster numbers are arbitrary: domain ``"5"`` of one run is not layer ``"L6"``, and figures drawn side by side
    colour them alike only by accident. This pairs each cluster in ``obs[key]`` with at most one label in
    ``obs[reference]`` so that the pairs share as many spots as possible
    (:func:`scipy.optimize.linear_sum_assignment` on the contingency table; spots missing either label are
    ignored), and writes the clusters under their partner's name, with the reference's colours, so that
    ``hc.pl.domains(adata, color=key_added)`` beside ``hc.pl.domains(adata, color=reference)`` shares colours by
    meaning. Clusters without a partner (more clusters than reference labels) keep their name, marked
    ``" (unmatched)"``. The matching only renames: it never merges or splits clusters.
    To colour the clusters without renaming them, use ``hc.pl.domains(adata, reference=...)``.

    Parameters
    ----------
    data
        AnnData, or SpatialData (its table ``table_key`` is read and written).
    reference
        Categorical ``obs`` column with the reference labels (e.g. manual layers).
    key
        Categorical ``obs`` column with the clusters (:func:`histoclip.tl.domains` writes ``"histoclip_domain"``).
    key_added
        ``obs`` column to write (default ``f"{key}_matched"``).
    table_key
        SpatialData only: the table. Visium HD (``spatialdata_io.visium_hd``, one table per bin size): the 8 um bins
        ``"square_008um"`` unless another is named, e.g. ``"square_016um"``; 2 um bins are refused (see
        :doc:`/visium_hd`).
    copy
        Return a copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy. Sets

    - ``obs[key_added]``: categorical, the matched reference label of each spot's cluster (categories in the
      reference's order, then the unmatched clusters).
    - ``uns[f"{key_added}_colors"]``: the reference's colours for its labels (``uns[f"{reference}_colors"]`` when
      set, else the colours :func:`histoclip.pl.domains` gives the reference), then others for unmatched clusters.
    - ``uns["histoclip"]["params"]["match_labels"]``: ``key``, ``reference``, ``key_added`` and ``mapping``
      (cluster -> reference label).

    """
    if copy and is_spatialdata(data):
        raise ValueError("copy=True is only supported for AnnData input.")
    adata = get_table(data, table_key)
    for col, what in ((key, "run histoclip.tl.domains first or pass key="), (reference, "pass reference=")):
        if col not in adata.obs:
            raise KeyError(f"adata.obs[{col!r}] not found (columns: {list(adata.obs.columns)}); {what}.")
    if key == reference:
        raise ValueError(f"key and reference are the same column {key!r}; nothing to match.")
    key_added = f"{key}_matched" if key_added is None else key_added
    with timed("match_labels"):
        mapping = hungarian_match(adata.obs[key], adata.obs[reference])
        if not mapping:
            raise ValueError(f"obs[{key!r}] and obs[{reference!r}] share no labelled spot; nothing to match.")
        from .._utils import categories_of
        from ..pl._utils import palette

        ref_cats = categories_of(adata.obs[reference])
        ref_colors = palette(ref_cats, list(adata.uns.get(f"{reference}_colors", [])) or None)
        own = categories_of(adata.obs[key])
        unmatched = [c for c in own if c not in mapping]
        names = {c: mapping.get(c, f"{c} (unmatched)") for c in own}
        cats = ref_cats + [names[c] for c in unmatched]
        values = adata.obs[key].astype("string").map(names, na_action="ignore")
        column = pd.Categorical(values.to_numpy(dtype=object, na_value=np.nan), categories=cats)
        extra = _extra_colors(len(unmatched), used=list(ref_colors.values()))
        colors = [_hex(ref_colors[c]) for c in ref_cats] + extra
    target = adata.copy() if copy else adata
    params = {"key": key, "reference": reference, "key_added": key_added, "mapping": mapping}
    write_results(target, obs={key_added: pd.Series(column, index=adata.obs_names)},
                  uns={f"{key_added}_colors": np.asarray(colors, dtype=object)}, params=("match_labels", params))
    return target if copy else None


def _hex(color) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color, keep_alpha=False)


def _extra_colors(n: int, used: list) -> list[str]:
    """``n`` colours not among ``used`` (tab20, then greys)."""
    import matplotlib.pyplot as plt

    taken = {_hex(c) for c in used}
    pool = [_hex(c) for c in plt.get_cmap("tab20").colors if _hex(c) not in taken]
    pool += [_hex(str(g)) for g in np.linspace(0.25, 0.75, max(n, 1))]
    return pool[:n]
