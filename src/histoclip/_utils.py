"""Small helpers shared by every layer: seeds, parameter records, logged writes."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData

RNGLike = int | np.random.Generator | np.random.SeedSequence
MAX_SEED = 2**32 - 1


def resolve_seed(rng: RNGLike | None) -> int:
    """Turn ``rng`` (an int seed, a Generator or a SeedSequence) into one int seed to record."""
    if rng is None:
        return 0
    if isinstance(rng, bool):
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {rng!r}.")
    if isinstance(rng, int | np.integer):
        if not 0 <= rng <= MAX_SEED:
            raise ValueError(f"rng must be an int seed in [0, 2**32 - 1] (numpy, scikit-learn and torch all take it), "
                             f"got {rng}. Pass a smaller seed, or a numpy.random.Generator.")
        return int(rng)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**31 - 1))
    if isinstance(rng, np.random.SeedSequence):
        return int(rng.generate_state(1)[0] % (2**31 - 1))
    raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {type(rng).__name__}.")


def check_coordinates_spread(coords: np.ndarray, groups: np.ndarray | None = None) -> None:
    """Refuse spots whose coordinates cannot define neighbours: every spot of a library at one point."""
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.zeros(len(coords), dtype=int) if groups is None else np.asarray(groups)
    for g in dict.fromkeys(labels.tolist()):
        xy = coords[labels == g]
        if len(xy) > 1 and np.all(xy == xy[0]):
            where = "" if groups is None else f" of library {g!r}"
            raise ValueError(
                f"All {len(xy)} spots{where} sit at one point of obsm['spatial']: spatial neighbours (and spatial "
                "domains) cannot be defined. Set obsm['spatial'] to each spot's (x, y) in full-resolution pixels "
                "(e.g. from Space Ranger's tissue_positions file)."
            )


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back at once), for files made with ``mkstemp``."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def child_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent child seeds derived from ``seed`` with :class:`numpy.random.SeedSequence`."""
    return [int(s.generate_state(1)[0] % (2**31 - 1)) for s in np.random.SeedSequence(seed).spawn(n)]


def clean_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Make a parameter record h5ad-serialisable: no None, tuples to lists, paths to str."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            out[key] = clean_params(value)
        elif isinstance(value, Path):
            out[key] = str(value)
        elif isinstance(value, tuple | list):
            vals = [str(v) if isinstance(v, Path) else v for v in value if v is not None]
            out[key] = np.asarray(vals) if vals else np.asarray([], dtype=float)
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out


# entries histoclip reads and never writes: the user's coordinates, image and scale factors, and its own record
_NEVER_WRITTEN = {"obsm": {"spatial"}, "uns": {"spatial", "histoclip"}}


def fingerprint(value: Any, index: Any = None) -> str | None:
    """A content hash of a result, with the row names it is aligned to; None for values it cannot hash.

    Results are ``obs`` columns, ``obsm``/``layers`` arrays (dense or sparse) and DataFrames in ``uns``. The hash
    survives a round trip through ``.h5ad`` (a string column read back as categorical hashes the same).
    """
    import hashlib

    import pandas as pd
    import scipy.sparse as sp

    h = hashlib.sha1(usedforsecurity=False)
    if isinstance(value, pd.Series | pd.DataFrame):
        h.update(type(value).__name__.encode())
        if isinstance(value, pd.DataFrame):
            h.update(repr([str(c) for c in value.columns]).encode())
        h.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
        return h.hexdigest()
    if index is not None:
        h.update(pd.util.hash_array(np.asarray(index, dtype=object)).tobytes())
    parts = [value.data, value.indices, value.indptr] if sp.issparse(value) and value.format in ("csr", "csc") \
        else [value] if isinstance(value, np.ndarray) else None
    if parts is None:
        return None
    h.update(repr((value.shape, str(value.dtype), type(value).__name__)).encode())
    for part in parts:
        part = np.ascontiguousarray(part)
        h.update(pd.util.hash_array(part.ravel()).tobytes() if part.dtype.kind == "O" else memoryview(part).cast("B"))
    return h.hexdigest()


def _content(adata: AnnData, slot: str, key: str) -> str | None:
    value = getattr(adata, slot)[key]
    return fingerprint(value, None if slot == "uns" else adata.obs_names)


def _written_by_histoclip(adata: AnnData, slot: str, key: str) -> bool:
    """Whether an existing ``adata.<slot>[key]`` is histoclip's: a default name, or what histoclip wrote there.

    What histoclip wrote under a name of the user's choosing (``key_added``) is known by its content hash, kept in
    ``uns["histoclip"]["written"]``. A record in ``uns`` travels with the object (copied from another AnnData, or
    left after the user replaced the column), so it is never enough on its own: the column must still hold what
    histoclip wrote.
    """
    if key.startswith(("histoclip_", "X_histoclip")):
        return True
    root = adata.uns.get("histoclip")
    written = root.get("written", {}) if isinstance(root, Mapping) else {}
    stored = written.get(slot, {}) if isinstance(written, Mapping) else {}
    expected = stored.get(key) if isinstance(stored, Mapping) else None
    return isinstance(expected, str) and expected == _content(adata, slot, key)


