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
