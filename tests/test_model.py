import json
import re

import numpy as np
import pandas as pd
import pytest

import histoclip as hc
from histoclip.model import HistoCLIP


def _train(adata, seed, epochs=2):
    return hc.tl.train(adata, max_epochs=epochs, n_genes=40, rng=seed, batch_size=64, accelerator="cpu")


def test_same_seed_same_embedding_other_seed_differs(toy_patched):
    e0 = _train(toy_patched, 0).get_latent_representation()
    e0b = _train(toy_patched, 0).get_latent_representation()
    e1 = _train(toy_patched, 1).get_latent_representation()
    np.testing.assert_array_equal(e0, e0b)
    assert np.abs(e0 - e1).max() > 1e-3


def test_training_does_not_touch_global_rng(toy_patched):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _train(toy_patched, 0, epochs=1)
    torch.testing.assert_close(torch.rand(3), expected)


def test_history_and_shapes(trained):
    model, adata = trained
    assert list(model.history["epoch"]) == [1, 2]
    assert np.isfinite(model.history["loss"]).all()
    z = model.get_latent_representation(adata, modality="joint")
    assert z.shape == (adata.n_obs, 42) and z.dtype == np.float32
    zi = model.get_latent_representation(adata, modality="image")
    ze = model.get_latent_representation(adata, modality="expression")
    assert zi.shape == ze.shape == (adata.n_obs, 32)
    # the joint embedding is the per-spot convex combination of the two latents, with the image's weight in [0, 1]
    section, inputs = model._resolve_query(adata, "joint")
    w = model._embeddings(section, inputs, 512)["image_weight"]
    assert ((w >= 0) & (w <= 1)).all() and np.ptp(w) > 0
    k = model.module.skip_components  # [expression skip, fusion], each block scaled
    fused = z[:, k:] / float(model.module.block_scale[1])
    np.testing.assert_allclose(fused, (1 - w)[:, None] * ze + w[:, None] * zi, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_identical(trained, tmp_path):
    model, adata = trained
    path = model.save(tmp_path / "m")
    loaded = HistoCLIP.load(tmp_path / "m", adata, accelerator="cpu")
    for mod in ("joint", "image", "expression"):
        np.testing.assert_array_equal(loaded.get_latent_representation(adata, modality=mod),
                                      model.get_latent_representation(adata, modality=mod))
    assert loaded.genes == model.genes
    pd.testing.assert_frame_equal(loaded.history.reset_index(drop=True), model.history.reset_index(drop=True),
                                  check_dtype=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    assert path.is_file() and not list((tmp_path / "m").glob("*.tmp"))


def test_load_rejects_corrupted_and_missing(trained, tmp_path):
    model, _ = trained
    path = model.save(tmp_path / "m")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        HistoCLIP.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="No saved model"):
        HistoCLIP.load(tmp_path / "elsewhere")


def test_saved_file_is_safetensors_with_json_metadata(trained, tmp_path):
    from safetensors import safe_open

    model, _ = trained
    path = model.save(tmp_path / "m")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip"])
    assert meta["genes"] == model.genes and meta["version"] == hc.__version__


def test_load_checks_genes(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "m")
    other = adata[:, [g for g in adata.var_names if g != model.genes[0]]].copy()
    with pytest.raises(KeyError, match="absent from the data"):
        HistoCLIP.load(tmp_path / "m", other)


def test_untrained_model_refuses_to_embed(toy_patched):
    m = HistoCLIP(toy_patched, n_genes=20)
    with pytest.raises(RuntimeError, match="train"):
        m.get_latent_representation()


def test_needs_patches_first(toy):
    with pytest.raises(KeyError, match="extract_patches"):
        HistoCLIP(toy)


def test_precomputed_image_features(toy):
    toy.obsm["feat"] = np.random.default_rng(0).normal(size=(toy.n_obs, 32)).astype(np.float32)
    m = hc.tl.train(toy, max_epochs=1, n_genes=20, image_features_key="feat", accelerator="cpu")
    assert m.get_latent_representation(modality="image").shape == (toy.n_obs, 32)


def test_several_sections(toy_patched):
    other = hc.datasets.toy(rng=1)
    hc.pp.extract_patches(other, size_um=110)
    m = hc.tl.train([toy_patched, other], max_epochs=1, n_genes=20, accelerator="cpu")
    assert m.get_latent_representation(other).shape[0] == other.n_obs
    with pytest.raises(ValueError, match="several sections"):
        m.get_latent_representation()


def test_nan_loss_is_reported(toy_patched):
    m = HistoCLIP(toy_patched, n_genes=20)
    with pytest.raises(FloatingPointError, match=r"became nan at epoch \d+, step \d+. Lower lr"):
        m.train(5, lr=1e30, batch_size=32, accelerator="cpu")


def test_spatial_context_items_match_dense_neighbour_means(toy_patched):
    from histoclip.data import PatchDataset

    model = HistoCLIP(toy_patched, n_genes=30)
    section, z = model._sections[0], model._train_inputs[0].expression
    ds = PatchDataset(section.reader, z, None, context=section.graph)
    dense = np.concatenate([z, section.graph @ z], axis=1)
    for i in (0, 7, toy_patched.n_obs - 1):
        np.testing.assert_allclose(ds[i][1].numpy(), dense[i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context"):
        PatchDataset(section.reader, None, None, context=section.graph)


def test_the_model_holds_projections_streamed_in_blocks_not_spots_by_genes(toy_patched, monkeypatch):
    import histoclip.pp._genes as genes_module
    from histoclip.pp._genes import expression_matrix

    model = HistoCLIP(toy_patched, n_genes=30, n_components=10)
    monkeypatch.setattr(genes_module, "CHUNK_ROWS", 7)  # every statistic streamed over many small blocks
    blocky = HistoCLIP(toy_patched, n_genes=30, n_components=10)
    x = expression_matrix(toy_patched, model.genes).astype(np.float64)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-3)
    z = (x - mean) / std
    for m in (model, blocky):
        np.testing.assert_allclose(m.gene_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.gene_std, std, rtol=1e-4, atol=1e-6)
        held = m._train_inputs[0]
        basis, skip = m.module.expression_basis.numpy(), m.module.skip_basis.numpy()
        assert held.expression.shape == (toy_patched.n_obs, basis.shape[1]) and basis.shape[1] < 30
        assert held.skip.shape == (toy_patched.n_obs, skip.shape[1])
        np.testing.assert_allclose(held.expression, z @ basis, atol=1e-4)
        np.testing.assert_allclose(held.skip, z @ skip, atol=1e-4)
        # the principal axes are those of the dense standardised data (up to sign)
        top = np.linalg.eigh(np.cov(z, rowvar=False))[1][:, -1]
        assert abs(np.corrcoef(top, basis[:, 0])[0, 1]) > 0.999
    np.testing.assert_allclose(blocky._train_inputs[0].expression, model._train_inputs[0].expression, atol=1e-4)


def test_default_epochs_keep_steps_roughly_constant(toy_patched):
    from histoclip.model import default_max_epochs

    assert default_max_epochs(3639) == 30
    assert default_max_epochs(10_000) == 12
    assert default_max_epochs(100_000) == 1
    assert default_max_epochs(0) == 30
    model = HistoCLIP(toy_patched, n_genes=20).train(rng=0)  # toy: few spots -> the 30-epoch cap
    assert model.train_params["max_epochs"] == default_max_epochs(toy_patched.n_obs) == 30
    assert len(model.history) == 30


@pytest.mark.parametrize("size_um", [30, 110, 400])
def test_default_patch_px_follows_the_image_resolution(toy, size_um):
    a = toy.copy()
    hc.pp.extract_patches(a, size_um=size_um)
    box = a.obsm["histoclip_patch_box"]
    side = float(np.median(np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])))
    model = HistoCLIP(a, n_genes=20)
    px = model.init_params["patch_px"]
    assert px == int(np.clip(8 * np.ceil(side / 8), 16, 32))
    assert model._sections[0].reader(0).shape == (px, px, 3)
    assert HistoCLIP(a, n_genes=20, patch_px=8).init_params["patch_px"] == 8  # an explicit value wins


