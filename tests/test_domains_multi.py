"""tl.domains over several sections: one labelling for all, batch centering, lists, and errors before any write."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import histoclip as hc


def _shifted(adata, seed=1, sd=3.0):
    """A copy whose counts are rescaled per gene (a section-wide shift: depth, chemistry, capture efficiency)."""
    out = adata.copy()
    r = np.random.default_rng(seed)
    x = sp.csr_matrix(out.X).astype(np.float64)
    x = x.multiply(np.exp(r.normal(0, sd, x.shape[1]))[None, :]).tocsr()
    x.data = np.round(x.data)
    x.eliminate_zeros()
    out.X = x.astype(np.float32)
    return out


def _pooled_ari(tables):
    truth = np.concatenate([t.obs["domain"].astype(str).to_numpy() for t in tables])
    pred = np.concatenate([t.obs["histoclip_domain"].astype(str).to_numpy() for t in tables])
    return hc.metrics.adjusted_rand(truth, pred)


def test_list_of_sections_gets_one_labelling():
    a, b = hc.datasets.toy(rng=0), hc.datasets.toy(rng=1)
    hc.tl.domains([a, b], n_domains=3, rng=0)
    cats_a = list(a.obs["histoclip_domain"].cat.categories)
    assert cats_a == list(b.obs["histoclip_domain"].cat.categories)
    assert set(a.obs["histoclip_domain"]) == set(b.obs["histoclip_domain"]) == set(cats_a)
    # the same tissue gets the same label on both sections
    assert _pooled_ari([a, b]) > 0.8
    rec = a.uns["histoclip"]["params"]["domains"]
    assert list(rec["sections"]) == ["0:toy", "1:toy"] and rec["batch_correction"] == "center"
    assert list(b.uns["histoclip"]["params"]["domains"]["sections"]) == list(rec["sections"])


def test_centering_removes_a_section_wide_shift():
    a, b = hc.datasets.toy(rng=0), _shifted(hc.datasets.toy(rng=1))
    hc.tl.domains([a, b], n_domains=3, rng=0, batch_correction=None)
    raw = _pooled_ari([a, b])
    hc.tl.domains([a, b], n_domains=3, rng=0)
    centred = _pooled_ari([a, b])
    assert centred > 0.8
    assert centred > raw + 0.2  # without the centering the shift splits the domains by section


def test_library_key_equals_list():
    a, b = hc.datasets.toy(rng=0), _shifted(hc.datasets.toy(rng=1))
    a.uns["spatial"] = {"A": a.uns["spatial"]["toy"]}
    b.uns["spatial"] = {"B": b.uns["spatial"]["toy"]}
    both = ad.concat({"A": a, "B": b}, label="slice", uns_merge="unique", index_unique="-")
    hc.tl.domains(both, n_domains=3, rng=0, library_key="slice")
    hc.tl.domains([a, b], n_domains=3, rng=0)
    joined = np.concatenate([a.obs["histoclip_domain"].to_numpy(), b.obs["histoclip_domain"].to_numpy()])
    assert (both.obs["histoclip_domain"].to_numpy() == joined).all()
    assert list(both.uns["histoclip"]["params"]["domains"]["sections"]) == ["A", "B"]


def test_copy_returns_a_list_and_leaves_inputs_alone():
    a, b = hc.datasets.toy(rng=0), hc.datasets.toy(rng=1)
    out = hc.tl.domains([a, b], n_domains=3, rng=0, copy=True)
    assert isinstance(out, list) and len(out) == 2
    assert all("histoclip_domain" in o.obs for o in out)
    assert "histoclip_domain" not in a.obs and "histoclip_domain" not in b.obs


def test_missing_embedding_on_one_section_writes_nothing():
    a, b = hc.datasets.toy(rng=0), hc.datasets.toy(rng=1)
    a.obsm["X_emb"] = np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32)
    with pytest.raises(KeyError, match=r"data\[1\].*X_emb.*tl.embed"):
        hc.tl.domains([a, b], n_domains=3, use_rep="X_emb")
    assert "histoclip_domain" not in a.obs and "histoclip" not in a.uns
    b.obsm["X_emb"] = np.zeros((b.n_obs, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="different widths"):
        hc.tl.domains([a, b], n_domains=3, use_rep="X_emb")


def test_embeddings_are_centred_per_section():
    a, b = hc.datasets.toy(rng=0), hc.datasets.toy(rng=1)
    r = np.random.default_rng(0)
    for t in (a, b):
        onehot = np.eye(3, dtype=np.float32)[t.obs["domain"].cat.codes.to_numpy()] * 5
        t.obsm["X_emb"] = onehot + r.normal(0, 0.5, onehot.shape).astype(np.float32)
    b.obsm["X_emb"] = b.obsm["X_emb"] + 40.0  # a whole-section offset larger than the domain differences
    hc.tl.domains([a, b], n_domains=3, use_rep="X_emb", rng=0, batch_correction=None, n_hops=0)
    assert _pooled_ari([a, b]) < 0.6
    hc.tl.domains([a, b], n_domains=3, use_rep="X_emb", rng=0, n_hops=0)
    assert _pooled_ari([a, b]) > 0.9


def test_bad_arguments_for_several_sections():
    a = hc.datasets.toy(rng=0)
    b = hc.datasets.toy(rng=1)
    b.var_names = [f"other_{i}" for i in range(b.n_vars)]
    with pytest.raises(ValueError, match="share no gene"):
        hc.tl.domains([a, b], n_domains=3)
    with pytest.raises(ValueError, match="batch_correction"):
        hc.tl.domains(a, n_domains=3, batch_correction="harmony")
    with pytest.raises(ValueError, match="empty list"):
        hc.tl.domains([], n_domains=3)
    assert "histoclip_domain" not in a.obs


def test_list_of_spatialdata_objects():
    from .conftest import toy_spatialdata

    a, b = toy_spatialdata(hc.datasets.toy(rng=0)), toy_spatialdata(_shifted(hc.datasets.toy(rng=1)))
    hc.tl.domains([a, b], n_domains=3, rng=0)
    tables = [a.tables["table"], b.tables["table"]]
    assert all("histoclip_domain" in t.obs for t in tables)
    assert _pooled_ari(tables) > 0.8
    with pytest.raises(ValueError, match="copy=True"):
        hc.tl.domains([a, b], n_domains=3, copy=True)


def test_spatialdata_table_over_several_regions():
    from .test_multisection import two_region_spatialdata

    sdata = two_region_spatialdata()
    table = sdata.tables["table"]
    regions = [str(r) for r in table.uns["spatialdata_attrs"]["region"]]
    hc.tl.domains(sdata, n_domains=3, rng=0, n_genes=50)
    labels = table.obs["histoclip_domain"]
    assert labels.notna().all() and labels.nunique() == 3
    assert list(table.uns["histoclip"]["params"]["domains"]["sections"]) == regions
    # the two regions are copies of one slide: the same spot gets the same domain on both
    first, second = (table.obs["region"].astype(str) == r for r in regions)
    assert (labels[first].to_numpy() == labels[second].to_numpy()).mean() > 0.95
    # domains need no image: the same labels without any
    bare = type(sdata)(shapes=dict(sdata.shapes), tables={"table": table.copy()})
    hc.tl.domains(bare, n_domains=3, rng=0, n_genes=50)
    assert (bare.tables["table"].obs["histoclip_domain"].to_numpy() == labels.to_numpy()).all()
    # and the domain genes of such a table, per region
    hc.tl.domain_genes(sdata, section_key="region", n_genes=5)
    genes = table.uns["histoclip_domain_genes"]
    assert set(genes["section"]) == set(regions)
