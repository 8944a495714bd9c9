import numpy as np
import pytest

import histoclip as hc


def test_dlpfc_bundled():
    a = hc.datasets.dlpfc()
    assert a.shape == (3639, 5000)
    assert set(a.obs["layer"].dropna().unique()) == {"L1", "L2", "L3", "L4", "L5", "L6", "WM"}
    assert a.uns["spatial"]["151673"]["images"]["lowres"].shape == (600, 600, 3)
    assert {"MOBP", "PCP4", "RELN"} <= set(a.var_names)
    assert float(a.X.max()) > 1 and np.allclose(a.X.data, np.round(a.X.data))  # raw counts


def test_second_dlpfc_section_bundled():
    b = hc.datasets.dlpfc(section="151674")
    assert b.shape == (3673, 5000)
    assert list(b.uns["spatial"]) == ["151674"]
    assert set(b.obs["layer"].dropna().unique()) == {"L1", "L2", "L3", "L4", "L5", "L6", "WM"}
    # each section keeps its own 5000 genes; pooling them uses the genes they share
    assert len(b.var_names.intersection(hc.datasets.dlpfc().var_names)) == 2340
    with pytest.raises(ValueError, match="151673.*151674"):
        hc.datasets.dlpfc(section="151675")


def test_toy_is_seeded():
    a, b, c = hc.datasets.toy(rng=0), hc.datasets.toy(rng=0), hc.datasets.toy(rng=1)
    assert (a.X != b.X).nnz == 0
    assert (a.X != c.X).nnz > 0
    for dtype in ("uint16", "float32"):
        img = hc.datasets.toy(image_dtype=dtype).uns["spatial"]["toy"]["images"]["hires"]
        assert img.dtype == np.dtype(dtype)
