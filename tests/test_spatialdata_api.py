"""SpatialData is a first-class input: every pl and tl function takes it (with table_key), and the image chosen in
extract_patches is the one training and embedding read (issue 13)."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import histoclip as hc  # noqa: E402

LOW, HIGH = "toy_lowres_image", "toy_hires_image"


def read_visium_toy():
    spatialdata_io = pytest.importorskip("spatialdata_io")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata's notes on dtypes of the region column
        return spatialdata_io.visium(hc.datasets.visium_toy(), dataset_id="toy")


@pytest.fixture(scope="module")
def annotated(one_torch_thread):
    """The bundled Space Ranger folder as SpatialData: patches from the lowres image, a 1-epoch model, domains."""
    sdata = read_visium_toy()
    hc.pp.extract_patches(sdata, image_key=LOW, size_um=110)
    model = hc.tl.train(sdata, max_epochs=1, n_genes=50, batch_size=50, rng=0, accelerator="cpu")
    hc.tl.embed(sdata, model)
    hc.tl.domains(sdata, n_domains=3, rng=0)
    table = sdata.tables["table"]
    table.obs["manual"] = pd.Categorical(np.where(table.obsm["spatial"][:, 0] > np.median(table.obsm["spatial"][:, 0]),
                                                  "right", "left"))
    return sdata, model


def test_visium_toy_is_a_space_ranger_folder():
    path = hc.datasets.visium_toy()
    assert (path / "filtered_feature_bc_matrix.h5").is_file()
    assert {p.name for p in (path / "spatial").iterdir()} >= {"tissue_positions_list.csv", "scalefactors_json.json",
                                                             "tissue_lowres_image.png", "tissue_hires_image.png"}
    sdata = read_visium_toy()
    assert sdata.tables["table"].shape == (100, 100)
    assert set(sdata.images) == {LOW, HIGH}


# ------------------------------------------------------------------------------------- every pl and tl function
def _tl_train(sdata, model):
    m = hc.tl.train(sdata, max_epochs=1, n_genes=20, batch_size=50, rng=1, accelerator="cpu")
    assert m.is_trained


def _tl_embed(sdata, model):
    hc.tl.embed(sdata, model, key_added="X_again")
    t = sdata.tables["table"]
    np.testing.assert_allclose(t.obsm["X_again"], t.obsm["X_histoclip"], atol=1e-6)


def _tl_domains(sdata, model):
    hc.tl.domains(sdata, n_domains=2, rng=0, key_added="dom2")
    assert sdata.tables["table"].obs["dom2"].nunique() == 2
    # the model's embedding, read from the table, is not smoothed again (n_hops=None reads the table's embed record)
    hc.tl.domains(sdata, n_domains=2, use_rep="X_histoclip", rng=0, key_added="dom3")
    assert sdata.tables["table"].uns["histoclip"]["params"]["domains"]["n_hops"] == 0


def _tl_domain_genes(sdata, model):
    hc.tl.domain_genes(sdata, n_genes=3, min_morans_i=-1.0, max_pval_adj=1.0)
    got = sdata.tables["table"].uns["histoclip_domain_genes"]
    ref = hc.tl.domain_genes(sdata.tables["table"].copy(), n_genes=3, min_morans_i=-1.0, max_pval_adj=1.0, copy=True)
    pd.testing.assert_frame_equal(got, ref.uns["histoclip_domain_genes"])  # same as on the table as an AnnData
    assert len(got) > 0


def _tl_domain_shares(sdata, model):
    table = sdata.tables["table"]
    table.obs["half"] = np.where(np.arange(table.n_obs) % 2 == 0, "s1", "s2")
    hc.tl.domain_shares(sdata, library_key="half")
    got = table.uns["histoclip_domain_shares"]
    np.testing.assert_allclose(got.filter(like="share_").sum(axis=0), 1.0)
    ref = hc.tl.domain_shares(table.copy(), library_key="half", copy=True)
    pd.testing.assert_frame_equal(got, ref.uns["histoclip_domain_shares"])  # same as on the table as an AnnData


def _tl_image_features(sdata, model):
    pytest.importorskip("efficientnet_lite_pytorch")
    hc.tl.image_features(sdata, image_key=LOW, sizes_um=[110], patch_px=32, tta=False, key_added="feats")
    assert sdata.tables["table"].obsm["feats"].shape[0] == 100


def _tl_match_labels(sdata, model):
    hc.tl.match_labels(sdata, "manual")
    t = sdata.tables["table"]
    assert set(t.obs["histoclip_domain_matched"].cat.categories) >= {"left", "right"}


def _tl_predict_expression(sdata, model):
    pred = hc.tl.predict_expression(sdata, model, k=10)
    out = pred if pred is not None else sdata.tables["table"]
    assert out.n_obs == 100


def _pl_domains(sdata, model):
    ax = hc.pl.domains(sdata, image_key=LOW, reference="manual")
    assert len(ax.images) == 1 and len(ax.collections) == 1
    # without image_key: the image the patches were cut from (the lowres one), not the blank hires placeholder
    plain = hc.pl.domains(sdata)
    np.testing.assert_array_equal(plain.images[0].get_array(), ax.images[0].get_array())


def _pl_image_weight(sdata, model):
    ax = hc.pl.image_weight(sdata)
    assert len(ax.images) == 1 and len(ax.collections) == 1
    w = ax.collections[0].get_array()
    np.testing.assert_allclose(np.asarray(w), sdata.tables["table"].obs["histoclip_image_weight"].to_numpy(), rtol=1e-6)


def _pl_embedding(sdata, model):
    ax = hc.pl.embedding(sdata, n_neighbors=5)
    assert len(ax.collections) == sdata.tables["table"].obs["histoclip_domain"].nunique()


def _pl_domain_genes(sdata, model):
    if "histoclip_domain_genes" not in sdata.tables["table"].uns:
        hc.tl.domain_genes(sdata, n_genes=3, min_morans_i=-1.0, max_pval_adj=1.0)
    assert hc.pl.domain_genes(sdata, kind="dotplot").axes
    fig = hc.pl.domain_genes(sdata, kind="spatial", image_key=LOW)
    assert any(ax.images for ax in fig.axes)


def _pl_domain_shares(sdata, model):
    table = sdata.tables["table"]
    if "histoclip_domain_shares" not in table.uns:
        table.obs["half"] = np.where(np.arange(table.n_obs) % 2 == 0, "s1", "s2")
        hc.tl.domain_shares(sdata, library_key="half")
    ax = hc.pl.domain_shares(sdata)
    assert len(ax.patches) == 2 * table.obs["histoclip_domain"].nunique()  # one bar per section and domain


def _pl_predicted_expression(sdata, model):
    table = sdata.tables["table"]
    genes = list(model.genes[:2])
    from histoclip.pp._genes import expression_matrix

    predicted = table[:, genes].copy()
    predicted.X = expression_matrix(table, genes)  # a perfect prediction, on the measured maps' scale
    fig = hc.pl.predicted_expression(sdata, predicted[::-1], genes, image_key=LOW)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("r = 1.00" in t for t in titles)  # the rows were matched by name, not by position


CASES = {
    "tl.train": _tl_train, "tl.embed": _tl_embed, "tl.domains": _tl_domains, "tl.domain_genes": _tl_domain_genes,
    "tl.image_features": _tl_image_features, "tl.match_labels": _tl_match_labels,
    "tl.predict_expression": _tl_predict_expression, "tl.domain_shares": _tl_domain_shares,
    "pl.domains": _pl_domains, "pl.domain_shares": _pl_domain_shares, "pl.embedding": _pl_embedding,
    "pl.domain_genes": _pl_domain_genes,
    "pl.predicted_expression": _pl_predicted_expression, "pl.image_weight": _pl_image_weight,
}
NO_DATA_ARGUMENT = {"pl.loss": "takes a model", "pl.gene_correlation": "takes a Series of correlations",
                    "tl.foundation_models": "lists the registry of image encoders"}


def test_every_pl_and_tl_function_is_checked_with_spatialdata():
    public = {f"pl.{n}" for n in hc.pl.__all__} | {f"tl.{n}" for n in hc.tl.__all__}
    assert public == set(CASES) | set(NO_DATA_ARGUMENT), "add the new function to CASES (or NO_DATA_ARGUMENT)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_function_takes_spatialdata(name, annotated):
    import spatialdata

    sdata, model = annotated
    CASES[name](spatialdata.deepcopy(sdata), model)
    plt.close("all")


def test_domain_genes_on_spatialdata_rejects_copy_and_unknown_table(annotated):
    sdata, _ = annotated
    with pytest.raises(ValueError, match="copy=True is only supported for AnnData"):
        hc.tl.domain_genes(sdata, copy=True)
    with pytest.raises(KeyError, match="no table 'counts'.*tables: \\['table'\\]"):
        hc.tl.domain_genes(sdata, table_key="counts")
    with pytest.raises(KeyError, match="no table 'counts'"):
        hc.pl.embedding(sdata, table_key="counts")


# ------------------------------------------------------------------------------- the image chosen is remembered
def test_extract_patches_records_the_image_and_training_reuses_it(annotated):
    sdata, model = annotated
    assert sdata.tables["table"].uns["histoclip"]["params"]["patches"]["image_key"] == LOW
    # tl.train was called without image_key: the patches came from the lowres image the boxes belong to, not
    # from the hires one that SpatialData's default (the image ending in "hires_image") would pick
    assert [s.spots.slides[0].img_key for s in model._sections] == [LOW]
    assert sdata.tables["table"].uns["histoclip"]["params"]["embed"]["image_key"] == LOW


def test_naming_another_image_than_the_boxes_is_an_error(annotated):
    sdata, model = annotated
    with pytest.raises(ValueError, match=f"were cut from image '{LOW}'.*extract_patches"):
        hc.tl.train(sdata, image_key=HIGH, max_epochs=1)
    with pytest.raises(ValueError, match=f"image_key='{HIGH}'.*were cut from image '{LOW}'"):
        hc.tl.embed(sdata, model, image_key=HIGH)
    hc.tl.embed(sdata, model, image_key=LOW, key_added="X_named")  # naming the same image is fine
    t = sdata.tables["table"]
    np.testing.assert_allclose(t.obsm["X_named"], t.obsm["X_histoclip"], atol=1e-6)


def test_two_images_and_no_record_asks_which(annotated):
    import spatialdata

    sdata, model = annotated
    sdata = spatialdata.deepcopy(sdata)
    del sdata.tables["table"].uns["histoclip"]["params"]["patches"]["image_key"]  # boxes from an older version
    with pytest.raises(ValueError, match=r"several images .*do not record which one.*image_key="):
        hc.tl.train(sdata, max_epochs=1)
    with pytest.raises(ValueError, match=r"several images .*do not record which one"):
        hc.tl.embed(sdata, model)
    hc.tl.embed(sdata, model, image_key=LOW, key_added="X_named")  # naming it is enough
    t = sdata.tables["table"]
    np.testing.assert_allclose(t.obsm["X_named"], t.obsm["X_histoclip"], atol=1e-6)
    assert model.setup_params["image_key"] is None  # the model is left as it was


# ---------------------------------------------------------------------------------------------- matching labels
def _labelled(n_per=30):
    from anndata import AnnData

    truth = np.repeat(["L1", "L2", "L3"], n_per)
    clusters = np.repeat(["2", "0", "1"], n_per)  # cluster "2" is L1, "0" is L2, "1" is L3
    clusters[:3] = "0"  # a little noise
    clusters[-2:] = "3"  # an extra cluster without a partner
    adata = AnnData(np.zeros((truth.size, 1), dtype=np.float32))
    adata.obs["layer"] = pd.Categorical(truth)
    adata.obs["histoclip_domain"] = pd.Categorical(clusters)
    adata.obs.loc[adata.obs_names[5], "layer"] = np.nan
    return adata


def test_match_labels_renames_clusters_after_their_reference_partner():
    adata = _labelled()
    hc.tl.match_labels(adata, "layer")
    got = adata.obs["histoclip_domain_matched"]
    assert list(got.cat.categories) == ["L1", "L2", "L3", "3 (unmatched)"]
    expected = adata.obs["histoclip_domain"].map({"2": "L1", "0": "L2", "1": "L3", "3": "3 (unmatched)"})
    assert (got.astype(str) == expected.astype(str)).all()
    assert dict(adata.uns["histoclip"]["params"]["match_labels"]["mapping"]) == {"2": "L1", "0": "L2", "1": "L3"}
    from histoclip.pl._utils import palette

    ref = palette(["L1", "L2", "L3"])
    colors = list(adata.uns["histoclip_domain_matched_colors"])
    assert [matplotlib.colors.to_hex(ref[c]) for c in ["L1", "L2", "L3"]] == colors[:3]
    assert colors[3] not in colors[:3]


def test_match_labels_errors_and_copy():
    adata = _labelled()
    with pytest.raises(KeyError, match="adata.obs\\['nope'\\] not found.*pass reference="):
        hc.tl.match_labels(adata, "nope")
    with pytest.raises(ValueError, match="same column"):
        hc.tl.match_labels(adata, "histoclip_domain")
    out = hc.tl.match_labels(adata, "layer", key_added="m", copy=True)
    assert "m" in out.obs and "m" not in adata.obs


def test_pl_domains_reference_shares_colours_by_meaning():
    adata = _labelled()
    xy = np.column_stack([np.arange(adata.n_obs) * 10.0, np.zeros(adata.n_obs)])
    adata.obsm["spatial"] = xy
    # no image: draw the spots only (the table has uns["spatial"] with a scale factor and no image)
    adata.uns["spatial"] = {"lib": {"images": {"hires": np.full((10, 1000, 3), 255, np.uint8)},
                                    "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 5.0}}}
    ax_ref = hc.pl.domains(adata, color="layer")
    ax = hc.pl.domains(adata, reference="layer")
    ref = {t.get_text(): h.get_markerfacecolor() for t, h in zip(ax_ref.get_legend().get_texts(),
                                                                  ax_ref.get_legend().legend_handles, strict=True)}
    got = {t.get_text(): h.get_markerfacecolor() for t, h in zip(ax.get_legend().get_texts(),
                                                                  ax.get_legend().legend_handles, strict=True)}
    assert set(got) == {"2 (L1)", "0 (L2)", "1 (L3)", "3"}
    for cluster, layer in (("2", "L1"), ("0", "L2"), ("1", "L3")):
        assert matplotlib.colors.same_color(got[f"{cluster} ({layer})"], ref[layer])
    assert not any(matplotlib.colors.same_color(got["3"], c) for c in ref.values())
    with pytest.raises(KeyError, match="reference="):
        hc.pl.domains(adata, reference="nope")
    plt.close("all")
