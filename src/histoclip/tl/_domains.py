from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Key
from .._settings import logger
from .._utils import RNGLike, check_coordinates_spread, resolve_seed, timed, write_results
from ..io._slide import resolve
from ..pp._genes import fit_rows
from ..pp._graph import MAX_NEIGHBORS, knn_graph, physical_hops, radius_graph, smooth_features, spot_coords_um

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def refine_labels(labels: np.ndarray, graph: sp.spmatrix) -> np.ndarray:
    """Majority vote: each spot takes the most common label among itself and its graph neighbours."""
    codes, uniq = pd.factorize(pd.Series(labels))
    onehot = sp.csr_matrix((np.ones(codes.size), (np.arange(codes.size), codes)), shape=(codes.size, uniq.size))
    a = sp.csr_matrix(graph, dtype=np.float64) + sp.identity(codes.size, format="csr")
    votes = (a @ onehot).toarray()
    votes[np.arange(codes.size), codes] += 0.5  # ties keep the spot's own label
    return np.asarray(uniq)[votes.argmax(axis=1)]


def _leiden_n(x: np.ndarray, n_domains: int, seed: int) -> tuple[np.ndarray, float]:
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(np.zeros((x.shape[0], 1), dtype=np.float32))
    tmp.obsm["X"] = x
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=15, random_state=seed)
    lo, hi = 0.01, 3.0
    best, best_res = None, None
    for _ in range(30):
        res = (lo + hi) / 2
        sc.tl.leiden(tmp, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        k = tmp.obs["leiden"].nunique()
        if best is None or abs(k - n_domains) < abs(best.nunique() - n_domains):
            best, best_res = tmp.obs["leiden"].copy(), res
        if k == n_domains:
            break
        if k < n_domains:
            lo = res
        else:
            hi = res
    if best.nunique() != n_domains:
        logger.warning("leiden: no resolution gave exactly %d domains; closest %d at resolution %.3f",
                       n_domains, best.nunique(), best_res)
    return best.astype(str).to_numpy(), float(best_res)


def cluster(
    x: np.ndarray,
    n_domains: int,
    method: str,
    seed: int,
    covariance_type: str = "tied",
    n_init: int = 20,
    *,
    _model: bool = False,
) -> tuple[np.ndarray, dict]:
    """Cluster rows of ``x`` into ``n_domains`` groups; returns string labels and extra parameters.

    Above :data:`~histoclip.pp._genes.FIT_SAMPLE` rows the clustering is fitted on a seeded sample of that many and
    every row is then assigned (``predict`` of the mixture or k-means; for leiden, the majority of the 15 nearest
    sampled rows); ``extra["fit_sample"]`` records the sample size. Below it, nothing changes.
    """
    if method not in ("gmm", "kmeans", "leiden"):
        raise ValueError(f"method must be 'gmm', 'leiden' or 'kmeans', got {method!r}.")
    rows = fit_rows(x.shape[0], seed)
    if rows is not None:  # large N (Visium HD): fit on a seeded sample, then assign every spot
        logger.info("domains: %s fitted on a sample of %d of %d spots, then every spot assigned.", method,
                    rows.size, x.shape[0])
        labels, extra = cluster(x[rows], n_domains, method, seed, covariance_type, n_init, _model=True)
        return _assign(x, rows, labels, extra.pop("_model")), {**extra, "fit_sample": int(rows.size)}
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(n_domains, covariance_type=covariance_type, n_init=n_init, random_state=seed,
                             reg_covar=1e-4, max_iter=300)
        labels = gm.fit_predict(x)
        return labels.astype(str), {"covariance_type": covariance_type, "n_init": n_init, **_kept(_model, gm)}
    if method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_domains, n_init=10, random_state=seed)
        labels = km.fit_predict(x)
        return labels.astype(str), _kept(_model, km)
    labels, res = _leiden_n(x, n_domains, seed)
    return labels, {"resolution": res, **_kept(_model, None)}


def _kept(keep: bool, model) -> dict:
    return {"_model": model} if keep else {}


