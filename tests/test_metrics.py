import numpy as np
import pytest

from histoclip import metrics


def test_domain_scores_ignore_unlabelled():
    truth = np.array(["a", "a", "b", "b", None, np.nan], dtype=object)
    pred = np.array(["0", "0", "1", "1", "1", "0"])
    s = metrics.domain_scores(truth, pred)
    assert s["ari"] == pytest.approx(1.0) and s["nmi"] == pytest.approx(1.0) and s["n_labelled"] == 4
    assert metrics.adjusted_rand(["a", "a", "b", "b"], ["0", "1", "0", "1"]) < 0.1
    assert metrics.homogeneity(["a", "a", "b", "b"], ["0", "1", "2", "3"]) == pytest.approx(1.0)
    assert metrics.completeness(["a", "a", "b", "b"], ["0", "1", "2", "3"]) < 1.0


def test_domain_scores_length_mismatch():
    with pytest.raises(ValueError, match="must match"):
        metrics.adjusted_rand([1, 2], [1])


def test_gene_pearson():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(50, 3))
    p = m.copy()
    p[:, 1] = -m[:, 1]
    p[:, 2] = 1.0  # constant prediction: r undefined, reported as 0
    r = metrics.gene_pearson(m, p, genes=["g0", "g1", "g2"])
    assert r["g0"] == pytest.approx(1.0) and r["g1"] == pytest.approx(-1.0) and r["g2"] == 0.0
    np.testing.assert_allclose(r["g0"], np.corrcoef(m[:, 0], p[:, 0])[0, 1])
