"""The fused model: physical neighbourhoods, neighbour positives, fusion weights, ablations, the domain default."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import histoclip as hc
from histoclip.data import PatchDataset
from histoclip.model import HistoCLIP
from histoclip.module import HistoclipModule
from histoclip.pp._graph import gaussian_graph

TINY = {"n_genes": 30, "patch_px": 8, "hidden_dim": 32, "latent_dim": 8, "embedding_dim": 8, "n_components": 10}


@pytest.fixture(scope="module")
def fused(one_torch_thread):
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.tl.train(adata, max_epochs=2, batch_size=64, rng=0, accelerator="cpu", **TINY)
    hc.tl.embed(adata, model)
    return model, adata


def test_gaussian_graph_is_physical():
    # a square grid at 100 um and the same grid at 200 um: neighbours weigh exp(-d^2 / 2 s^2) of their distance in um
    g = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2).astype(float)
    fine, coarse = gaussian_graph(g * 100, 100.0), gaussian_graph(g * 200, 100.0)
    centre = 12
    assert fine[centre, 13] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert coarse[centre, 13] == pytest.approx(np.exp(-2.0), rel=1e-5)
    assert coarse[centre].nnz < fine[centre].nnz  # nothing beyond 3 sigma = 300 um
    assert (fine != fine.T).nnz == 0 and fine.diagonal().sum() == 0
    two = gaussian_graph(g * 100, 100.0, groups=np.repeat(["a", "b"], [10, 15]))
    assert two[:10, 10:].nnz == 0  # libraries are never linked
    with pytest.raises(ValueError, match="positive number of microns"):
        gaussian_graph(g, 0.0)


def test_neighbour_positives_are_neighbours_and_seeded(fused):
    model, _ = fused
    section, x = model._sections[0], model._train_inputs[0].expression
    ds = PatchDataset(section.reader, x, None, context=section.graph, positives=True, seed=3)
    again = PatchDataset(section.reader, x, None, context=section.graph, positives=True, seed=3)
    g = x.shape[1]
    for i in (0, 17, 101):
        item = ds[i][1].numpy()
        assert item.shape == (4 * g,)
        np.testing.assert_array_equal(item, again[i][1].numpy())  # same seed, same draws
        j = [k for k in section.graph[i].indices if k != i and np.allclose(x[k], item[2 * g : 3 * g])]
        assert j, "the positive is one of the spot's neighbours"
        np.testing.assert_allclose(item[3 * g :], np.asarray(section.graph[j[0]] @ x).ravel(), rtol=1e-5, atol=1e-6)
    draws = {tuple(ds[5][1].numpy()[2 * g : 2 * g + 3]) for _ in range(20)}
    assert len(draws) > 1  # later reads draw other neighbours
    with pytest.raises(ValueError, match="positives need a context"):
        PatchDataset(section.reader, x, None, positives=True)


def test_fusion_weights_written_and_drawn(fused, tmp_path):
    model, adata = fused
    w = adata.obs["histoclip_image_weight"].to_numpy()
    assert w.shape == (adata.n_obs,) and ((w >= 0) & (w <= 1)).all()
    z, zi, ze = (adata.obsm[k] for k in ("X_histoclip", "X_histoclip_image", "X_histoclip_expression"))
    k = model.module.skip_components
    assert k == 10 and z.shape[1] == k + TINY["embedding_dim"]
    fused = z[:, k:] / float(model.module.block_scale[1])  # the learned block of the joint embedding: the fusion
    np.testing.assert_allclose(fused, (1 - w)[:, None] * ze + w[:, None] * zi, rtol=1e-4, atol=1e-5)
    ax = hc.pl.image_weight(adata, save=tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0 and len(ax.collections) == 1
    plt.close("all")
    with pytest.raises(KeyError, match="run histoclip.tl.embed"):
        hc.pl.image_weight(hc.datasets.toy(rng=0))


def test_domains_smooth_within_a_physical_radius(fused):
    _, adata = fused
    a = adata.copy()
    hc.tl.domains(a, n_domains=3, use_rep="X_histoclip", n_hops=2, rng=0)
    params = a.uns["histoclip"]["params"]["domains"]
    assert params["use_rep"] == "X_histoclip" and params["radius_um"] == 150.0 and params["n_hops"] == 2
    # the toy grid is 100 um apart (Visium-like): a 150 um radius is the first ring, the 6-NN grid of earlier versions
    b = adata.copy()
    hc.tl.domains(b, n_domains=3, use_rep="X_histoclip", n_hops=2, n_neighbors=6, rng=0)
    assert hc.metrics.adjusted_rand(a.obs["histoclip_domain"], b.obs["histoclip_domain"]) > 0.9
    # a radius below the spacing means no neighbour: the same as no smoothing
    c, d = adata.copy(), adata.copy()
    hc.tl.domains(c, n_domains=3, use_rep="X_histoclip", n_hops=2, radius_um=50, rng=0)
    hc.tl.domains(d, n_domains=3, use_rep="X_histoclip", n_hops=2, radius_um=None, rng=0)
    assert (c.obs["histoclip_domain"] == d.obs["histoclip_domain"]).all()
    with pytest.raises(ValueError, match="radius_um"):
        hc.tl.domains(adata.copy(), n_domains=3, radius_um=-1)


def test_refinement_votes_over_the_same_physical_neighbours():
    adata = hc.datasets.toy(rng=0)  # spots 100 um apart
    truth = adata.obs["domain"].astype(str).to_numpy()
    codes = pd.factorize(truth)[0]
    x = np.eye(codes.max() + 1, dtype=np.float32)[codes] * 10
    inside = np.flatnonzero(codes == 0)[len(np.flatnonzero(codes == 0)) // 2]
    x[inside] = np.roll(x[inside], 1)  # one spot planted with another domain's profile
    adata.obsm["X_rep"] = x + np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    k = int(codes.max() + 1)
    out = {}
    for radius, refine in ((150, False), (150, True), (50, True)):
        a = adata.copy()
        hc.tl.domains(a, n_domains=k, use_rep="X_rep", n_hops=0, n_pcs=None, radius_um=radius, refine=refine, rng=0)
        out[radius, refine] = a.obs["histoclip_domain"].to_numpy()
    lone = out[150, False]
    assert (lone == lone[inside]).sum() > 1 and lone[inside] != pd.Series(lone[codes == 0]).mode()[0]
    # the first ring (150 um) outvotes the planted spot; at 50 um it has no neighbour, so nothing changes
    assert out[150, True][inside] == pd.Series(out[150, True][codes == 0]).mode()[0]
    assert (out[50, True] == lone).all()


def test_domains_do_not_smooth_the_model_embedding_again(fused):
    _, adata = fused
    a, b = adata.copy(), adata.copy()
    hc.tl.domains(a, n_domains=3, use_rep="X_histoclip", rng=0)
    # the embedding already averages each spot's neighbourhood inside the model: no second smoothing
    assert a.uns["histoclip"]["params"]["domains"]["n_hops"] == 0
    hc.tl.domains(b, n_domains=3, use_rep="X_histoclip", radius_um=None, rng=0)
    assert (a.obs["histoclip_domain"] == b.obs["histoclip_domain"]).all()
    hc.tl.domains(b, n_domains=3, use_rep="X_histoclip_expression", rng=0)
    assert b.uns["histoclip"]["params"]["domains"]["n_hops"] == 0
    hc.tl.domains(b, n_domains=3, use_rep="X_histoclip_image", rng=0)  # the image latent has no neighbourhood
    assert b.uns["histoclip"]["params"]["domains"]["n_hops"] == 2
    hc.tl.domains(b, n_domains=3, rng=0)  # after tl.embed the default is the joint embedding, not smoothed again
    p = b.uns["histoclip"]["params"]["domains"]
    assert p["use_rep"] == "X_histoclip" and p["n_hops"] == 0
    assert (b.obs["histoclip_domain"] == a.obs["histoclip_domain"]).all()
    hc.tl.domains(b, n_domains=3, use_rep="expression_pca", rng=0)  # the model-free path, one argument away
    p = b.uns["histoclip"]["params"]["domains"]
    assert p["use_rep"] == "expression_pca" and p["n_hops"] == 2
    # a copy of the embedding under another name is not known to carry context: smoothed like any representation
    b.obsm["X_other"] = b.obsm["X_histoclip"].copy()
    hc.tl.domains(b, n_domains=3, use_rep="X_other", rng=0)
    assert b.uns["histoclip"]["params"]["domains"]["n_hops"] == 2
    # a model trained without spatial context: its embedding is smoothed like any other
    c = adata.copy()
    c.uns["histoclip"]["params"]["embed"]["spatial_context"] = False
    hc.tl.domains(c, n_domains=3, use_rep="X_histoclip", rng=0)
    assert c.uns["histoclip"]["params"]["domains"]["n_hops"] == 2


def test_ablation_switches():
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    e = torch.randn(6, 4 * 5)  # projected inputs: [own, neighbourhood, positive's own, positive's neighbourhood]
    no_image = HistoclipModule(12, embedding_dim=4, n_components=5, use_image=False)
    z_e = no_image.expression_embedding(e[:, :10])
    joint, w = no_image.fuse(no_image.image_embedding(x), z_e)
    torch.testing.assert_close(joint, z_e)
    assert (w == 0).all()
    mean = HistoclipModule(12, embedding_dim=4, n_components=5, fusion="mean")
    _, w = mean.fuse(mean.image_embedding(x), mean.expression_embedding(e[:, :10]))
    assert (w == 0.5).all()
    for kw in ({"reconstruction_weight": 0.0}, {"cross_modal_weight": 0.0}, {"spatial_context": False}, {}):
        out = HistoclipModule(12, embedding_dim=4, n_components=5, **kw)(x, e)
        assert torch.isfinite(out.loss)
        assert (out.spatial is None) == (kw == {"spatial_context": False})
    with pytest.raises(ValueError, match="fusion"):
        HistoclipModule(12, fusion="max")
    with pytest.raises(ValueError, match="reconstruction_weight"):
        HistoclipModule(12, reconstruction_weight=-1)


def test_expression_basis_is_saved_and_restored(fused, tmp_path):
    model, adata = fused
    basis = model.module.expression_basis.detach().cpu().numpy()
    assert basis.shape == (30, 10) and np.abs(basis).sum() > 0
    loaded = HistoCLIP.load(model.save(tmp_path / "m"), adata)
    np.testing.assert_array_equal(loaded.module.expression_basis.cpu().numpy(), basis)
    np.testing.assert_array_equal(loaded.get_latent_representation(adata), model.get_latent_representation(adata))


def test_loaded_untrained_model_trains_on_its_saved_basis(tmp_path):
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = HistoCLIP(adata, **TINY)
    basis = model.module.expression_basis.detach().clone()
    assert basis.abs().sum() > 0
    loaded = HistoCLIP.load(model.save(tmp_path / "m"), adata)
    loaded.train(1, batch_size=64, accelerator="cpu")  # untrained: the module is rebuilt from the seed
    torch.testing.assert_close(loaded.module.expression_basis, basis)


def test_joint_keeps_the_model_free_representation_beside_what_was_learned(fused):
    """The skip block of X_histoclip is the representation tl.domains clusters without a model (up to each column's
    sign and the block's scale), whatever training did to the learned block."""
    from histoclip.io._slide import resolve
    from histoclip.pp._graph import radius_graph, smooth_features, spot_coords_um
    from histoclip.tl._domains import expression_pca

    model, adata = fused
    k = model.module.skip_components
    skip = adata.obsm["X_histoclip"][:, :k] / float(model.module.block_scale[0])
    spots = resolve(adata, need_image=False)
    free = expression_pca(adata.X, adata.var_names, spots.coords(), spots.library_labels(), n_genes=30, n_pcs=k, seed=0)
    free = smooth_features(free, radius_graph(spot_coords_um(spots), 150.0, spots.library_labels()), 2)
    for j in range(k):
        r = np.corrcoef(skip[:, j], free[:, j])[0, 1]
        assert abs(r) > 0.999, (j, r)
    # the two blocks weigh the same: unit mean squared norm over the training spots
    for block in (adata.obsm["X_histoclip"][:, :k], adata.obsm["X_histoclip"][:, k:]):
        centred = block - block.mean(axis=0)
        assert (centred ** 2).sum(axis=1).mean() == pytest.approx(1.0, rel=1e-3)


def test_block_scales_of_a_large_slide_come_from_a_sample_of_its_spots(fused, monkeypatch):
    """Above FIT_SAMPLE training spots the two block scales are estimated on a sample: embedding a sample of rows gives
    exactly those rows of the full embedding, and the estimate is close to the full one."""
    import histoclip.model._histoclip as mod

    model, _ = fused
    section, inputs = model._sections[0], model._train_inputs[0]
    full = model._embeddings(section, inputs, 64, scaled=False)
    rows = np.sort(np.random.default_rng(1).choice(inputs.n_obs, 90, replace=False))
    part = model._embeddings(section, inputs, 64, scaled=False, rows=rows)
    for key in ("skip", "fused", "image", "expression"):
        np.testing.assert_allclose(part[key], full[key][rows], rtol=1e-5, atol=1e-5)
    exact = model.module.block_scale.clone()
    monkeypatch.setattr(mod, "FIT_SAMPLE", 150)
    model._set_block_scale()
    sampled = model.module.block_scale.clone()
    model.module.block_scale.copy_(exact)
    assert not torch.equal(sampled, exact)
    torch.testing.assert_close(sampled, exact, rtol=0.1, atol=0)


def test_untrained_expression_latent_is_the_smoothed_pca():
    m = HistoclipModule(12, embedding_dim=4, n_components=5)
    m.expression_basis.copy_(torch.randn(12, 5))
    m.init_expression_latent_from_pca()
    e = torch.randn(7, 24)
    own, nbr = m.project(e[:, :12]), m.project(e[:, 12:])
    torch.testing.assert_close(own, e[:, :12] @ m.expression_basis)
    torch.testing.assert_close(m.expression_embedding(torch.cat([own, nbr], dim=1)), 0.5 * (own + nbr)[:, :4])


def test_a_slide_without_an_image_trains_embeds_clusters_and_plots(tmp_path, caplog):
    adata = hc.datasets.toy(rng=0)
    lib = next(iter(adata.uns["spatial"]))
    adata.uns["spatial"][lib].pop("images")
    before = adata.copy()
    with caplog.at_level("WARNING", logger="histoclip"):
        model = hc.tl.train(adata, max_epochs=2, batch_size=64, rng=0, accelerator="cpu", **TINY)
    assert "no image" in caplog.text and model.init_params["use_image"] is False
    assert set(adata.obsm) == set(before.obsm)  # training writes nothing
    hc.tl.embed(adata, model)
    assert "X_histoclip_image" not in adata.obsm and "histoclip_image_weight" not in adata.obs  # absent, not zeros
    assert adata.obsm["X_histoclip"].shape == (adata.n_obs, 10 + TINY["embedding_dim"])
    hc.tl.domains(adata, n_domains=3, rng=0)
    assert adata.uns["histoclip"]["params"]["domains"]["use_rep"] == "X_histoclip"
    truth = adata.obs["domain"].astype(str)
    assert hc.metrics.adjusted_rand(truth, adata.obs["histoclip_domain"]) > 0.5
    model.save(tmp_path / "m")
    again = HistoCLIP.load(tmp_path / "m", adata)
    np.testing.assert_allclose(again.get_latent_representation(adata), adata.obsm["X_histoclip"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without its image branch"):
        hc.tl.embed(adata, model, modality="image")


def test_starting_weights_do_not_depend_on_the_training_seed():
    """init_seed (default 0) fixes the starting weights; rng seeds only the training noise. With lr=0 nothing moves."""
    adata = hc.datasets.toy(rng=0)
    hc.pp.extract_patches(adata, size_um=110)

    def first_conv(init_seed, rng):
        model = HistoCLIP(adata, init_seed=init_seed, **TINY)
        model.train(1, batch_size=64, lr=0.0, rng=rng, accelerator="cpu")
        return model.module.image_encoder.backbone.features[0].weight.detach().clone()

    torch.testing.assert_close(first_conv(0, 1), first_conv(0, 2))
    assert not torch.equal(first_conv(None, 1), first_conv(None, 2))  # drawn from rng when init_seed is None
    with pytest.raises(ValueError, match="init_seed"):
        HistoCLIP(adata, init_seed=-1, **TINY)
    with pytest.raises(ValueError, match="skip_components"):
        HistoCLIP(adata, skip_components=-1, **TINY)
    with pytest.raises(ValueError, match="init_expression"):
        HistoCLIP(adata, init_expression="zeros", **TINY)
