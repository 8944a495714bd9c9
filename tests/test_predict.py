import numpy as np
import pytest

import histoclip as hc
from histoclip.pp._genes import expression_matrix


@pytest.fixture(scope="module")
def two_sections_model():
    hc.settings.progress = False
    train = [hc.datasets.toy(rng=i) for i in range(3)]
    for a in train:
        hc.pp.extract_patches(a, size_um=110)
    model = hc.tl.train(train, max_epochs=3, n_genes=40, rng=0, batch_size=128, accelerator="cpu")
    return model


@pytest.fixture
def query():
    q = hc.datasets.toy(rng=7)  # a section never seen in training
    hc.pp.extract_patches(q, size_um=110)
    return q


@pytest.mark.parametrize("method", ["retrieval", "regression"])
def test_predict_from_image_on_held_out_section(two_sections_model, query, method):
    model = two_sections_model
    pred = hc.tl.predict_expression(query, model, method=method, k=20)
    assert pred.shape == (query.n_obs, len(model.genes)) and list(pred.var_names) == model.genes
    assert pred.X.dtype == np.float32 and np.isfinite(pred.X).all()
    r = hc.metrics.gene_pearson(expression_matrix(query, model.genes), pred.X, model.genes)
    markers = [g for g in model.genes if int(g.split("_")[1]) < 30]  # genes that differ between the toy's bands
    assert r[markers].mean() > 0.3  # the bands look different in the image, so their markers are predictable
    assert pred.uns["histoclip"]["params"]["predict_expression"]["method"] == method
    assert "spatial" in pred.obsm and "spatial" in pred.uns


def test_query_without_counts(two_sections_model, query):
    bare = query[:, :0].copy()  # an unsequenced section: image and spots only
    pred = hc.tl.predict_expression(bare, two_sections_model)
    assert pred.n_obs == bare.n_obs and bare.n_vars == 0


def test_query_with_the_model_genes_gets_a_layer(two_sections_model, query):
    model = two_sections_model
    q = query[:, model.genes[::-1]].copy()
    assert hc.tl.predict_expression(q, model, method="regression") is None
    layer = q.layers["histoclip_predicted"]
    ref = hc.tl.predict_expression(query, model, method="regression")
    np.testing.assert_allclose(layer[:, 0], ref[:, model.genes[-1]].X.ravel(), rtol=1e-5)


def test_predict_errors_leave_query_untouched(two_sections_model, query):
    before = (set(query.obsm), set(query.layers), set(query.uns))
    with pytest.raises(ValueError, match="method"):
        hc.tl.predict_expression(query, two_sections_model, method="magic")
    with pytest.raises(ValueError, match="context"):
        hc.tl.predict_expression(query, two_sections_model, context=2)
    del query.obsm["histoclip_patch_box"]
    with pytest.raises(KeyError, match="extract_patches"):
        hc.tl.predict_expression(query, two_sections_model)
    assert (set(query.obsm) | {"histoclip_patch_box"}, set(query.layers), set(query.uns)) == before


@pytest.mark.parametrize("chunk", [None, 7])
def test_retrieve_is_the_softmax_weighted_mean_of_the_k_nearest(chunk):
    from histoclip.model._predict import retrieve

    gen = np.random.default_rng(0)
    bank = {"expression_embedding": gen.normal(size=(60, 8)).astype(np.float32),
            "expression": gen.random((60, 5)).astype(np.float32)}
    q = gen.normal(size=(23, 8)).astype(np.float32)
    got = retrieve(q, bank, k=4, temperature=0.5, chunk=chunk)
    sim = q @ bank["expression_embedding"].T
    want = np.zeros((23, 5))
    for i in range(23):
        top = np.argsort(-sim[i])[:4]
        w = np.exp(sim[i, top] / 0.5)
        want[i] = (w / w.sum()) @ bank["expression"][top]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_saved_model_predicts_without_its_training_data(two_sections_model, query, tmp_path):
    from histoclip.model import HistoCLIP

    model = two_sections_model
    before = {m: hc.tl.predict_expression(query, model, method=m, k=20).X for m in ("retrieval", "regression")}
    assert set(model.predictor_state) == {"bank", "ridge"}
    model.save(tmp_path / "m")
    loaded = HistoCLIP.load(tmp_path / "m", accelerator="cpu")  # no training data attached
    assert not loaded._sections
    for m, want in before.items():
        got = hc.tl.predict_expression(query, loaded, method=m, k=20).X
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no training data"):
        loaded.train(1)  # refused before anything changes: the saved predictors stay usable
    assert set(loaded.predictor_state) == {"bank", "ridge"}


def test_training_again_drops_the_predictors_built_from_old_weights(query):
    train = [hc.datasets.toy(rng=i) for i in range(2)]
    for a in train:
        hc.pp.extract_patches(a, size_um=110)
    model = hc.tl.train(train, max_epochs=1, n_genes=20, rng=0, batch_size=64, accelerator="cpu")
    first = hc.tl.predict_expression(query, model, method="retrieval", k=10).X
    assert "bank" in model.predictor_state
    model.train(1, batch_size=64, accelerator="cpu", rng=0)
    assert model.predictor_state == {}
    again = hc.tl.predict_expression(query, model, method="retrieval", k=10).X
    assert not np.allclose(first, again)  # the bank was rebuilt from the new weights


