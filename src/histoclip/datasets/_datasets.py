from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._utils import RNGLike, resolve_seed

DLPFC_SECTIONS = ("151673", "151674")


def dlpfc(section: str = "151673") -> AnnData:
    """Human DLPFC 10x Visium section 151673 or 151674 (Maynard et al. 2021, donor 3), bundled with the package.

    151673: 3639 spots, 151674: 3673 spots; 5000 genes each (raw UMI counts in ``X``; the source kept a different
    5000 per section, 2340 of them shared, and pooled analyses use the shared ones), the lowres H&E image and scale
    factors in ``uns["spatial"][section]``, spot centres in ``obsm["spatial"]`` (full-resolution pixels), and the
    manual cortical layers (L1-L6, WM; about 30 spots unlabelled) in ``obs["layer"]``: the standard spatial-domain
    benchmark. The two are neighbouring sections of one donor (10 um apart), bundled so that several sections can be
    analysed together offline (``hc.tl.domains([a, b])``).
    The image is the 600 x 600 px lowres one (a spot is about 4 pixels), so morphology is a weak signal here.
    squidpy's plots look for a ``hires`` image by default: pass ``img_res_key="lowres"``, e.g.
    ``sq.pl.spatial_scatter(adata, color="histoclip_domain", img_res_key="lowres")``.

    Parameters
    ----------
    section
        ``"151673"`` or ``"151674"``.

    Returns
    -------
    A new AnnData each call.

    """
    if str(section) not in DLPFC_SECTIONS:
        raise ValueError(f"section must be one of {DLPFC_SECTIONS} (the bundled DLPFC sections), got {section!r}.")
    path = files("histoclip.datasets") / "_data" / f"dlpfc_{section}.h5ad"
    return ad.read_h5ad(str(path))


def visium_toy() -> Path:
    """A small real Space Ranger output folder (10x Visium, 100 spots x 100 genes), bundled with the package.

    The folder holds ``filtered_feature_bc_matrix.h5`` and ``spatial/`` (``tissue_positions_list.csv``,
    ``scalefactors_json.json``, ``tissue_hires_image.png``, ``tissue_lowres_image.png``), the layout
    ``spatialdata_io.visium``, ``scanpy.read_visium`` and ``squidpy.read.visium`` read, so tutorials and tests can
    show reading a Space Ranger folder without a download. It is scanpy's test data (scanpy 1.11.5,
    ``tests/_data/visium_data/1.0.0``, BSD-3-Clause). Its ``hires`` image is a blank placeholder: cut patches from
    the ``lowres`` one (``image_key="<dataset_id>_lowres_image"``).

    Returns
    -------
    The path of the folder (inside the installed package: read it, do not write into it).

    Examples
    --------
    >>> import spatialdata_io
    >>> sdata = spatialdata_io.visium(hc.datasets.visium_toy(), dataset_id="toy")  # doctest: +SKIP

    """
    path = Path(str(files("histoclip.datasets") / "_data" / "visium_toy"))
    if not (path / "filtered_feature_bc_matrix.h5").is_file():
        raise FileNotFoundError(f"The bundled Space Ranger folder is missing from {path}; reinstall histoclip.")
    return path


def toy(
    n_rows: int = 16,
    n_cols: int = 16,
    n_genes: int = 60,
    n_domains: int = 3,
    *,
    image_dtype: str = "uint8",
    rng: RNGLike = 0,
) -> AnnData:
    """A small seeded synthetic Visium-like slide for tests and quick trials.

    Spots sit on a hexagonal grid (100 px apart, 55 px = 55 um across in full resolution). The tissue is cut
    into ``n_domains`` vertical bands; each band raises its own block of marker genes (Poisson counts) and has its
    own colour and texture in a ``hires`` image (scale factor 0.2).

    Parameters
    ----------
    n_rows, n_cols
        Size of the spot grid.
    n_genes
        Number of genes (named ``gene_0``, ...).
    n_domains
        Number of bands (true labels in ``obs["domain"]``).
    image_dtype
        dtype of the image: ``"uint8"``, ``"uint16"`` or ``"float32"`` (in [0, 1]).
    rng
        Seed.

    Returns
    -------
    AnnData with counts in ``X``, ``obsm["spatial"]``, ``uns["spatial"]["toy"]`` and ``obs["domain"]``.

    """
    seed = resolve_seed(rng)
    gen = np.random.default_rng(seed)
    spacing = 100.0
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = (cols.ravel() + 0.5 * (rows.ravel() % 2) + 1.0) * spacing
    y = (rows.ravel() * np.sqrt(3) / 2 + 1.0) * spacing
    n = x.size
    width_full = (n_cols + 2) * spacing
    height_full = (n_rows * np.sqrt(3) / 2 + 2) * spacing
    band = np.minimum((x - spacing) / (width_full - 2 * spacing) * n_domains, n_domains - 1).astype(int)
    block = max(1, n_genes // (2 * n_domains))
    rate = np.full((n, n_genes), 0.5)
    for d in range(n_domains):
        rate[np.ix_(band == d, np.arange(d * block, (d + 1) * block))] += 6.0
    size = gen.uniform(0.6, 1.4, size=(n, 1))
    counts = gen.poisson(rate * size).astype(np.float32)

    scalef = 0.2
    h, w = int(np.ceil(height_full * scalef)), int(np.ceil(width_full * scalef))
    yy, xx = np.mgrid[0:h, 0:w]
    img_band = np.clip(((xx / scalef) - spacing) / (width_full - 2 * spacing) * n_domains, 0, n_domains - 0.001)
    img_band = img_band.astype(int)
    base = np.array([[0.85, 0.55, 0.75], [0.55, 0.35, 0.70], [0.95, 0.75, 0.80], [0.70, 0.45, 0.55],
                     [0.60, 0.60, 0.85]])
    img = base[img_band % len(base)]
    freq = 0.3 + 0.25 * img_band
    texture = 0.08 * np.sin(freq * xx)[..., None] * np.cos(freq * yy)[..., None]
    img = np.clip(img + texture + gen.normal(0, 0.03, size=img.shape), 0, 1)
    if image_dtype == "uint8":
        image = np.round(img * 255).astype(np.uint8)
    elif image_dtype == "uint16":
        image = np.round(img * 65535).astype(np.uint16)
    elif image_dtype == "float32":
        image = img.astype(np.float32)
    else:
        raise ValueError(f"image_dtype must be 'uint8', 'uint16' or 'float32', got {image_dtype!r}.")

    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"domain": pd.Categorical(band.astype(str))}, index=[f"spot_{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = np.column_stack([x, y])
    adata.uns["spatial"] = {
        "toy": {
            "images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": 55.0},
            "metadata": {"spot_diameter_um": 55.0, "source": f"histoclip.datasets.toy(rng={seed})"},
        }
    }
    return adata
