import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import histoclip as hc  # noqa: E402
from histoclip.tl._domain_genes import morans_i  # noqa: E402


@pytest.fixture(scope="module")
def dlpfc_genes():
    a = hc.datasets.dlpfc()
    hc.tl.domain_genes(a, groupby="layer", n_genes=10)
    return a


def _top(table, domain):
    return list(table.loc[table["domain"] == domain, "gene"])


def test_known_layer_markers(dlpfc_genes):
    t = dlpfc_genes.uns["histoclip_domain_genes"]
    assert {"MOBP", "PLP1"} <= set(_top(t, "WM"))  # white matter
    assert "PCP4" in _top(t, "L5")
    assert "HPCAL1" in _top(t, "L2")
    assert set(t.columns) >= {"domain", "rank", "gene", "score", "logfoldchange", "pval_adj", "morans_i"}
    assert (t["pval_adj"] <= 0.05).all() and (t["logfoldchange"] > 0).all() and (t["morans_i"] >= 0).all()
    assert t.groupby("domain").size().max() <= 10
    assert dlpfc_genes.uns["histoclip"]["params"]["domain_genes"]["groupby"] == "layer"


def test_morans_i_separates_patterns():
    import scipy.sparse as sp

    from histoclip.pp._graph import knn_graph

    g = np.random.default_rng(0)
    xy = np.column_stack(np.meshgrid(np.arange(20), np.arange(20))).reshape(2, -1).T.astype(float)
    graph = knn_graph(xy, 4)
    x = np.column_stack([xy[:, 0], g.normal(size=len(xy))])  # a gradient and noise
    mi = morans_i(x, graph)
    assert mi[0] > 0.8 and abs(mi[1]) < 0.15
    assert isinstance(graph, sp.csr_matrix)


def test_domain_genes_errors(toy):
    with pytest.raises(KeyError, match="run histoclip.tl.domains"):
        hc.tl.domain_genes(toy)
    toy.obs["one"] = "a"
    with pytest.raises(ValueError, match="fewer than two"):
        hc.tl.domain_genes(toy, groupby="one")


def test_domain_genes_plots(dlpfc_genes, tmp_path):
    fig = hc.pl.domain_genes(dlpfc_genes, n_genes=2, save=tmp_path / "dot.png")
    assert (tmp_path / "dot.png").stat().st_size > 1000
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == len(set(labels))
    assert {"MOBP", "PLP1"} & set(labels)
    fig = hc.pl.domain_genes(dlpfc_genes, kind="spatial")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 7  # one gene per layer, each gene once
    plt.close("all")
