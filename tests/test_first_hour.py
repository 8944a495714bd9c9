"""Day-one rough edges of issue 13: the install page, the squidpy note on the bundled slide."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import histoclip as hc

REPO = Path(__file__).resolve().parents[1]


def test_installation_page_gives_the_install_that_works():
    text = (REPO / "docs" / "installation.md").read_text()
    first_command = text.split("```bash", 1)[1].split("```", 1)[0]
    assert "pip install histoclip" not in text  # not published
    assert "git clone" in first_command and "pip install -c constraints.txt ." in first_command
    assert (REPO / "constraints.txt").is_file()


def test_bundled_slide_needs_lowres_in_squidpy_plots_as_documented():
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert 'img_res_key="lowres"' in hc.datasets.dlpfc.__doc__
    adata = hc.datasets.dlpfc()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError, match="hires"):
            sq.pl.spatial_scatter(adata, color="layer")
        sq.pl.spatial_scatter(adata, color="layer", img_res_key="lowres")
    plt.close("all")
