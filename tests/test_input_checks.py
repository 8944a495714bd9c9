"""Data as users hold it: one test per row of the "Data as users hold it" section of docs/bad_input.md."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import histoclip as hc
from histoclip.io import resolve

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
FAST = {"n_domains": 3, "n_genes": 50, "n_init": 2}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "histoclip"]


def _log_normalise(x):
    x = sp.csr_matrix(x, dtype=np.float32)
    tot = np.asarray(x.sum(1)).ravel()
    y = sp.diags((1e4 / np.maximum(tot, 1)).astype(np.float32)) @ x
    y = sp.csr_matrix(y)
    y.data = np.log1p(y.data)
    return y


def test_log_normalised_x_with_counts_in_a_layer(toy, caplog):
    toy.layers["counts"] = toy.X.copy()
    toy.X = _log_normalise(toy.X)
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        hc.tl.domains(toy, **FAST)
    warn = [w for w in _warnings(caplog) if "not integer counts" in w]
    assert len(warn) == 1  # once per call, although the counts are checked twice
    assert "adata.X" in warn[0] and "adata.layers['counts'] holds integer counts: pass layer='counts'" in warn[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        hc.tl.domains(toy, layer="counts", **FAST)
    assert not [w for w in _warnings(caplog) if "not integer counts" in w]


def test_log_normalised_x_without_counts(toy, caplog):
    toy.X = _log_normalise(toy.X)
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        hc.tl.domain_genes(toy, groupby="domain", n_genes=3)
    warn = [w for w in _warnings(caplog) if "not integer counts" in w]
    assert len(warn) == 1 and "Keep the raw counts" in warn[0] and "layer='counts'" in warn[0]


def test_scaled_x_with_negative_values_is_refused(toy):
    toy.X = sp.csr_matrix(np.asarray(toy.X.todense()) - 1.0)
    with pytest.raises(ValueError, match=r"negative values.*layer='counts'"):
        hc.tl.domains(toy, **FAST)
    assert "histoclip_domain" not in toy.obs


def test_no_uns_spatial(toy, caplog):
    ref = toy.copy()
    hc.tl.domains(ref, **FAST)
    del toy.uns["spatial"]
    with caplog.at_level(logging.INFO, logger="histoclip"):
        hc.tl.domains(toy, **FAST)  # microns from the hexagonal lattice of obsm['spatial']
    assert "hexagonal grid" in caplog.text and "no adata.uns['spatial']" in caplog.text
    assert np.isfinite(toy.obs["histoclip_domain"].astype(int)).all()
    assert (toy.obs["histoclip_domain"] == ref.obs["histoclip_domain"]).all()  # the toy's grid is 100 um apart
    hc.tl.domain_genes(toy, n_genes=3)
    assert len(toy.uns["histoclip_domain_genes"]) > 0
    with pytest.raises(KeyError, match=r"adata.uns\['spatial'\] with the slide image.*scanpy.read_visium"):
        hc.pp.extract_patches(toy)


def test_section_without_image(toy):
    del toy.uns["spatial"]["toy"]["images"]
    hc.tl.domains(toy, **FAST)
    assert toy.obs["histoclip_domain"].nunique() == 3
    assert resolve(toy, need_image=False).slides[0].um_per_px == pytest.approx(1.0)
    with pytest.raises(KeyError, match=r"has no image.*set_fullres_image"):
        hc.pp.extract_patches(toy)


def test_spot_diameter_off_by_a_unit_mistake(toy, caplog):
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        resolve(toy, need_image=False, spot_diameter_um=5500.0)  # 55 um given in the wrong unit
    warn = _warnings(caplog)
    assert len(warn) == 1
    assert re.search(r"10000 um apart.*hexagonal grid \(Visium\).*100 um apart.*no neighbours.*55 would give", warn[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histoclip"):
        resolve(toy, need_image=False, spot_diameter_um=65.0)  # plausible: no warning
    assert not _warnings(caplog)


def test_every_test_is_a_row_of_the_docs_section():
    text = DOC.read_text()
    section = text.split("## Data as users hold it", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`tests/test_input_checks.py::(test_\w+)`", section))
    this = "test_every_test_is_a_row_of_the_docs_section"
    here = {name for name in globals() if name.startswith("test_") and name != this}
    assert here == documented