def _assign(x: np.ndarray, rows: np.ndarray, labels: np.ndarray, model, chunk: int = 200_000) -> np.ndarray:
    """Labels of every row of ``x`` from a clustering fitted on ``x[rows]``.

    The mixture's or k-means' ``predict`` (in chunks), or for leiden the majority label of the 15 nearest sampled
    spots.
    """
    out = np.empty(x.shape[0], dtype=labels.dtype)
    if model is None:
        from sklearn.neighbors import KNeighborsClassifier

        model = KNeighborsClassifier(n_neighbors=min(15, rows.size)).fit(x[rows], labels)
        for a in range(0, x.shape[0], chunk):
            out[a:a + chunk] = model.predict(x[a:a + chunk])
        out[rows] = labels  # the sampled spots keep their own label
        return out
    for a in range(0, x.shape[0], chunk):
        out[a:a + chunk] = model.predict(x[a:a + chunk]).astype(str)
    return out


def center_by_group(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Subtract each group's (section's) column means: a shift shared by a whole section is removed."""
    x = np.array(x, dtype=np.float32, copy=True)
    for g in np.unique(groups):
        rows = groups == g
        x[rows] -= x[rows].mean(axis=0)
    return x


def expression_pca(
    counts,
    var_names,
    coords: np.ndarray,
    groups: np.ndarray,
    *,
    n_genes: int,
    n_pcs: int,
    seed: int,
    center: bool = False,
) -> np.ndarray:
    """PCA of the log-normalised expression of the ``n_genes`` genes with the highest Moran's I (no model needed).

    ``counts`` (spots x genes) with spot centres ``coords`` and one group (library) label per spot: the Moran's I
    graph stays within each group, and ``center`` subtracts each group's mean expression before the PCA. The PCA is
    exact (eigenvectors of the gene covariance), so the result does not depend on the seed. Above
    :data:`~histoclip.pp._genes.FIT_SAMPLE` spots (Visium HD bins) genes are ranked and the axes fitted on a sample
    of that many (drawn with ``seed``), then every spot is projected in chunks: no dense spots x genes matrix.
    """
    import anndata as ad
    from sklearn.decomposition import PCA

    from ..pp._genes import expression_matrix, select_genes

    groups = np.asarray(groups).astype(str)
    rows = fit_rows(counts.shape[0], seed)
    if rows is not None:  # large N (Visium HD): never a dense spots x genes matrix
        return _expression_pca_sampled(counts, var_names, coords, groups, rows, n_genes=n_genes, n_pcs=n_pcs,
                                       seed=seed, center=center)
    tmp = ad.AnnData(counts, var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
    tmp.obsm["spatial"] = coords
    lib = None
    if np.unique(groups).size > 1:
        tmp.obs["_hc_library"] = groups
        lib = "_hc_library"
    genes = select_genes(tmp, n_genes, library_key=lib)
    x = expression_matrix(tmp, genes)
    if center and lib is not None:
        x = center_by_group(x, groups)
    n = min(n_pcs, x.shape[1], x.shape[0] - 1)
    solver = "covariance_eigh" if x.shape[1] <= 5000 else "randomized"
    return PCA(n, svd_solver=solver, random_state=seed).fit_transform(x).astype(np.float32)


_CHUNK = 50_000  # spots densified at a time (for the kept genes only) when projecting a large slide


def _expression_pca_sampled(counts, var_names, coords, groups, rows, *, n_genes, n_pcs, seed, center) -> np.ndarray:
    """:func:`expression_pca` with genes ranked and principal axes fitted on ``rows``, then every spot projected.

    Each chunk of spots is log-normalised (by its totals over all genes), densified for the kept genes only, centred
    (each group's mean over all its spots, with ``center``) and projected; memory is the sample's and one chunk's.
    """
    import anndata as ad
    from sklearn.decomposition import PCA

    from ..pp._genes import LogExpression, select_genes

    logger.info("expression PCA: genes and axes fitted on a sample of %d of %d spots, then every spot projected.",
                rows.size, counts.shape[0])
    var = pd.DataFrame(index=pd.Index(var_names).astype(str))
    sample = ad.AnnData(counts[rows], var=var)
    sample.obsm["spatial"] = coords[rows]
    lib = None
    if np.unique(groups).size > 1:
        sample.obs["_hc_library"] = groups[rows]
        lib = "_hc_library"
    genes = select_genes(sample, n_genes, library_key=lib)
    # the counts are shared, not copied, when they already are CSR float32; zero-count spots are kept (and warned of)
    log = LogExpression(ad.AnnData(counts, var=var), genes)

    def dense(block: sp.csr_matrix) -> np.ndarray:
        return np.asarray(block.toarray(), dtype=np.float32)

    means = None
    if center and lib is not None:  # exact per-group means over all spots, accumulated chunk by chunk
        codes, uniq = pd.factorize(pd.Series(groups))
        sums = np.zeros((uniq.size, len(genes)), dtype=np.float64)
        for a, block in log.chunks(_CHUNK):
            c = codes[a:a + block.shape[0]]
            sums += sp.csr_matrix((np.ones(c.size), (c, np.arange(c.size))), shape=(uniq.size, c.size)) @ dense(block)
        means = (sums / np.bincount(codes, minlength=uniq.size)[:, None]).astype(np.float32)
    fit = dense(log.rows(rows))
    if means is not None:
        fit -= means[codes[rows]]
    n = min(n_pcs, fit.shape[1], fit.shape[0] - 1)
    pca = PCA(n, svd_solver="covariance_eigh" if fit.shape[1] <= 5000 else "randomized", random_state=seed).fit(fit)
    del fit
    out = np.empty((log.n_obs, n), dtype=np.float32)
    for a, block in log.chunks(_CHUNK):
        z = dense(block)
        if means is not None:
            z -= means[codes[a:a + z.shape[0]]]
        out[a:a + z.shape[0]] = pca.transform(z)
    return out


def _relabel(labels: np.ndarray) -> pd.Categorical:
    """Categories "0", "1", ... ordered by decreasing domain size (like leiden)."""
    counts = pd.Series(labels).value_counts()
    mapping = {old: str(i) for i, old in enumerate(counts.index)}
    new = np.array([mapping[v] for v in labels])
    return pd.Categorical(new, categories=[str(i) for i in range(len(counts))])


def domains(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    n_domains: int = 7,
    method: Literal["gmm", "leiden", "kmeans"] = "gmm",
    use_rep: str | None = None,
    n_genes: int = 2000,
    layer: str | None = None,
    radius_um: float | None = 150.0,
    n_hops: int | None = None,
    n_neighbors: int | None = None,
    n_pcs: int | None = 10,
    spot_diameter_um: float | None = None,
    refine: bool = False,
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "tied",
    n_init: int = 50,
    library_key: str | None = None,
    batch_correction: Literal["center"] | None = "center",
    table_key: str = "table",
    key_added: str = Key.obs.domain,
    rng: RNGLike = 0,
    copy: bool = False,
) -> AnnData | list[AnnData] | None:
    """Find spatial domains by clustering a spatially smoothed representation of the spots.

    The representation, by default (``use_rep=None``): histoclip's joint embedding ``obsm["X_histoclip"]`` when
    :func:`histoclip.tl.embed` wrote one (on every section), else the model-free expression PCA: the PCA (``n_pcs``
    components) of the log-normalised expression of the ``n_genes`` genes with the highest Moran's I, which needs no
    model. The joint embedding holds that same smoothed PCA beside what the model learned (its expression skip), so
    it keeps what the model-free path sees (``benchmarks/domains.py``; the docs' benchmarks page). Which one was used
    is logged and recorded in ``uns["histoclip"]["params"]["domains"]["use_rep"]``; ``use_rep="expression_pca"``
    asks for the model-free path.

    Steps: the representation is averaged ``n_hops`` times over each spot's neighbours within ``radius_um`` microns
    (or its ``n_neighbors`` nearest spots; a sparse graph within each library), reduced to ``n_pcs`` principal
    components, clustered (Gaussian mixture: pure Python, no R; leiden with a resolution search that reaches
    ``n_domains``; or k-means), then optionally refined by a majority vote over each spot's neighbours. histoclip's
    joint and expression embeddings already carry each spot's neighbourhood (the model's ``context_um``), so by
    default they are not smoothed again; the expression PCA and other representations are (2 hops).

    **Several sections** (an AnnData with ``library_key``, a SpatialData whose table annotates several regions, or a
    list of AnnData/SpatialData objects, one per section) are clustered together, so a domain label means the same
    tissue on every
    section. Spatial graphs never link sections; genes are ranked by Moran's I averaged over sections; and with
    ``batch_correction="center"`` each section's mean is subtracted from the representation first (the expression
    of the selected genes, or ``obsm[use_rep]``), which removes a shift shared by a whole section (sequencing depth,
    chemistry, a gene measured more or less efficiently). Centering assumes the sections hold broadly the same tissue
    types; it slightly shifts a section that lacks one of them (``benchmarks/domains.py --pooled`` measures both).

    Parameters
    ----------
    data
        AnnData or SpatialData (the table), or a list of them (one section each; they need the same genes for the
        expression PCA, or the same ``obsm[use_rep]`` width).
    n_domains
        Number of domains.
    method
        ``"gmm"``, ``"leiden"`` or ``"kmeans"``.
    use_rep
        Embedding in ``obsm`` to cluster (e.g. ``"X_histoclip"``, ``"X_histoclip_expression"``, ``"X_pca"``);
        ``"expression_pca"`` for the model-free expression PCA described above (needs counts); ``None``: the joint
        embedding of :func:`histoclip.tl.embed` when there is one, else the expression PCA.
    n_genes, layer
        Expression PCA only: genes kept by Moran's I, and the layer holding raw counts (default ``X``).
    radius_um
        Neighbourhood of the smoothing, in microns: every spot within this distance (at most 24, the nearest) counts
        as a neighbour. 150 um takes the first ring of Visium's hexagon (100 um spacing), the same neighbours as
        6 nearest spots, and no neighbour on legacy ST (200 um spacing), whose spots are far enough apart that
        averaging them blurs domains; microns come from the scale factors (see ``spot_diameter_um``). ``None`` or 0:
        no smoothing.
    n_hops
        Rounds of neighbour averaging before clustering (0: none). ``None``: 0 for histoclip's joint or expression
        embedding of a model trained with spatial context (the embedding already averages the neighbourhood, and the
        joint's expression skip is smoothed like the model-free PCA), else 2; where the 24-neighbour cap keeps the
        graph inside ``radius_um`` (Visium HD bins), as many as spread as far as 2 hops over the full radius
        (:func:`~histoclip.pp._graph.physical_hops`: about 88 for 8 um bins, 22 for 16 um bins; logged and recorded).
    n_neighbors
        Use the ``n_neighbors`` nearest spots instead of ``radius_um`` (grid-counted, the setting of earlier
        versions).
    n_pcs
        Principal components kept after smoothing (``None``: no PCA).
    spot_diameter_um
        Microns spanned by ``scalefactors["spot_diameter_fullres"]``, which sets the microns of ``radius_um``
        (default: the scale :func:`histoclip.pp.extract_patches` recorded, else ``uns["spatial"][library_id]
        ["metadata"]["spot_diameter_um"]``, else the platform inferred from the spot lattice and logged: Visium's
        65 um on a hexagonal grid, legacy ST's 200 um spacing on a square one; see
        :func:`histoclip.pp.extract_patches`). Without ``uns["spatial"]``, the microns come from the lattice alone.
    refine
        Majority vote of each spot with its spatial neighbours after clustering: the spots within ``radius_um``
        (none on legacy ST at 150 um, so nothing changes there), the ``n_neighbors`` nearest when given, and the 6
        nearest when ``radius_um`` is ``None`` or 0.
    covariance_type
        Gaussian mixture covariance; ``"tied"`` (one covariance shared by all domains) is mclust's EEE model, the
        one GraphST and STAGATE use through R.
    n_init
        Gaussian mixture restarts (k-means initialisations); the best likelihood is kept. Many restarts make the
        result stable across seeds: on two pooled DLPFC sections 20 restarts still gave seed-dependent optima
        (ARI 0.584 +- 0.020 over seeds 0-4), 50 gave one (0.594 +- 0.000).
    library_key
        Column of ``obs`` with each spot's library (section); every library is one section.
    batch_correction
        With several sections: ``"center"`` subtracts each section's mean representation before smoothing;
        ``None`` pools the sections as they are.
    table_key
        SpatialData only: the table. Visium HD (``spatialdata_io.visium_hd``, one table per bin size): the 8 um bins
        ``"square_008um"`` unless another is named, e.g. ``"square_016um"``; 2 um bins are refused (see
        :doc:`/visium_hd`).
    key_added
        Column of ``obs`` to write.
    rng
        Seed of the clustering.
    copy
        Return a copy (a list of copies for a list) instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy (a list for a list). Sets, on each section's table

    - ``obs["histoclip_domain"]``: categorical of strings ``"0"``, ``"1"``, ..., ordered by decreasing size over all
      sections, with the same categories on every table of a list.
    - ``uns["histoclip"]["params"]["domains"]``: every parameter, the seed, the sections clustered together and the
      platform inferred for each (``"platform"``).

    """
    from .._utils import is_spatialdata

    seed = resolve_seed(rng)
    is_list = isinstance(data, list | tuple)
    items = list(data) if is_list else [data]
    if not items:
        raise ValueError("data is an empty list; pass an AnnData, a SpatialData or a list of them.")
    if copy and any(is_spatialdata(d) for d in items):
        raise ValueError("copy=True is only supported for AnnData input.")
    model_free = use_rep == "expression_pca"  # asked for by name (also the name recorded in params)
    if model_free:
        use_rep = None
    if radius_um is not None and (isinstance(radius_um, str) or not np.isfinite(radius_um) or radius_um < 0):
        raise ValueError(f"radius_um must be a non-negative number of microns (or None), got {radius_um!r}.")
    if n_hops is not None and (isinstance(n_hops, bool) or not isinstance(n_hops, int | np.integer) or n_hops < 0):
        raise ValueError(f"n_hops must be a non-negative integer or None (chosen for the representation), got "
                         f"{n_hops!r}.")
    if batch_correction not in ("center", None):
        raise ValueError(f"batch_correction must be 'center' or None, got {batch_correction!r}.")
    if not isinstance(n_domains, int | np.integer) or n_domains < 2:
        raise ValueError(f"n_domains must be an integer >= 2, got {n_domains!r}.")
    if method not in ("gmm", "leiden", "kmeans"):
        raise ValueError(f"method must be 'gmm', 'leiden' or 'kmeans', got {method!r}.")
    grid = n_neighbors is not None
    n_neighbors = 6 if n_neighbors is None else int(n_neighbors)
    all_spots = [_resolve_sections(d, library_key, table_key, spot_diameter_um) for d in items]
    tables = [s.adata for s in all_spots]
    if use_rep is None and not model_free:
        use_rep = _embedded_joint(tables)
    hops_given = n_hops
    if n_hops is None:
        n_hops = 0 if use_rep is not None and all(_has_context(t, use_rep) for t in tables) else 2
    for i, adata in enumerate(tables):
        where = f"the table of data[{i}]" if is_list else "adata"
        if use_rep is not None and use_rep not in adata.obsm:
            raise KeyError(
                f"{where}.obsm[{use_rep!r}] not found (obsm has {list(adata.obsm.keys())}); run "
                "histoclip.tl.embed(data, model) first, or pass use_rep= naming an existing embedding (None: the "
                "expression PCA)."
            )
    n_total = sum(t.n_obs for t in tables)
    if n_total < 2 * n_domains:
        raise ValueError(
            f"n_domains={n_domains} needs at least {2 * n_domains} spots (two per domain), got {n_total}: with as "
            "many domains as spots the clustering collapses (e.g. into one domain). Use fewer domains or more spots."
        )
    # one group per section: the libraries of each table, prefixed by the table's position for a list
    groups = np.concatenate([
        np.array([f"{i}:{lib}" for lib in s.library_labels()], dtype=object) if is_list else s.library_labels()
        for i, s in enumerate(all_spots)
    ]).astype(str)
    coords = np.concatenate([s.coords() for s in all_spots])
    check_coordinates_spread(coords, groups)
    section_names = list(dict.fromkeys(groups))
    center = batch_correction == "center" and len(section_names) > 1
    if use_rep is None:
        counts, var_names = _pooled_counts(tables, layer, is_list)
        x = expression_pca(counts, var_names, coords, groups, n_genes=n_genes, n_pcs=n_pcs or 10, seed=seed,
                           center=center)
    else:
        widths = {t.obsm[use_rep].shape[1] for t in tables}
        if len(widths) > 1:
            raise ValueError(f"obsm[{use_rep!r}] has different widths {sorted(widths)} across the sections; embed "
                             "every section with the same model (histoclip.tl.embed) first.")
        x = np.concatenate([np.asarray(t.obsm[use_rep], dtype=np.float32) for t in tables])
        if not np.isfinite(x).all():
            raise ValueError(f"adata.obsm[{use_rep!r}] has NaN or inf values.")
        if center:
            x = center_by_group(x, groups)
    with timed("domains"):
        smooth = n_hops > 0 and (grid or bool(radius_um))
        graph = None
        if smooth or refine:  # built only when used (not for an embedding clustered as it is)
            if grid or not radius_um:
                graph = knn_graph(coords, n_neighbors, groups)
            else:  # the same neighbours in microns for the smoothing and the refinement
                um = np.concatenate([spot_coords_um(s) for s in all_spots])
                graph = radius_graph(um, float(radius_um), groups)
                if smooth and hops_given is None:  # capped graph (Visium HD bins): hops that reach radius_um
                    hops = physical_hops(graph, um, float(radius_um), n_hops)
                    if hops != n_hops:
                        logger.info("domains: %d neighbours reach less than %g um here (bins); %d rounds of averaging "
                                    "instead of %d spread as far.", MAX_NEIGHBORS, radius_um, hops, n_hops)
                    n_hops = hops
        if smooth:
            x = smooth_features(x, graph, n_hops)
        if use_rep is not None and n_pcs is not None and x.shape[1] > n_pcs:
            from sklearn.decomposition import PCA

            x = PCA(n_pcs, random_state=seed).fit_transform(x).astype(np.float32)
        labels, extra = cluster(x, int(n_domains), method, seed, covariance_type, n_init)
        if refine:
            labels = refine_labels(labels, graph)
        cats = _relabel(labels)
    # n_neighbors is recorded only when given, so a rerun from the record takes the same path
    smoothing = {"n_hops": n_hops, "n_neighbors": n_neighbors} if grid else {"n_hops": n_hops,
                                                                            "radius_um": radius_um or 0.0}
    params = {"n_domains": int(n_domains), "method": method, "use_rep": use_rep or "expression_pca", **smoothing,
              "n_pcs": n_pcs, "refine": refine, "n_init": n_init, "library_key": library_key,
              "batch_correction": batch_correction, "sections": section_names,
              "seed": seed, "key_added": key_added, **extra,
              "platform": {(f"{i}:" if is_list else "") + sl.library_id: sl.platform  # inferred: io/_platform.py
                           for i, s in enumerate(all_spots) for sl in s.slides}}
    if use_rep is None:
        params.update({"n_genes": n_genes, "layer": layer})
    if method != "gmm":
        params.pop("covariance_type", None)
    else:
        params["covariance_type"] = covariance_type
    targets = [t.copy() if copy else t for t in tables]
    start = 0
    for t in targets:
        part = pd.Categorical(np.asarray(cats)[start:start + t.n_obs], categories=cats.categories)
        start += t.n_obs
        write_results(t, obs={key_added: part}, params=("domains", params))
    if copy:
        return targets if is_list else targets[0]
    return None


def _embed_record(adata: AnnData) -> dict:
    """The parameters :func:`histoclip.tl.embed` recorded on ``adata`` (an empty dict when there are none)."""
    rec = adata.uns.get(Key.uns.histoclip, {}).get("params", {}).get("embed", {})
    return rec if isinstance(rec, dict) else {}


def _embedded_joint(tables: list) -> str | None:
    """The joint embedding :func:`histoclip.tl.embed` wrote on every table, or ``None`` (then: the expression PCA).

    A table counts when its ``embed`` record names the key it wrote (``modality="all"``) and that key is in ``obsm``
    with one row per spot; with several tables, all of them must hold the same key.
    """
    keys = set()
    for t in tables:
        rec = _embed_record(t)
        key = rec.get("key_added")
        if rec.get("modality", "all") != "all" or not isinstance(key, str) or key not in t.obsm:
            keys.add(None)
        else:
            keys.add(key)
    if len(keys) != 1 or None in keys:
        if keys - {None}:
            logger.warning("domains: only some sections hold a joint embedding from tl.embed; clustering the "
                           "model-free expression PCA. Embed every section with the same model to cluster the joint.")
        logger.info("domains: no joint embedding from histoclip.tl.embed; clustering the model-free expression PCA")
        return None
    key = keys.pop()
    logger.info("domains: clustering the joint embedding obsm[%r] written by histoclip.tl.embed "
                "(use_rep='expression_pca' for the model-free path)", key)
    return key


def _has_context(adata: AnnData, use_rep: str) -> bool:
    """Whether ``obsm[use_rep]`` is a histoclip joint or expression embedding of a model with spatial context.

    Such an embedding already averages each spot's neighbourhood (the model's ``context_um``) and was trained to agree
    with its neighbours', so smoothing it again blurs thin domains (DLPFC 151673 / 151674, seeds 0-4: ARI 0.587 / 0.598
    without, 0.583 / 0.572 with two hops).
    """
    rec = _embed_record(adata)
    key = rec.get("key_added")
    return bool(rec.get("spatial_context", False)) and key is not None and use_rep in (key, f"{key}_expression")


def _resolve_sections(data, library_key: str | None, table_key: str, spot_diameter_um: float | None):
    """The table and its sections: the libraries of an AnnData, or every region of a SpatialData table."""
    from .._utils import get_table, is_spatialdata
    from ..io._slide import SpotData, resolve_regions, several_regions_key

    if is_spatialdata(data):
        table = get_table(data, table_key)
        region_key = several_regions_key(table)
        if region_key is not None:  # one table over several regions: each region is a section (no image needed)
            regions = [str(r) for r in pd.unique(table.obs[region_key].astype(str))]
            slides = resolve_regions(data, table_key, regions, spot_diameter_um=spot_diameter_um)
            return SpotData(table, slides, None, source="spatialdata")
    return resolve(data, library_key=library_key, table_key=table_key, spot_diameter_um=spot_diameter_um,
                   need_image=False)


def _pooled_counts(tables: list, layer: str | None, is_list: bool):
    """The counts of every table stacked (spots x genes common to all tables) and the genes' names."""
    from ..io._slide import check_counts_table
    from ..pp._genes import counts_matrix

    for i, t in enumerate(tables):  # every table before any is read
        check_counts_table(t, layer, f"the table of data[{i}]" if is_list else "adata")
    names = pd.Index(tables[0].var_names)
    for t in tables[1:]:
        names = names.intersection(t.var_names, sort=False)
    if len(names) == 0:
        raise ValueError("The sections share no gene names (var_names); the expression PCA needs common genes.")
    dropped = sum(t.n_vars for t in tables) - len(names) * len(tables)
    if dropped:
        logger.warning("domains: %d genes are not measured on every section and are left out; %d common genes kept.",
                       dropped, len(names))
    mats = []
    for t in tables:
        x = counts_matrix(t, layer)
        idx = t.var_names.get_indexer(names)
        mats.append(x[:, idx] if len(tables) > 1 else x)  # counts_matrix gives CSR
    return (sp.vstack(mats, format="csr") if len(mats) > 1 else mats[0]), names
