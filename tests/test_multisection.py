"""Several sections at once (issue 14): one panel per section with one colour per domain, each domain's share of
each section, and domain markers ranked within each section."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

import histoclip as hc  # noqa: E402
from histoclip.pl._utils import palette  # noqa: E402


def two_sections() -> ad.AnnData:
    """Two toy slides (libraries "A" and "B", different images and counts) concatenated as users do."""
    parts = {}
    for lib, seed in (("A", 0), ("B", 1)):
        a = hc.datasets.toy(rng=seed)
        a.uns["spatial"] = {lib: a.uns["spatial"]["toy"]}
        parts[lib] = a
    adata = ad.concat(parts, label="slice", uns_merge="unique", index_unique="-")
    dom = adata.obs["domain"].astype(str).to_numpy().copy()
    on_b = (adata.obs["slice"] == "B").to_numpy()
    x = adata.obsm["spatial"][:, 0]
    dom[on_b & (dom == "2") & (x > np.median(x[on_b & (dom == "2")]))] = "only_B"  # a domain of section B alone
    adata.obs["dom"] = pd.Categorical(dom, categories=["0", "1", "2", "only_B"])
    return adata


@pytest.fixture
def sections():
    return two_sections()


def _spot_rgb(ax) -> np.ndarray:
    (coll,) = ax.collections
    return np.asarray(coll.get_facecolors())[:, :3]


# ------------------------------------------------------------------------------------------------- pl.domains
def test_domains_one_panel_per_section_one_colour_per_domain(sections, tmp_path):
    adata = sections
    axes = hc.pl.domains(adata, color="dom", library_key="slice", ncols=2, save=tmp_path / "d.png")
    assert isinstance(axes, list) and len(axes) == 2
    assert [a.get_title() for a in axes] == ["A", "B"]
    assert all(len(a.images) == 1 for a in axes)  # each over its own H&E
    assert not np.array_equal(axes[0].images[0].get_array(), axes[1].images[0].get_array())
    colors = palette(["0", "1", "2", "only_B"])
    for a, lib in zip(axes, ["A", "B"], strict=True):
        on = (adata.obs["slice"] == lib).to_numpy()
        expected = np.array([to_rgb(colors[c]) for c in adata.obs["dom"].astype(str)[on]])
        np.testing.assert_allclose(_spot_rgb(a), expected, atol=1e-6)  # domain -> colour, the same on both panels
        assert a.get_legend() is None
    fig = axes[0].figure
    assert len(fig.legends) == 1  # one legend, with every domain of the column, including B's own
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0", "1", "2", "only_B"]
    assert (tmp_path / "d.png").stat().st_size > 1000
    plt.close("all")


def test_domains_choose_libraries_and_axes(sections):
    adata = sections
    axes = hc.pl.domains(adata, color="dom", library_key="slice", library_id=["B", "A"])
    assert [a.get_title() for a in axes] == ["B", "A"]
    n_b = int((adata.obs["slice"] == "B").sum())
    assert len(axes[0].collections[0].get_offsets()) == n_b
    one = hc.pl.domains(adata, color="dom", library_key="slice", library_id="B")
    assert isinstance(one, matplotlib.axes.Axes) and one.get_title() == "dom (B)"
    assert len(one.collections[0].get_offsets()) == n_b  # only B's spots, over B's image
    _, given = plt.subplots(1, 2)
    assert hc.pl.domains(adata, color="dom", library_key="slice", ax=given) == list(given)
    with pytest.raises(ValueError, match="pass a list of 2 Axes"):
        hc.pl.domains(adata, color="dom", library_key="slice", ax=given[0])
    with pytest.raises(ValueError, match="must hold 2 matplotlib Axes"):
        hc.pl.domains(adata, color="dom", library_key="slice", ax=[given[0]])
    with pytest.raises(KeyError, match=r"\['C'\] not found.*\['A', 'B'\]"):
        hc.pl.domains(adata, color="dom", library_key="slice", library_id=["A", "C"])
    with pytest.raises(ValueError, match="pass library_key"):
        hc.pl.domains(adata, color="dom", library_id=["A", "B"])
    with pytest.raises(ValueError, match="library_key=... naming the adata.obs column"):
        hc.pl.domains(adata, color="dom")  # two libraries and nothing saying which spot is whose
    with pytest.raises(KeyError, match="library_key 'nope'"):
        hc.pl.domains(adata, color="dom", library_key="nope")
    plt.close("all")


def test_domains_reference_colours_matched_over_all_sections(sections):
    adata = sections
    names = {"0": "c", "1": "a", "2": "b", "only_B": "d"}
    adata.obs["renamed"] = pd.Categorical(adata.obs["dom"].astype(str).map(names))
    ref = hc.pl.domains(adata, color="dom", library_key="slice")
    got = hc.pl.domains(adata, color="renamed", reference="dom", library_key="slice")
    for r, g in zip(ref, got, strict=True):  # each renamed domain takes the colour of its partner, on every panel
        np.testing.assert_allclose(_spot_rgb(g), _spot_rgb(r), atol=1e-6)
    labels = [t.get_text() for t in got[0].figure.legends[0].get_texts()]
    assert labels == ["a (1)", "b (2)", "c (0)", "d (only_B)"]
    plt.close("all")


def test_image_weight_panels_share_one_colour_scale(sections):
    adata = sections
    on_b = (adata.obs["slice"] == "B").to_numpy()
    adata.obs["histoclip_image_weight"] = np.where(on_b, 0.6, 0.2) + np.linspace(0, 0.1, adata.n_obs)
    axes = hc.pl.image_weight(adata, library_key="slice")
    assert len(axes) == 2
    lims = [a.collections[0].get_clim() for a in axes]
    w = adata.obs["histoclip_image_weight"].to_numpy()
    assert lims[0] == lims[1] == pytest.approx((w.min(), w.max()))  # not each section's own range
    assert len(axes[0].figure.axes) == 3  # two panels and one colour bar
    with pytest.raises(ValueError, match="pass a list of 2 Axes"):
        _, ax = plt.subplots()
        hc.pl.image_weight(adata, library_key="slice", ax=ax)
    plt.close("all")


def two_region_spatialdata():
    """Two copies of the bundled Space Ranger folder in one SpatialData, one table annotating both regions."""
    spatialdata = pytest.importorskip("spatialdata")
    spatialdata_io = pytest.importorskip("spatialdata_io")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata's notes on dtypes of the region column
        parts = {k: spatialdata_io.visium(hc.datasets.visium_toy(), dataset_id=k) for k in ("a", "b")}
        sdata = spatialdata.concatenate(parts, concatenate_tables=True)
    table = sdata.tables["table"]
    x = table.obsm["spatial"][:, 0]
    table.obs["dom"] = pd.Categorical(np.where(x > np.median(x), "right", "left"))
    return sdata


def test_domains_spatialdata_with_several_regions():
    sdata = two_region_spatialdata()
    table = sdata.tables["table"]
    regions = list(table.uns["spatialdata_attrs"]["region"])
    axes = hc.pl.domains(sdata, color="dom")
    assert [a.get_title() for a in axes] == regions
    for a, region in zip(axes, regions, strict=True):
        assert len(a.images) == 1
        assert len(a.collections[0].get_offsets()) == int((table.obs["region"] == region).sum())
    lowres = {r: next(k for k in sdata.images if k.startswith(r[0]) and "lowres" in k) for r in regions}
    axes = hc.pl.domains(sdata, color="dom", image_key=lowres)
    assert axes[0].images[0].get_array().shape[0] == sdata.images[lowres[regions[0]]].shape[1]
    with pytest.raises(ValueError, match="names one image"):
        hc.pl.domains(sdata, color="dom", image_key=lowres[regions[0]])
    one = hc.pl.domains(sdata, color="dom", library_id=regions[1])
    assert one.get_title() == f"dom ({regions[1]})"
    plt.close("all")


# ------------------------------------------------------------------------------------------ tl/pl.domain_shares
def test_domain_shares_table(sections, tmp_path):
    adata = sections
    out = hc.tl.domain_shares(adata, groupby="dom", library_key="slice", copy=True)
    assert "histoclip_domain_shares" not in adata.uns  # copy= leaves the input alone
    t = out.uns["histoclip_domain_shares"]
    assert list(t.index) == ["0", "1", "2", "only_B"]
    shares = t.filter(like="share_")
    assert list(shares.columns) == ["share_A", "share_B"]
    np.testing.assert_allclose(shares.sum(axis=0), 1.0)
    counts = pd.crosstab(adata.obs["dom"], adata.obs["slice"])
    np.testing.assert_array_equal(t[["n_A", "n_B"]].to_numpy(), counts.loc[t.index, ["A", "B"]].to_numpy())
    assert t.loc["only_B", "single_section"] and t.loc["only_B", "sections"] == "B"
    assert t.loc["only_B", "share_A"] == 0 and t.loc["only_B", "n_sections"] == 1
    assert not t.loc[["0", "1", "2"], "single_section"].any()
    assert out.uns["histoclip"]["params"]["domain_shares"]["min_share"] == 0.02
    out.write_h5ad(tmp_path / "a.h5ad")  # the table and its params are h5ad-serialisable
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["histoclip_domain_shares"]
    pd.testing.assert_frame_equal(back, t, check_names=False, check_index_type=False)


def test_domain_shares_threshold(sections):
    adata = sections
    dom = adata.obs["dom"].astype(str).to_numpy().copy()
    dom[0] = "only_B"  # one stray spot on A: 1 of 256 spots is under the 2% threshold
    adata.obs["dom"] = pd.Categorical(dom)
    hc.tl.domain_shares(adata, groupby="dom", library_key="slice")
    t = adata.uns["histoclip_domain_shares"]
    assert t.loc["only_B", "n_A"] == 1 and t.loc["only_B", "single_section"]
    hc.tl.domain_shares(adata, groupby="dom", library_key="slice", min_share=0.001)
    assert not adata.uns["histoclip_domain_shares"].loc["only_B", "single_section"]


def test_domain_shares_errors(sections):
    adata = sections
    with pytest.raises(ValueError, match="pass library_key"):
        hc.tl.domain_shares(adata, groupby="dom")
    with pytest.raises(KeyError, match="library_key 'nope'"):
        hc.tl.domain_shares(adata, groupby="dom", library_key="nope")
    with pytest.raises(KeyError, match="run histoclip.tl.domains"):
        hc.tl.domain_shares(adata, library_key="slice")
    with pytest.raises(ValueError, match="min_share"):
        hc.tl.domain_shares(adata, groupby="dom", library_key="slice", min_share=1.5)
    with pytest.raises(KeyError, match="run histoclip.tl.domain_shares"):
        hc.pl.domain_shares(adata)
    assert "histoclip" not in adata.uns  # nothing half-written


def test_domain_shares_plot_colours_match_domains(sections, tmp_path):
    adata = sections
    hc.tl.domain_shares(adata, groupby="dom", library_key="slice")
    ax = hc.pl.domain_shares(adata, save=tmp_path / "s.png")
    colors = palette(["0", "1", "2", "only_B"])
    bars = ax.patches  # domain by domain, one bar per section
    assert len(bars) == 4 * 2
    for i, d in enumerate(["0", "1", "2", "only_B"]):
        for j in range(2):
            assert to_rgb(bars[2 * i + j].get_facecolor()) == pytest.approx(to_rgb(colors[d]))
        assert bool(bars[2 * i].get_hatch()) == (d == "only_B")  # the one-section domain stands out
    heights = np.array([b.get_height() for b in bars]).reshape(4, 2)
    np.testing.assert_allclose(heights.sum(axis=0), 1.0)
    assert "only_B (only on B)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert (tmp_path / "s.png").stat().st_size > 1000
    plt.close("all")


def test_domain_shares_spatialdata_uses_the_region_column():
    sdata = two_region_spatialdata()
    hc.tl.domain_shares(sdata, groupby="dom")
    t = sdata.tables["table"].uns["histoclip_domain_shares"]
    regions = list(sdata.tables["table"].uns["spatialdata_attrs"]["region"])
    assert list(t.filter(like="share_").columns) == [f"share_{r}" for r in regions]
    assert sdata.tables["table"].uns["histoclip"]["params"]["domain_shares"]["library_key"] == "region"


# ----------------------------------------------------------------------------------- domain_genes per section
@pytest.fixture(scope="module")
def planted():
    """Two sections where domain "0" has a different extra marker on each: gene_50 on A, gene_51 on B."""
    adata = two_sections()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X).copy()
    dom0 = (adata.obs["domain"].astype(str) == "0").to_numpy()
    on_a = (adata.obs["slice"] == "A").to_numpy()
    for gene, sel in (("gene_50", dom0 & on_a), ("gene_51", dom0 & ~on_a)):
        j = adata.var_names.get_loc(gene)
        x[sel, j] = x[sel, j] * 8 + 40
    adata.X = x
    pooled = hc.tl.domain_genes(adata, groupby="domain", n_genes=5, library_key="slice", copy=True)
    per = hc.tl.domain_genes(adata, groupby="domain", n_genes=5, library_key="slice", section_key="slice", copy=True)
    return adata, pooled, per


def test_domain_genes_per_section_find_each_sections_marker(planted):
    _, _, per = planted
    t = per.uns["histoclip_domain_genes"]
    assert list(t.columns[:2]) == ["section", "domain"]
    assert list(dict.fromkeys(t["section"])) == ["A", "B"]  # one block per section
    top = {s: list(t[(t["section"] == s) & (t["domain"] == "0")].sort_values("rank")["gene"]) for s in ("A", "B")}
    assert top["A"][0] == "gene_50" and "gene_51" not in top["A"]
    assert top["B"][0] == "gene_51" and "gene_50" not in top["B"]
    agree = t.set_index(["section", "domain", "gene"])
    assert agree.loc[("A", "0", "gene_50"), "n_sections_marker"] == 1
    assert (t["n_sections_tested"] == 2).all()
    shared = t[(t["domain"] == "0") & (t["n_sections_marker"] == 2)]["gene"]
    assert len(shared) >= 2  # the toy's own domain-0 markers hold on both sections
    assert per.uns["histoclip"]["params"]["domain_genes"]["section_key"] == "slice"


def test_domain_genes_per_section_domain_on_one_section(planted):
    adata, _, _ = planted
    out = hc.tl.domain_genes(adata, groupby="dom", n_genes=3, min_morans_i=-1.0, max_pval_adj=1.0,
                             section_key="slice", copy=True)
    t = out.uns["histoclip_domain_genes"]
    only = t[t["domain"] == "only_B"]
    assert len(only) > 0 and set(only["section"]) == {"B"}  # ranked where it exists, and only there
    assert (only["n_sections_tested"] == 1).all()
    assert (t.loc[t["domain"] == "0", "n_sections_tested"] == 2).all()


def test_domain_genes_without_section_key_is_unchanged(planted):
    adata, pooled, _ = planted
    t = pooled.uns["histoclip_domain_genes"]
    assert list(t.columns) == ["domain", "rank", "gene", "specificity", "score", "logfoldchange", "pval_adj",
                               "morans_i", "frac_in_domain", "frac_elsewhere"]
    assert "section_key" not in pooled.uns["histoclip"]["params"]["domain_genes"]
    # on one section, ranking per section is the plain ranking plus the section columns
    one = adata[adata.obs["slice"] == "A"].copy()
    plain = hc.tl.domain_genes(one, groupby="domain", n_genes=5, copy=True).uns["histoclip_domain_genes"]
    per = hc.tl.domain_genes(one, groupby="domain", n_genes=5, section_key="slice", copy=True)
    per = per.uns["histoclip_domain_genes"]
    assert (per["section"] == "A").all() and (per["n_sections_marker"] == 1).all()
    pd.testing.assert_frame_equal(per.drop(columns=["section", "n_sections_marker", "n_sections_tested"]), plain)


def test_domain_genes_per_section_errors(planted):
    adata, _, _ = planted
    with pytest.raises(KeyError, match="section_key 'nope'"):
        hc.tl.domain_genes(adata, groupby="domain", section_key="nope")
    with pytest.raises(ValueError, match="min_spots"):
        hc.tl.domain_genes(adata, groupby="domain", section_key="slice", min_spots=1)
    with pytest.raises(ValueError, match="No section"):
        hc.tl.domain_genes(adata, groupby="domain", section_key="slice", min_spots=10_000)
    assert "histoclip_domain_genes" not in adata.uns


def test_domain_genes_plots_per_section(planted):
    _, pooled, per = planted
    fig = hc.pl.domain_genes(per, n_genes=2)
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert rows == [f"{d} · {s}" for d in ("0", "1", "2") for s in ("A", "B")]  # one row per (domain, section)
    fig = hc.pl.domain_genes(per, n_genes=1, section="B")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2"]
    assert fig.axes[0].get_xticklabels()[0].get_text() == "gene_51"
    fig = hc.pl.domain_genes(per, kind="spatial", section="A")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "gene_50 (domain 0)"
    n_a = int((per.obs["slice"] == "A").sum())
    assert len(fig.axes[0].collections[0].get_offsets()) == n_a  # section A's spots over A's image
    with pytest.raises(ValueError, match="pass section="):
        hc.pl.domain_genes(per, kind="spatial")
    with pytest.raises(KeyError, match="section 'C'"):
        hc.pl.domain_genes(per, section="C")
    with pytest.raises(ValueError, match="not per section"):
        hc.pl.domain_genes(pooled, section="A")
    plt.close("all")
