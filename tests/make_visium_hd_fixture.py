"""Write a tiny Space Ranger Visium HD output folder (the layout ``spatialdata_io.visium_hd`` reads).

Nothing is downloaded: counts and an H&E-like image are drawn from a seeded generator with three spatial domains
(vertical bands), so tests can check that domains found on the bins follow the bands. The layout is that of Space
Ranger 3 ``outs/`` as published by 10x (``<prefix>_feature_slice.h5`` and ``<prefix>_tissue_image.*`` at the top,
``spatial/`` with the images and scale factors, ``binned_outputs/square_{002,008,016}um/`` each with
``filtered_feature_bc_matrix.h5`` and ``spatial/{tissue_positions.parquet, scalefactors_json.json, images}``);
the file names and fields are those of spatialdata-io's ``VisiumHDKeys``.

Sizes (defaults): a 24 x 24 grid of 8 um bins (192 um square; 560 bins in tissue: a 16 um square at each
corner is left out of the tissue), the same area as 96 x 96 2 um bins and 12 x 12 16 um bins (each the sum of its
2 um bins, as Space Ranger bins them), 40 genes, a 704 x 704 px full-resolution image at 0.5 um/px. Writing it
takes about a second.

Run ``python tests/make_visium_hd_fixture.py OUTDIR`` to write one by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

PREFIX = "hd_fixture"
MICRONS_PER_PIXEL = 0.5
HIRES_SCALEF = 0.25
LOWRES_SCALEF = 0.05
BIN_SIZES = (2, 8, 16)
N_DOMAINS = 3
# the hues of the three bands: eosin pink with more or fewer hematoxylin (purple) nuclei
_BASE = np.array([[236, 190, 215], [222, 160, 200], [205, 140, 190]], dtype=np.float64)
_NUCLEUS = np.array([95, 50, 140], dtype=np.float64)
_NUCLEI_PER_100UM2 = (0.4, 1.2, 2.5)


def band_of(x_um: np.ndarray, width_um: float) -> np.ndarray:
    """The domain (0, 1, 2) of a position: three vertical bands of equal width over the capture grid."""
    return np.clip((np.asarray(x_um) / width_um * N_DOMAINS).astype(int), 0, N_DOMAINS - 1)


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A Cell Ranger / Space Ranger v3 ``filtered_feature_bc_matrix.h5`` (genes x barcodes, CSC)."""
    import scipy.sparse as sp

    m = sp.csc_matrix(counts.T.astype(np.int32))  # genes x barcodes: one column per barcode
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = np.array([b"matrix"])
        f.attrs["version"] = np.array([2], dtype=np.int32)
        f.attrs["software_version"] = "spaceranger-3.1.1"
        f.attrs["chemistry_description"] = np.array([b"Visium HD v1"])
        f.attrs["library_ids"] = np.array([PREFIX.encode()])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int32)
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feats = g.create_group("features")
        feats["_all_tag_keys"] = np.array([b"genome"])
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"GRCh38"] * len(genes))
        feats["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")


