import numpy as np
import pandas as pd
import pytest

import histoclip as hc


def test_embed_writes_documented_keys(trained):
    model, adata = trained
    adata = adata.copy()
    hc.tl.embed(adata, model)
    # the keys listed in embed's docstring, with their documented widths and dtype
    doc = hc.tl.embed.__doc__
    for key, width in (("X_histoclip", 42), ("X_histoclip_image", 32), ("X_histoclip_expression", 32)):
        assert f'obsm["{key}"]' in doc
        assert adata.obsm[key].shape == (adata.n_obs, width) and adata.obsm[key].dtype == np.float32
    assert 'uns["histoclip"]["params"]["embed"]' in doc
    assert adata.uns["histoclip"]["params"]["embed"]["seed"] == 0


def test_embed_image_only_query_without_counts(trained):
    model, adata = trained
    query = adata.copy()
    query = query[:, :0].copy()  # no genes at all: an unsequenced section
    hc.tl.embed(query, model, modality="image")
    assert query.obsm["X_histoclip_image"].shape == (adata.n_obs, 32)
    assert "X_histoclip" not in query.obsm


def test_embed_missing_genes_leaves_adata_untouched(trained):
    model, adata = trained
    query = adata[:, 5:].copy()
    before = set(query.obsm.keys())
    with pytest.raises(KeyError, match="absent from adata.var_names"):
        hc.tl.embed(query, model)
    assert set(query.obsm.keys()) == before


@pytest.mark.parametrize("method", ["gmm", "leiden", "kmeans"])
def test_domains_methods(trained, method):
    model, adata = trained
    adata = adata.copy()
    hc.tl.embed(adata, model)
    hc.tl.domains(adata, n_domains=3, method=method, use_rep="X_histoclip", rng=0)
    dom = adata.obs["histoclip_domain"]
    assert isinstance(dom.dtype, pd.CategoricalDtype)
    assert list(dom.cat.categories) == ["0", "1", "2"]
    params = adata.uns["histoclip"]["params"]["domains"]
    assert params["method"] == method and params["seed"] == 0 and params["n_domains"] == 3
    assert hc.metrics.adjusted_rand(adata.obs["domain"], dom) > 0.5  # toy bands are easy


def test_domains_seeded(trained):
    model, adata = trained
    adata = adata.copy()
    hc.tl.embed(adata, model)
    a = hc.tl.domains(adata, n_domains=3, rng=3, copy=True).obs["histoclip_domain"]
    b = hc.tl.domains(adata, n_domains=3, rng=3, copy=True).obs["histoclip_domain"]
    assert (a == b).all()


def test_domains_errors(trained):
    model, adata = trained
    adata = adata.copy()
    with pytest.raises(KeyError, match="run histoclip.tl.embed"):
        hc.tl.domains(adata, n_domains=3, use_rep="X_histoclip")
    adata.obsm["X_histoclip"] = np.zeros((adata.n_obs, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="needs at least 514 spots"):
        hc.tl.domains(adata, n_domains=adata.n_obs + 1)
    with pytest.raises(ValueError, match="method"):
        hc.tl.domains(adata, n_domains=3, method="mclust")
    assert "histoclip_domain" not in adata.obs


def test_refine_majority_vote():
    import scipy.sparse as sp

    from histoclip.tl._domains import refine_labels

    # a path graph 0-1-2-3-4 ; the lone "b" in the middle is outvoted
    a = sp.diags([np.ones(4), np.ones(4)], [1, -1], shape=(5, 5)).tocsr()
    out = refine_labels(np.array(["a", "a", "b", "a", "a"]), a)
    assert out.tolist() == ["a"] * 5


def test_spatialdata_end_to_end(toy_sdata):
    hc.pp.extract_patches(toy_sdata, size_um=110)
    model = hc.tl.train(toy_sdata, max_epochs=1, n_genes=20, accelerator="cpu")
    hc.tl.embed(toy_sdata, model)
    hc.tl.domains(toy_sdata, n_domains=3)
    table = toy_sdata.tables["table"]
    assert table.obsm["X_histoclip"].shape[0] == table.n_obs
    assert table.obs["histoclip_domain"].nunique() == 3


def test_default_domains_use_expression_pca_without_a_model(toy):
    hc.tl.domains(toy, n_domains=3, rng=0)
    assert toy.uns["histoclip"]["params"]["domains"]["use_rep"] == "expression_pca"
    assert hc.metrics.adjusted_rand(toy.obs["domain"], toy.obs["histoclip_domain"]) > 0.8
    again = hc.tl.domains(toy, n_domains=3, rng=0, use_rep="expression_pca", copy=True)
    assert (again.obs["histoclip_domain"] == toy.obs["histoclip_domain"]).all()
