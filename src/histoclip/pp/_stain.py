"""H&E stain normalisation (Macenko et al. 2009) and stain augmentation, in numpy.

Optical density ``OD = -log10((RGB + 1) / I0)``; each tissue pixel's OD is a non-negative mix of a haematoxylin and an
eosin colour vector. :func:`fit_stain` estimates the two vectors of a section (the extreme angles of its tissue pixels
in the plane of the OD's two main axes) and each stain's 99th-percentile concentration; :func:`normalize_stain` maps
an image onto a reference's vectors and concentrations, so sections stained or scanned differently look alike.
"""

from __future__ import annotations

import numpy as np

I0 = 240.0
#: Macenko's reference H&E vectors (columns: haematoxylin, eosin; rows: R, G, B optical density) and 99th-percentile
#: concentrations, as used by most implementations (StainTools, torchstain, HistomicsTK examples).
REFERENCE = {
    "stain_matrix": np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    "max_concentration": np.array([1.9705, 1.0308]),
}
MAX_PIXELS = 200_000


def _check_rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim < 2 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be RGB with 3 channels last, (..., 3); got shape {image.shape}.")
    if image.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 RGB (0-255), got dtype {image.dtype}.")
    return image


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log10((rgb.astype(np.float64) + 1.0) / I0)


def fit_stain(
    image: np.ndarray,
    *,
    od_threshold: float = 0.15,
    angle_percentile: float = 1.0,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Macenko stain vectors and concentration scale of an H&E image or a stack of its patches.

    Parameters
    ----------
    image
        uint8 RGB, any leading shape: ``(H, W, 3)`` or ``(n, H, W, 3)`` (e.g. the spot patches of one section).
    od_threshold
        Pixels with optical density below this in any channel are background (glass, white) and ignored.
    angle_percentile
        Robust extremes: the stain vectors are at this and ``100 - angle_percentile`` percent of the angles.
    max_pixels
        Tissue pixels used for the fit (evenly spaced; deterministic).

    Returns
    -------
    ``{"stain_matrix": (3, 2) haematoxylin and eosin OD vectors (unit columns), "max_concentration": (2,) 99th
    percentiles of the two concentrations}``: the ``source=`` or ``target=`` of :func:`normalize_stain`.

    """
    image = _check_rgb(image, "image")
    od = _od(image.reshape(-1, 3))
    od = od[(od > od_threshold).all(axis=1)]
    if od.shape[0] < 100:
        raise ValueError(
            f"fit_stain: only {od.shape[0]} tissue pixels (optical density > {od_threshold} in every channel); "
            "the image looks like background. Pass patches that cover tissue or lower od_threshold."
        )
    if od.shape[0] > max_pixels:
        od = od[np.linspace(0, od.shape[0] - 1, max_pixels).astype(np.int64)]
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest axes
    plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)  # point into the positive OD octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [angle_percentile, 100 - angle_percentile])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs red more than eosin does: the vector with the larger red OD comes first
    he = np.column_stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    he = np.abs(he) / np.linalg.norm(he, axis=0)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(max_c > 0):
        raise ValueError(f"fit_stain: degenerate fit (99th-percentile concentrations {max_c}); is this H&E?")
    return {"stain_matrix": he, "max_concentration": max_c}


def normalize_stain(
    image: np.ndarray,
    *,
    source: dict[str, np.ndarray] | None = None,
    target: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Macenko stain normalisation of an H&E image (or a stack of patches) onto a reference appearance.

    Parameters
    ----------
    image
        uint8 RGB, any leading shape (``(H, W, 3)`` or ``(n, H, W, 3)``).
    source
        The stains of the section the image comes from (:func:`fit_stain`; fit it once per section, on all its
        spot patches, and reuse it for every patch of that section). Default: fitted on ``image`` itself.
    target
        The appearance to map onto (:func:`fit_stain` of a reference image). Default: Macenko's reference vectors.

    Returns
    -------
    uint8 RGB array of the shape of ``image``.

    """
    image = _check_rgb(image, "image")
    src = fit_stain(image) if source is None else source
    tgt = REFERENCE if target is None else target
    for name, fit in (("source", src), ("target", tgt)):
        if set(fit) != {"stain_matrix", "max_concentration"} or np.shape(fit["stain_matrix"]) != (3, 2):
            raise ValueError(f"{name} must be the dict fit_stain returns (stain_matrix (3, 2), max_concentration).")
    od = _od(image.reshape(-1, 3))
    conc = od @ np.linalg.pinv(np.asarray(src["stain_matrix"])).T
    conc *= np.asarray(tgt["max_concentration"]) / np.asarray(src["max_concentration"])
    out = I0 * np.power(10.0, -(conc @ np.asarray(tgt["stain_matrix"]).T))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)


def augment_stain(
    patches: np.ndarray,
    rng: int | np.random.Generator | None = None,
    *,
    sigma: float = 0.05,
    bias: float = 0.05,
    stain: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Random H&E stain jitter for training (Tellez et al. 2019).

    Each patch's haematoxylin and eosin concentrations are scaled by ``U(1 - sigma, 1 + sigma)`` and shifted by
    ``U(-bias, bias)``.

    Made for a training loop's patch transform (uint8 in, uint8 out, one draw per patch): a model that sees
    the same tissue in many stain intensities depends less on one lab's staining.

    Parameters
    ----------
    patches
        uint8 RGB ``(n, H, W, 3)`` or ``(H, W, 3)``.
    rng
        Seed or generator (one draw of 4 numbers per patch).
    sigma, bias
        Scale and shift ranges of the concentrations.
    stain
        Stain vectors to decompose with (:func:`fit_stain`); default Macenko's reference vectors.

    Returns
    -------
    uint8 array of the shape of ``patches``.

    """
    patches = _check_rgb(patches, "patches")
    single = patches.ndim == 3
    x = patches[None] if single else patches
    rng = np.random.default_rng(rng)
    he = np.asarray((REFERENCE if stain is None else stain)["stain_matrix"])
    n = x.shape[0]
    scale = rng.uniform(1 - sigma, 1 + sigma, size=(n, 1, 2))
    shift = rng.uniform(-bias, bias, size=(n, 1, 2))
    od = _od(x.reshape(n, -1, 3))
    conc = od @ np.linalg.pinv(he).T
    residual = od - conc @ he.T  # what the two stains do not explain (kept, so the background stays)
    out = I0 * np.power(10.0, -((conc * scale + shift) @ he.T + residual))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(x.shape)
    return out[0] if single else out