def check_key_added(adata: AnnData, slot: str, key: str) -> None:
    """Refuse to write ``adata.<slot>[key]`` over data histoclip did not write (the user's coordinates, labels, ...).

    A key histoclip wrote before (a default name, or a ``key_added`` whose content is still what histoclip wrote,
    see :func:`_written_by_histoclip`) is replaced as usual.
    """
    if not isinstance(key, str) or not key:
        raise TypeError(f"key_added must be a non-empty string, got {key!r}.")
    what = f"adata.{slot}[{key!r}]"
    if key in _NEVER_WRITTEN.get(slot, ()):
        raise ValueError(f"key_added={key!r} would overwrite {what}, which histoclip reads (coordinates, images or its "
                         "own parameter record); choose another key_added.")
    if key in getattr(adata, slot) and not _written_by_histoclip(adata, slot, key):
        raise ValueError(
            f"key_added={key!r} would overwrite {what}, which histoclip did not write (it is your data, or it was "
            f"changed since histoclip wrote it). Choose another key_added, or delete it first (del {what}) if it is "
            "yours to replace."
        )


def write_results(
    adata: AnnData,
    *,
    obs: Mapping[str, Any] | None = None,
    obsm: Mapping[str, Any] | None = None,
    layers: Mapping[str, Any] | None = None,
    uns: Mapping[str, Any] | None = None,
    params: tuple[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """Write computed results into ``adata`` in one go, logging each key.

    Everything is computed before this is called, so an error earlier leaves ``adata`` untouched.
    ``params`` is ``(step, record)`` stored under ``adata.uns["histoclip"]["params"][step]``. Keys written under a
    name other than histoclip's defaults get a content hash in ``adata.uns["histoclip"]["written"][slot][key]``,
    so that a later run may replace them while they are unchanged (:func:`check_key_added`).
    """
    from ._constants import Key

    for slot, items in (("obs", obs), ("obsm", obsm), ("layers", layers), ("uns", uns)):
        for key in items or {}:
            check_key_added(adata, slot, key)  # all of them before anything is written
    written: list[str] = []
    for slot, items in (("obs", obs), ("obsm", obsm), ("layers", layers)):
        for key, value in (items or {}).items():
            getattr(adata, slot)[key] = value
            written.append(f"{slot}[{key!r}]")
    for key, value in (uns or {}).items():
        adata.uns[key] = value
        written.append(f"uns[{key!r}]")
    owned: dict[str, dict[str, str]] = {}
    for slot, items in (("obs", obs), ("obsm", obsm), ("layers", layers), ("uns", uns)):
        for key in items or {}:
            digest = None if key.startswith(("histoclip_", "X_histoclip")) else _content(adata, slot, key)
            if digest is not None:  # what histoclip wrote under the user's name: replaced again only while unchanged
                owned.setdefault(slot, {})[key] = digest
    if owned:
        store = adata.uns.setdefault(Key.uns.histoclip, {}).setdefault("written", {})
        for slot, digests in owned.items():
            store.setdefault(slot, {}).update(digests)
    if params is not None:
        step, record = params
        root = adata.uns.setdefault(Key.uns.histoclip, {})
        root.setdefault("params", {})[step] = clean_params(record)
        written.append(f"uns[{Key.uns.histoclip!r}]['params'][{step!r}]")
    for w in written:
        logger.info("    added %s", w)
    return written


@contextmanager
def timed(what: str):
    """Log the start and the end of a step with its elapsed time."""
    logger.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    logger.info("%s finished (%.1f s)", what, time.perf_counter() - t0)


def get_table(data: Any, table_key: str = "table") -> AnnData:
    """The AnnData a function reads and writes: ``data`` itself, or the table ``table_key`` of a SpatialData."""
    from anndata import AnnData

    if type(data).__name__ == "SpatialData" and hasattr(data, "tables"):
        from .io._slide import resolve_table_key

        table_key = resolve_table_key(data, table_key)  # Visium HD: the 8 um bins by default; 2 um refused
        if table_key not in data.tables:
            raise KeyError(
                f"SpatialData has no table {table_key!r}; tables: {list(data.tables.keys())}. Pass table_key=...."
            )
        return data.tables[table_key]
    if not isinstance(data, AnnData):
        raise TypeError(f"Expected an AnnData or a SpatialData object, got {type(data).__name__}.")
    return data


def is_spatialdata(data: Any) -> bool:
    """Whether ``data`` is a SpatialData object (checked without importing spatialdata)."""
    return type(data).__name__ == "SpatialData" and hasattr(data, "tables")


def categories_of(series) -> list[str]:
    """The labels of an ``obs`` column as strings: its categories in their order, else its sorted unique values."""
    import pandas as pd

    if isinstance(series.dtype, pd.CategoricalDtype):
        return [str(c) for c in series.cat.categories]
    return sorted({str(v) for v in series.dropna()})