def test_log_says_at_which_resolution_the_image_branch_sees_the_tissue(toy, tmp_path, caplog):
    import logging

    from PIL import Image

    a = toy.copy()
    hc.pp.extract_patches(a, size_um=110)  # the 5 um/px hires image: 22 px boxes, fed at 24 px
    with caplog.at_level(logging.INFO, logger="histoclip"):
        HistoCLIP(a, n_genes=20)
    assert re.search(r"sees 110 um patches from image 'hires' of library 'toy' \(5 um/px, 22 px\) at 24 px: "
                     r"4\.58 um/px", caplog.text)
    assert "resolves cells" not in caplog.text
    # the same slide with a 1 um/px image: the 110 px boxes are shrunk to the CNN's 32 px, and the log says so
    hires = toy.uns["spatial"]["toy"]["images"]["hires"]
    Image.fromarray(hires).resize((hires.shape[1] * 5, hires.shape[0] * 5)).save(tmp_path / "full.png")
    hc.io.set_fullres_image(a, tmp_path / "full.png")
    hc.pp.extract_patches(a, size_um=110, img_key="fullres")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="histoclip"):
        HistoCLIP(a, n_genes=20)
    assert re.search(r"sees 110 um patches from image 'fullres' .*\(1 um/px, 110 px\) at 32 px: 3\.44 um/px",
                     caplog.text)
    assert re.search(r"resolves cells \(1 um/px\).*image_features_key=", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="histoclip"):
        HistoCLIP(a, n_genes=20, use_image=False)  # no image branch: nothing to say about its resolution
    assert "image branch sees" not in caplog.text


def test_progress_bar_without_ipywidgets_is_the_text_bar(monkeypatch):
    """tqdm.auto would warn 'IProgress not found' into a notebook without ipywidgets; the text bar is used instead."""
    import importlib.util

    from histoclip.train._loop import _progress_bar_class

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    assert _progress_bar_class().__module__ == "tqdm.std"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ipywidgets" else None)
    assert _progress_bar_class().__module__ != "tqdm.std"  # the notebook bar where widgets can draw it