def _he_image(size_px: int, origin_um: float, grid_um: float, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like uint8 RGB image: eosin background and round nuclei whose colour and density follow the bands."""
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    x_um = xx * MICRONS_PER_PIXEL - origin_um
    band = band_of(x_um, grid_um)
    img = _BASE[band] + rng.normal(0, 6, (size_px, size_px, 3))
    area_um2 = (size_px * MICRONS_PER_PIXEL) ** 2
    for d in range(N_DOMAINS):
        n = int(_NUCLEI_PER_100UM2[d] * area_um2 / 100)
        cx, cy = rng.uniform(0, size_px, n), rng.uniform(0, size_px, n)
        keep = band_of(cx * MICRONS_PER_PIXEL - origin_um, grid_um) == d
        for x, y, r in zip(cx[keep], cy[keep], rng.uniform(3, 6, keep.sum()) / MICRONS_PER_PIXEL / 2, strict=True):
            x0, x1, y0, y1 = int(max(x - r, 0)), int(min(x + r + 1, size_px)), int(max(y - r, 0)), int(
                min(y + r + 1, size_px))
            disc = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r * r
            img[y0:y1, x0:x1][disc] = _NUCLEUS + rng.normal(0, 10, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.BOX))


def make_visium_hd(
    path: str | Path,
    *,
    n_side_8um: int = 24,
    n_genes: int = 40,
    margin_um: float = 80.0,
    seed: int = 0,
) -> Path:
    """Write the folder at ``path`` and return it.

    ``n_side_8um`` 8 um bins per side (a multiple of 2, so 16 um bins tile it); ``margin_um`` of tissue image around
    the capture grid, so patches of up to ``2 * margin_um`` microns fit. ``truth.csv`` at the top holds each 8 um
    bin's band (``barcode,domain``), the ground truth of the domains.
    """
    from PIL import Image

    if n_side_8um % 2:
        raise ValueError(f"n_side_8um must be even (16 um bins tile the 8 um grid), got {n_side_8um}.")
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    grid_um = n_side_8um * 8.0
    size_px = int(round((grid_um + 2 * margin_um) / MICRONS_PER_PIXEL))
    origin_px = margin_um / MICRONS_PER_PIXEL  # the grid's corner in full-resolution pixels

    # 2 um counts: Poisson per gene, marker genes of each band about 6x higher there; larger bins are sums
    n2 = n_side_8um * 4
    genes = [f"MARK{d}_{i}" for d in range(N_DOMAINS) for i in range(10)]
    genes += [f"HK{i}" for i in range(n_genes - len(genes))]
    rows2, cols2 = np.mgrid[0:n2, 0:n2]
    band2 = band_of((cols2.ravel() + 0.5) * 2.0, grid_um)
    rate = np.full((N_DOMAINS, len(genes)), 0.02)
    rate[:, 30:] = 0.05
    for d in range(N_DOMAINS):
        rate[d, d * 10:(d + 1) * 10] = 0.12
    counts2 = rng.poisson(rate[band2] * rng.gamma(4.0, 0.25, (band2.size, 1))).reshape(n2, n2, len(genes))

    hires_full = _he_image(size_px, margin_um, grid_um, rng)
    images = {"tissue_hires_image.png": _resize(hires_full, HIRES_SCALEF),
              "tissue_lowres_image.png": _resize(hires_full, LOWRES_SCALEF)}

    def scalefactors(bin_um: float) -> dict:
        return {
            "spot_diameter_fullres": bin_um / MICRONS_PER_PIXEL,
            "bin_size_um": float(bin_um),
            "microns_per_pixel": MICRONS_PER_PIXEL,
            "regist_target_img_scalef": HIRES_SCALEF,
            "tissue_lowres_scalef": LOWRES_SCALEF,
            "fiducial_diameter_fullres": 1.0 / MICRONS_PER_PIXEL * 60,
            "tissue_hires_scalef": HIRES_SCALEF,
        }

    spatial = path / "spatial"
    spatial.mkdir(exist_ok=True)
    for name, img in images.items():
        Image.fromarray(img).save(spatial / name)
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors(2.0), indent=2))
    # the full-resolution H&E as 10x publishes it beside the outputs (<prefix>_tissue_image.*)
    Image.fromarray(hires_full).save(path / f"{PREFIX}_tissue_image.tif")

    truth = None
    for bin_um in BIN_SIZES:
        k = bin_um // 2  # 2 um bins per side of one bin
        n = n2 // k
        counts = counts2.reshape(n, k, n, k, len(genes)).sum(axis=(1, 3)).reshape(n * n, len(genes))
        r, c = np.mgrid[0:n, 0:n]
        r, c = r.ravel(), c.ravel()
        barcodes = [f"s_{bin_um:03d}um_{a:05d}_{b:05d}-1" for a, b in zip(r, c, strict=True)]
        # the four corners are outside the tissue (in the positions file with in_tissue=0, not in the matrix)
        corner = max(1, n // 12)
        in_tissue = ~(((r < corner) | (r >= n - corner)) & ((c < corner) | (c >= n - corner)))
        x_px = origin_px + (c + 0.5) * bin_um / MICRONS_PER_PIXEL
        y_px = origin_px + (r + 0.5) * bin_um / MICRONS_PER_PIXEL
        pos = pd.DataFrame({
            "barcode": barcodes,
            "in_tissue": in_tissue.astype(np.int32),
            "array_row": r.astype(np.int32),
            "array_col": c.astype(np.int32),
            "pxl_row_in_fullres": y_px.astype(np.float64),
            "pxl_col_in_fullres": x_px.astype(np.float64),
        })
        folder = path / "binned_outputs" / f"square_{bin_um:03d}um"
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        pos.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(bin_um), indent=2))
        for name, img in images.items():
            Image.fromarray(img).save(folder / "spatial" / name)
        keep = np.flatnonzero(in_tissue)
        _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts[keep], [barcodes[i] for i in keep], genes)
        if bin_um == 8:
            truth = pd.DataFrame({"barcode": [barcodes[i] for i in keep],
                                  "domain": band_of((c[keep] + 0.5) * bin_um, grid_um).astype(str)})
    truth.to_csv(path / "truth.csv", index=False)

    # the feature slice file: spatialdata-io reads the metadata (file format, the HD layout and the transforms
    # between the spot grid (2 um), the microscope image and the CytAssist image) from its attributes
    spot_to_micro = [2.0 / MICRONS_PER_PIXEL, 0, origin_px, 0, 2.0 / MICRONS_PER_PIXEL, origin_px, 0, 0, 1]
    micro_to_spot = list(np.linalg.inv(np.array(spot_to_micro).reshape(3, 3)).ravel())
    eye = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    metadata = {
        "hd_layout_json": json.dumps({"file_format": "1.0", "num_rows": n2, "num_cols": n2,
                                      "transform": [2.0, 0, 0, 0, 2.0, 0, 0, 0, 1.0]}),
        "transform_matrices": {"cytassist_colrow_to_spot_colrow": eye, "spot_colrow_to_cytassist_colrow": eye,
                               "microscope_colrow_to_spot_colrow": micro_to_spot,
                               "spot_colrow_to_microscope_colrow": spot_to_micro},
        "sample_id": PREFIX,
        "spaceranger_version": "spaceranger-3.1.1",
    }
    with h5py.File(path / f"{PREFIX}_feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
    return path


def read_visium_hd(path: str | Path, **kwargs):
    """``spatialdata_io.visium_hd(path)`` with the reader's notices (a FutureWarning about a default) silenced."""
    import warnings

    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.visium_hd(path, **kwargs)


if __name__ == "__main__":
    print(make_visium_hd(sys.argv[1] if len(sys.argv) > 1 else "visium_hd_fixture"))
