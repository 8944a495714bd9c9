"""Pathology foundation models as image encoders, offline: random-init ViTs saved locally, never the network."""

from __future__ import annotations

import logging
import socket
import sys
import time
import types

import numpy as np
import pytest
import torch

import histoclip as hc
from histoclip.module import FOUNDATION_MODELS, VIT_ARCHS, VisionTransformer
from histoclip.module._foundation import known_model


def _save(model: torch.nn.Module, path, dtype=torch.float32) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def her2st_cache(her2st_data_root):
    return her2st_data_root / "her2st"


@pytest.fixture
def no_network(monkeypatch):
    """Opening any socket fails (and is counted), and no Hugging Face token is found anywhere."""
    opened = []

    def refuse(*args, **kwargs):
        opened.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return opened


def test_registry_entries_are_complete_and_consistent():
    for name, m in FOUNDATION_MODELS.items():
        assert name == m.name and known_model(name.upper()) is m and known_model(f"hf-hub:{m.hub_id}") is m
        assert 0.2 <= m.mpp <= 1.0 and m.input_px in (224, 448) and m.out_dim > 0 and len(m.mean) == len(m.std) == 3
        assert m.licence and m.loader in ("timm", "conch", "transformers")
        if m.loader == "timm":  # histoclip builds each timm one itself, at the registered width
            assert m.arch in VIT_ARCHS
            with torch.device("meta"):
                net = VisionTransformer.from_arch(m.arch, **m.model_kwargs)
            width = net.embed_dim * (2 if m.pool == "token+avg" else 1)
            assert width == m.out_dim, name
    table = hc.tl.foundation_models()
    assert table.loc["uni", "out_dim"] == 1024 and table.loc["uni", "mpp"] == 0.5 and bool(table.loc["uni", "gated"])
    assert set(table.index) == set(FOUNDATION_MODELS)


def test_vit_matches_timm_layout_and_resamples_position_embedding():
    torch.manual_seed(0)
    m = VisionTransformer.from_arch("vit_tiny_patch16_224", init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                    num_classes=0, dynamic_img_size=True).eval()
    keys = list(m.state_dict())
    assert keys[:4] == ["cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight"]
    assert "blocks.11.ls2.gamma" in keys and "blocks.0.attn.qkv.weight" in keys and keys[-1] == "norm.bias"
    assert m.pos_embed.shape == (1, 196, 192)  # no_embed_class: patches only
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = VisionTransformer.from_arch("vit_tiny_patch16_224", init_values=1e-5, reg_tokens=4,
                                             no_embed_class=True, global_pool="")
        tokens.load_state_dict(m.state_dict())
        assert tokens(x).shape == (2, 5 + 196, 192)
        np.testing.assert_allclose(tokens(x)[:, 0], m(x), atol=1e-6)
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 192)  # other sizes: resampled position embedding
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="builds these ViT architectures"):
        VisionTransformer.from_arch("vit_mystery")


def test_wrong_weights_file_names_the_mismatch(tmp_path):
    path = _save(VisionTransformer.from_arch("vit_tiny_patch16_224"), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"does not match this ViT.*missing keys.*ls1.gamma"):
        VisionTransformer.from_arch("vit_tiny_patch16_224", init_values=1e-5).load_weights(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        VisionTransformer.from_arch("vit_tiny_patch16_224").load_weights(tmp_path / "nope.bin")


def test_gated_hub_model_without_token_fails_fast_offline_without_a_socket(toy, no_network):
    with pytest.raises((ImportError, RuntimeError)):  # untimed: the first call imports histoclip's tools
        hc.tl.image_features(toy, backbone="hf-hub:MahmoodLab/UNI", accelerator="cpu")
    t0 = time.perf_counter()
    with pytest.raises((ImportError, RuntimeError)) as err:
        hc.tl.image_features(toy, backbone="hf-hub:MahmoodLab/UNI", accelerator="cpu")
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert "HF_TOKEN" in msg and "huggingface-cli login" in msg and "weights=" in msg and "backbone='uni'" in msg
    assert no_network == [] and "X_histoclip_features" not in toy.obsm


def test_gated_hub_model_with_timm_installed_but_no_token_never_calls_timm(toy, no_network, monkeypatch, tmp_path):
    """With timm and huggingface_hub importable, the missing token is caught before timm could download."""
    calls = []
    fake_timm = types.ModuleType("timm")
    fake_timm.create_model = lambda *a, **k: calls.append((a, k))
    fake_hub = types.ModuleType("huggingface_hub")
    fake_hub.get_token = lambda: None
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"gated.*no access token.*HF_TOKEN.*huggingface-cli login.*weights="):
        hc.tl.image_features(toy, backbone="uni", accelerator="cpu")
    assert time.perf_counter() - t0 < 1.0 and calls == [] and no_network == []


