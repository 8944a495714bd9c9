"""Domain genes worth reading: specific to their domain, different between domains, grouped by domain in the plot."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import histoclip as hc  # noqa: E402

UBIQUITOUS = {"NRGN", "NDUFA4", "YWHAH"}  # in ~97% of DLPFC's spots, at most 2-fold higher in any layer


@pytest.fixture(scope="module")
def dlpfc():
    a = hc.datasets.dlpfc()
    hc.tl.domain_genes(a, groupby="layer", n_genes=100)  # deep lists: a filtered gene is not merely ranked low
    return a


def test_top_genes_are_specific_and_differ_between_domains(dlpfc):
    t = dlpfc.uns["histoclip_domain_genes"]
    assert not t["gene"].duplicated().any()  # each gene for one domain only
    assert (t["logfoldchange"] >= 1.0).all() and (t["frac_in_domain"] >= 0.25).all()
    assert not UBIQUITOUS & set(t["gene"])
    tops = {d: set(df["gene"].head(5)) for d, df in t.groupby("domain")}
    assert len(tops) == 7 and all(len(v) >= 3 for v in tops.values())
    assert (t.groupby("domain")["specificity"].apply(lambda v: v.is_monotonic_decreasing)).all()
    params = dlpfc.uns["histoclip"]["params"]["domain_genes"]
    assert params["min_logfoldchange"] == 1.0 and params["unique"] is True


def test_layer_markers_stay_on_top(dlpfc):
    t = dlpfc.uns["histoclip_domain_genes"]
    top = {d: list(df.sort_values("rank")["gene"]) for d, df in t.groupby("domain")}
    assert {"MOBP", "PLP1"} <= set(top["WM"][:5])
    assert top["L5"][0] == "PCP4"
    assert "HPCAL1" in top["L2"][:3]


def test_without_the_filters_ubiquitous_genes_come_back():
    a = hc.datasets.dlpfc()
    hc.tl.domain_genes(a, groupby="layer", n_genes=100, min_logfoldchange=0.0, min_in_fraction=0.0, unique=False)
    t = a.uns["histoclip_domain_genes"]
    assert UBIQUITOUS & set(t["gene"])  # the filters are what removes them
    assert t["gene"].duplicated().any()
    with pytest.raises(ValueError, match="fractions of spots"):
        hc.tl.domain_genes(a, groupby="layer", max_out_fraction=50)


def test_dotplot_groups_genes_by_domain(dlpfc):
    fig = hc.pl.domain_genes(dlpfc, n_genes=3)
    ax = fig.axes[0]
    genes = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    labels = [t.get_text() for t in ax.texts]  # the bracket labels above the gene blocks
    assert labels == rows  # one block per domain, in the order of the rows
    t = dlpfc.uns["histoclip_domain_genes"]
    owner = dict(zip(t["gene"], t["domain"], strict=True))
    blocks = [owner[g] for g in genes]
    assert blocks == sorted(blocks, key=rows.index)  # each domain's genes side by side
    assert len(genes) == len(set(genes)) == 21
    plt.close("all")