def test_predict_any_gene_the_training_sections_measured(two_sections_model, query, caplog):
    import logging

    from histoclip.model._predict import (
        apply_ridge,
        context_features,
        cv_groups,
        fit_ridge,
        image_representation,
        reference_bank,
        retrieve,
    )

    model = two_sections_model
    extra = [g for g in query.var_names if g not in model.genes][:3]
    assert len(extra) == 3
    genes = [model.genes[0], *extra]
    with caplog.at_level(logging.INFO, logger="histoclip"):
        reg = hc.tl.predict_expression(query, model, genes=genes)  # default: regression
    assert "predict_expression: regression on the trained 'cnn' image tower" in caplog.text
    assert list(reg.var_names) == genes and np.isfinite(reg.X).all() and (reg.X.std(0) > 0).all()
    assert reg.uns["histoclip"]["params"]["predict_expression"]["method"] == "regression"
    # the head fitted on those genes' training expression, as the default head is on the model's genes
    secs = model._sections
    x = np.concatenate([context_features(image_representation(model, s), s) for s in secs])
    y = np.concatenate([expression_matrix(s.spots.adata, genes) for s in secs])
    section, _ = model._resolve_query(query, "image")
    head = fit_ridge(x, y, cv_groups(secs))
    want = apply_ridge(context_features(image_representation(model, section), section), head)
    np.testing.assert_allclose(reg.X, want, rtol=1e-4, atol=1e-4)
    # retrieval: the same weights as for the model's genes, applied to these genes' expression
    ret = hc.tl.predict_expression(query, model, method="retrieval", genes=genes, k=20, context=0.0)
    bank = reference_bank(model)
    z = model._embed(section, None, "image", 512)
    bank["expression"] = y
    np.testing.assert_allclose(ret.X, retrieve(z, bank, 20, model.init_params["temperature"]), rtol=1e-5, atol=1e-6)
    default = hc.tl.predict_expression(query, model, method="retrieval", k=20, context=0.0)
    np.testing.assert_allclose(ret[:, model.genes[0]].X, default[:, model.genes[0]].X, rtol=1e-5, atol=1e-6)


def test_genes_not_measured_in_training_are_refused(two_sections_model, query):
    before = query.copy()
    with pytest.raises(KeyError, match="not measured in training section 0"):
        hc.tl.predict_expression(query, two_sections_model, genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="distinct"):
        hc.tl.predict_expression(query, two_sections_model, genes=["a", "a"])
    assert query.uns.keys() == before.uns.keys() and query.layers.keys() == before.layers.keys()


def test_saved_model_keeps_the_heads_of_other_genes(two_sections_model, query, tmp_path):
    from histoclip.model import HistoCLIP

    model = two_sections_model
    genes = [g for g in query.var_names if g not in model.genes][:2]
    want = {m: hc.tl.predict_expression(query, model, method=m, genes=genes, k=20).X for m in ("regression",
                                                                                              "retrieval")}
    model.save(tmp_path / "m", overwrite=True)
    loaded = HistoCLIP.load(tmp_path / "m", accelerator="cpu")
    for m, w in want.items():
        np.testing.assert_allclose(hc.tl.predict_expression(query, loaded, method=m, genes=genes, k=20).X, w,
                                   rtol=1e-5, atol=1e-6)
    other = [g for g in query.var_names if g not in model.genes][2:4]
    with pytest.raises(RuntimeError, match="no training data"):
        hc.tl.predict_expression(query, loaded, genes=other)


def test_cv_groups_are_sections_or_spatial_stripes():
    from histoclip.model._predict import spatial_stripes

    coords = np.column_stack([np.arange(100) % 10 * 2.0, np.arange(100) // 10 * 1.0])  # wider than tall
    s = spatial_stripes(coords, np.zeros(100))
    assert sorted(np.unique(s)) == [0, 1, 2, 3, 4] and np.bincount(s).tolist() == [20] * 5
    for k in range(4):  # each stripe is a band along x
        assert coords[s == k, 0].max() < coords[s == k + 1, 0].min()


def test_query_features_are_made_like_the_training_features(query):
    train = [hc.datasets.toy(rng=i) for i in range(3)]
    kw = dict(backbone="cnn-random", sizes_um=(110,), patch_px=32, tta=False, stain_norm="macenko", accelerator="cpu")
    for a in train:
        hc.tl.image_features(a, **kw)
    model = hc.tl.train(train, max_epochs=1, n_genes=20, image_features_key="X_histoclip_features", rng=0,
                        accelerator="cpu")
    q = query[:, :0].copy()
    assert "X_histoclip_features" not in q.obsm
    out = hc.tl.predict_expression(q, model)
    made = q.uns["histoclip"]["params"]["image_features"]
    assert made["stain_norm"] == "macenko" and made["img_key"] == "hires" and list(made["sizes_um"]) == [110]
    assert "stain_norm=macenko" in out.uns["histoclip"]["params"]["predict_expression"]["features"]
