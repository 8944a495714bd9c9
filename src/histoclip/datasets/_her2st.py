"""HER2-positive breast cancer legacy ST sections of patients C and B (Andersson et al. 2021), downloaded with pooch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._settings import logger, settings

COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
BASE_URL = f"https://github.com/almaan/her2st/raw/{COMMIT}/"
#: path in the repository -> sha256 (checked against the files of that commit)
REGISTRY = {
    "data/ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "data/ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "data/ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "data/ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "data/ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "data/ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "data/ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "data/ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "data/ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "data/ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
    "data/ST-cnts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
    "data/ST-spotfiles/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
    "data/ST-imgs/B/B4/BT10737_D2_HE.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
}
IMAGES = {
    "C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    "C5": "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg",
    "C6": "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg",
    "B4": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
}
SECTIONS = tuple(IMAGES)
SPOT_DIAMETER_UM = 100.0  # legacy ST: 100 um spots, 200 um apart
HIRES_MAX_PX = 2000


def her2st_registry(path: str | Path | None = None):
    """The pooch object that fetches (and sha256-checks) the raw HER2ST files into ``path``.

    ``path`` defaults to ``histoclip.settings.datasetdir / "her2st"``; files already there with the right hash are
    used without any download.
    """
    import pooch

    return pooch.create(
        path=Path(path) if path is not None else Path(settings.datasetdir) / "her2st",
        base_url=BASE_URL,
        registry=REGISTRY,
        retry_if_failed=2,
    )


def _fetch(reg, rel: str) -> str:
    """``reg.fetch(rel)``, with an error that says which file, its expected hash and where to put it by hand."""
    import pooch

    local = Path(reg.abspath) / rel
    try:
        return reg.fetch(rel)
    except Exception as err:  # noqa: BLE001 - any network or hash failure gets the same actionable message
        if local.is_file():
            state = f"The file at {local} has sha256 {pooch.file_hash(str(local), alg='sha256')}."
        else:
            state = f"There is no file at {local}."
        msg = (
            f"HER2ST: could not get {rel!r} ({type(err).__name__}: {err}). {state} Expected sha256 {REGISTRY[rel]}. "
            f"Without network access, download {BASE_URL}{rel} elsewhere and copy it to {local} (it is checked "
            "against that hash), or pass path= a folder that holds the files in that layout."
        )
        raise OSError(msg) from err


def her2st(section: str = "C2", *, path: str | Path | None = None) -> AnnData:
    """One HER2+ breast cancer legacy ST section: patient C (C2-C6) or patient B (B4) (Andersson et al. 2021).

    The raw counts, the spot table and the full-resolution H&E JPEG (~9.3k x 9.9k px, ~0.69 um/px) come from the
    public repository almaan/her2st at a pinned commit, through a pooch registry with sha256 hashes, and are
    cached in ``histoclip.settings.datasetdir``. Data of the open-access paper. Without network access, or when a
    cached file has the wrong hash, the error names the file, its expected sha256 and where to copy it by hand.

    Parameters
    ----------
    section
        ``"C2"`` to ``"C6"`` (five consecutive sections of patient C's tumour) or ``"B4"`` (patient B): train on
        one patient and predict the other for a patient-level evaluation.
    path
        Cache folder (default ``settings.datasetdir / "her2st"``).

    Returns
    -------
    AnnData with raw counts in ``X`` (spots under the tissue only), ``obsm["spatial"]`` in full-resolution
    pixels, ``uns["spatial"][section]`` with a ``hires`` image (longest side 2000 px), scale factors
    (``spot_diameter_fullres``: half the 200 um array step in pixels), ``metadata["fullres_image"]`` (the cached JPEG,
    used with ``img_key="fullres"``) and ``metadata["spot_diameter_um"] = 100``, and ``obs["section"]``.

    """
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {list(SECTIONS)}, got {section!r}.")
    reg = her2st_registry(path)
    counts_path = _fetch(reg, f"data/ST-cnts/{section}.tsv.gz")
    spots_path = _fetch(reg, f"data/ST-spotfiles/{section}_selection.tsv")
    image_path = _fetch(reg, IMAGES[section])
    counts = pd.read_csv(counts_path, sep="\t", index_col=0)
    spots = pd.read_csv(spots_path, sep="\t")
    spots = spots[spots["selected"] == 1].copy()
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    common = spots.index.intersection(counts.index)
    if len(common) == 0:
        raise ValueError(f"HER2ST {section}: no spot of the count table is in the spot selection file.")
    counts = counts.loc[common]
    spots = spots.loc[common]
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    # pixels per array step (200 um) from a linear fit of pixel against array coordinates; spots are 100 um
    step_x = abs(np.polyfit(spots["new_x"].to_numpy(float), xy[:, 0], 1)[0])
    step_y = abs(np.polyfit(spots["new_y"].to_numpy(float), xy[:, 1], 1)[0])
    diameter_px = float(step_x + step_y) / 4.0

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(image_path) as im:
            full_w, full_h = im.size
            scalef = HIRES_MAX_PX / max(full_w, full_h)
            im.draft("RGB", (int(full_w * scalef), int(full_h * scalef)))
            hires = np.asarray(im.convert("RGB").resize((round(full_w * scalef), round(full_h * scalef)),
                                                        Image.BILINEAR))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    adata = AnnData(
        X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame({"x": spots["x"].to_numpy(), "y": spots["y"].to_numpy(), "section": section},
                         index=[f"{section}_{i}" for i in common]),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.var_names_make_unique()
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {
        section: {
            "images": {"hires": hires},
            "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": diameter_px},
            "metadata": {"fullres_image": str(Path(image_path).resolve()), "spot_diameter_um": SPOT_DIAMETER_UM,
                         "fullres_size": np.array([full_h, full_w]),
                         "source": f"github.com/almaan/her2st@{COMMIT}"},
        }
    }
    logger.info("HER2ST %s: %d spots x %d genes", section, adata.n_obs, adata.n_vars)
    return adata