def test_timm_route_reads_normalisation_and_input_size_from_pretrained_cfg(toy, monkeypatch):
    """The hub route as timm would serve it (timm faked by histoclip's ViT: timm does not import here)."""
    seen = {}

    def create_model(name, pretrained=False, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        net = VisionTransformer.from_arch("vit_tiny_patch16_224", img_size=112)
        net.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 112, 112)}
        return net

    fake_timm = types.ModuleType("timm")
    fake_timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
    small = toy[:5].copy()
    hc.tl.image_features(small, backbone="hf-hub:someone/open-vit", model_kwargs={"drop_path_rate": 0.0},
                         sizes_um=(60,), accelerator="cpu")
    assert seen["name"] == "hf-hub:someone/open-vit" and seen["pretrained"] and seen["num_classes"] == 0
    assert seen["drop_path_rate"] == 0.0
    p = small.uns["histoclip"]["params"]["image_features"]
    assert p["patch_px"] == 112 and small.obsm["X_histoclip_features"].shape == (5, 192)
    assert not p["tta"] and "timm hf-hub:someone/open-vit" in p["source"][0]


def test_module_backbone_needs_its_normalisation_and_is_used_as_given(toy):
    small = toy[:6].copy()
    net = VisionTransformer.from_arch("vit_tiny_patch16_224", img_size=64).eval()
    with pytest.raises(ValueError, match="needs mean= and std="):
        hc.tl.image_features(small, backbone=net, patch_px=64, accelerator="cpu")
    hc.tl.image_features(small, backbone=net, mean=(0.5,) * 3, std=(0.5,) * 3, patch_px=64, mpp=1.0, accelerator="cpu")
    f = small.obsm["X_histoclip_features"]
    p = small.uns["histoclip"]["params"]["image_features"]
    assert p["backbone"] == "module:VisionTransformer" and list(p["sizes_um"]) == [64.0] and p["um_per_px"][0] == 1.0
    # the same as running the module on the patches by hand
    from histoclip.data import PatchReader
    from histoclip.io import resolve
    from histoclip.pp._patches import patch_boxes

    spots = resolve(small)
    reader = PatchReader(spots, patch_boxes(spots, 64.0)[0], 64)
    x = torch.from_numpy(np.stack([reader(i) for i in range(6)])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = net((x - 0.5) / 0.5).numpy()
    np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        hc.tl.image_features(small, backbone=net, mean=(0.5,) * 3, std=(0.5,) * 3, mpp=0.5, sizes_um=(50,))


def test_uni_shaped_vit_large_from_a_local_file_on_her2st(her2st_cache, tmp_path, one_torch_thread, caplog):
    """The goal of the issue: a ViT-L/16 shaped like UNI, from a local file, at UNI's 0.5 um/px, on a HER2ST section."""
    torch.manual_seed(0)
    with torch.device("meta"):
        shape = VisionTransformer.from_arch("vit_large_patch16_224", **FOUNDATION_MODELS["uni"].model_kwargs)
    state = {k: torch.randn(v.shape, dtype=torch.float16) * 0.02 for k, v in shape.state_dict().items()}
    for k in state:
        if k.endswith(("ls1.gamma", "ls2.gamma")):  # at its init value 1e-5 every block is ~ the identity
            state[k].fill_(0.1)
    from safetensors.torch import save_file

    path = tmp_path / "uni_random.safetensors"
    save_file(state, str(path))
    a = hc.datasets.her2st("C2", path=her2st_cache)[:4].copy()
    with caplog.at_level(logging.INFO, logger="histoclip"):
        hc.tl.image_features(a, backbone="uni", weights=path, img_key="fullres", accelerator="cpu")
    f = a.obsm["X_histoclip_features"]
    assert f.shape == (4, 1024) and f.dtype == np.float32 and np.isfinite(f).all()
    assert np.abs(f[0] - f[1]).max() > 1e-3  # different patches, different features
    p = a.uns["histoclip"]["params"]["image_features"]
    assert list(p["sizes_um"]) == [112.0] and p["patch_px"] == 224 and p["um_per_px"][0] == 0.5
    assert "histoclip ViT vit_large_patch16_224 from uni_random.safetensors" in p["source"][0]
    assert p["licence"][0] == "CC-BY-NC-ND-4.0" and not p["tta"] and p["weights"] == str(path)
    assert "112 um patches -> 224 px (0.5 um/px)" in caplog.text


def test_vit_features_train_and_predict_expression_end_to_end(her2st_cache, tmp_path, one_torch_thread):
    """Local ViT weights -> image_features -> train -> predict_expression on another section of the same patient."""
    torch.manual_seed(0)
    net = VisionTransformer.from_arch("vit_tiny_patch16_224", init_values=0.1)  # 1e-5: blocks ~ the identity
    path = _save(net, tmp_path / "tiny.safetensors")
    kw = {"backbone": "vit_tiny_patch16_224", "weights": path, "model_kwargs": {"init_values": 1e-5},
          "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "mpp": 0.5, "img_key": "fullres",
          "accelerator": "cpu"}
    with pytest.raises(ValueError, match="needs mean= and std="):
        hc.tl.image_features(hc.datasets.toy(rng=0), **{**kw, "mean": None, "std": None, "img_key": None})
    train = hc.datasets.her2st("C2", path=her2st_cache)
    hc.tl.image_features(train, **kw)
    assert train.obsm["X_histoclip_features"].shape == (train.n_obs, 192)
    model = hc.tl.train(train, max_epochs=2, n_genes=50, image_features_key="X_histoclip_features",
                        accelerator="cpu", rng=0)
    query = hc.datasets.her2st("C3", path=her2st_cache)[:60].copy()
    pred = hc.tl.predict_expression(query, model)  # the query's features are made with the recorded settings
    assert pred.shape == (60, 50) and np.isfinite(np.asarray(pred.X)).all()
    made = query.obsm["X_histoclip_features"]
    again = query.copy()
    del again.obsm["X_histoclip_features"]
    hc.tl.image_features(again, **kw)
    np.testing.assert_allclose(made, again.obsm["X_histoclip_features"], rtol=1e-5, atol=1e-5)
    rec = query.uns["histoclip"]["params"]["image_features"]
    assert list(rec["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and rec["model_kwargs"]["init_values"] == 1e-5


def test_non_timm_registry_model_points_to_the_module_route(toy):
    with pytest.raises(ValueError, match=r"conch.*encode_image.*mean=.*patch_px=448"):
        hc.tl.image_features(toy, backbone="conch", weights="whatever.bin")
    with pytest.raises(ValueError, match="weights= needs an architecture name"):
        hc.tl.image_features(toy, backbone="hf-hub:someone/unknown", weights="x.bin")


def test_bad_key_added_is_refused_before_any_model_is_loaded(toy, no_network):
    hc.tl.image_features  # noqa: B018 - import the tools before timing
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="would overwrite adata.obsm\\['spatial'\\]"):
        hc.tl.image_features(toy, backbone="uni", weights="/nonexistent/uni.bin", key_added="spatial")
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="not both"):
        hc.tl.image_features(toy, backbone="uni", mpp=0.5, sizes_um=(112,))
    with pytest.raises(ValueError, match="positive"):
        hc.tl.image_features(toy, backbone="uni", mpp=-1)
