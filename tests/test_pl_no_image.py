"""Every figure works on a slide without an image: spots on a blank background, at their size in microns."""

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import histoclip as hc  # noqa: E402


@pytest.fixture(params=["no_images", "no_uns_spatial"])
def bare(request):
    """The toy slide (hexagonal grid 100 um apart) with domains and domain genes, without an image."""
    a = hc.datasets.toy()
    if request.param == "no_images":
        del a.uns["spatial"]["toy"]["images"]
    else:
        del a.uns["spatial"]
    hc.tl.domains(a, n_domains=3, n_genes=50, n_init=2)
    return a


def _spot_width(ax) -> float:
    """The drawn spot diameter in data units (pixels of obsm['spatial'] here)."""
    return float(ax.collections[0].get_widths()[0])  # EllipseCollection widths, units="xy"


def test_domains(bare, caplog):
    with caplog.at_level(logging.INFO, logger="histoclip"):
        ax = hc.pl.domains(bare)
    assert len(ax.images) == 0 and len(ax.collections) == 1  # no image, the spots
    assert len(ax.collections[0].get_offsets()) == bare.n_obs
    assert "has no image" in caplog.text and "blank background" in caplog.text
    # the spot is drawn at its size: 55 um (metadata) or Visium's 65 um from the lattice, 1 um per unit
    expected = 55.0 if "spatial" in bare.uns else 65.0
    assert _spot_width(ax) == pytest.approx(expected)
    plt.close("all")


def test_domain_genes_dotplot_and_spatial(bare):
    hc.tl.domain_genes(bare, groupby="domain", n_genes=3)
    fig = hc.pl.domain_genes(bare, n_genes=2)
    assert len(fig.axes[0].get_xticklabels()) > 0
    fig = hc.pl.domain_genes(bare, kind="spatial")
    maps = [ax for ax in fig.axes if ax.get_title()]
    assert maps and all(len(ax.images) == 0 and len(ax.collections) == 1 for ax in maps)
    plt.close("all")


def test_image_weight(bare):
    bare.obs["histoclip_image_weight"] = np.linspace(0, 1, bare.n_obs)
    ax = hc.pl.image_weight(bare)
    assert len(ax.images) == 0 and len(ax.collections[0].get_offsets()) == bare.n_obs
    plt.close("all")


def test_predicted_expression_and_gene_correlation(bare):
    from histoclip.metrics import gene_pearson
    from histoclip.pp._genes import expression_matrix

    genes = list(bare.var_names[:2])
    import anndata as ad

    pred = ad.AnnData(np.asarray(expression_matrix(bare, genes), dtype=np.float32), obs=bare.obs[[]].copy())
    pred.var_names = genes
    fig = hc.pl.predicted_expression(bare, pred, genes)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4 and all(len(ax.images) == 0 for ax in panels)
    ax = hc.pl.gene_correlation(gene_pearson(np.asarray(pred.X), np.asarray(pred.X), genes))
    assert len(ax.patches) > 0
    plt.close("all")


def test_domain_shares_and_embedding(bare):
    bare.obs["section"] = np.where(np.arange(bare.n_obs) % 2, "a", "b")
    hc.tl.domain_shares(bare, library_key="section")
    ax = hc.pl.domain_shares(bare)
    assert len(ax.patches) > 0
    bare.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(bare.n_obs, 4)).astype(np.float32)
    ax = hc.pl.embedding(bare)
    assert len(ax.collections) >= 1
    plt.close("all")


def test_one_library_with_an_image_and_one_without():
    import anndata as ad

    a, b = hc.datasets.toy(), hc.datasets.toy()
    both = ad.concat({"toy": a, "bare": b}, label="lib", index_unique="-")
    entry = a.uns["spatial"]["toy"]
    both.uns["spatial"] = {"toy": entry, "bare": {"scalefactors": dict(entry["scalefactors"]),
                                                  "metadata": dict(entry["metadata"])}}
    axes = hc.pl.domains(both, color="domain", library_key="lib")
    assert [ax.get_title() for ax in axes] == ["toy", "bare"]
    assert [len(ax.images) for ax in axes] == [1, 0]
    # the same spots at the same physical size on both panels (pixels of the hires image vs full resolution)
    scalef = entry["scalefactors"]["tissue_hires_scalef"]
    assert _spot_width(axes[0]) == pytest.approx(_spot_width(axes[1]) * scalef)
    plt.close("all")
