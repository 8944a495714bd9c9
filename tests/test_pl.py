import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import histoclip as hc  # noqa: E402


@pytest.fixture
def annotated(trained):
    model, adata = trained
    adata = adata.copy()
    hc.tl.embed(adata, model)
    hc.tl.domains(adata, n_domains=3)
    return model, adata


def test_domains_plot(annotated, tmp_path, monkeypatch):
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("library code must not call plt.show()"))
    _, adata = annotated
    ax = hc.pl.domains(adata, save=tmp_path / "d.png")
    assert isinstance(ax, matplotlib.axes.Axes)
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert len(ax.images) == 1 and len(ax.collections) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    # spots fall on the image: the axis limits lie inside the drawn image extent (plus margin)
    x0, x1 = ax.get_xlim()
    extent = ax.images[0].get_extent()
    assert extent[0] - 50 <= x0 < x1 <= extent[1] + 50
    plt.close("all")


def test_domains_plot_into_given_ax_and_errors(annotated):
    _, adata = annotated
    fig, ax = plt.subplots()
    assert hc.pl.domains(adata, color="domain", ax=ax) is ax
    with pytest.raises(KeyError, match="run histoclip.tl.domains"):
        hc.pl.domains(adata, color="missing")
    plt.close("all")


def test_loss_and_embedding_plots(annotated, tmp_path):
    model, adata = annotated
    ax = hc.pl.loss(model, save=tmp_path / "loss.png")
    assert len(ax.lines) == 3 and (tmp_path / "loss.png").exists()
    ax = hc.pl.embedding(adata, color="histoclip_domain")
    assert len(ax.collections) == 3
    assert "X_umap" not in adata.obsm
    plt.close("all")
