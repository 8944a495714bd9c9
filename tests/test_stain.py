"""Macenko stain normalisation and stain augmentation (histoclip.pp._stain)."""

import numpy as np
import pytest

import histoclip as hc
from histoclip.pp._stain import REFERENCE, augment_stain


@pytest.fixture(scope="module")
def ihc():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.immunohistochemistry()  # a real 512 x 512 stained-tissue image


def _synthetic_he(stain_matrix, conc_scale, n=64, seed=0):
    """An image made of known stain vectors: pixels = I0 * 10^-(C @ HE^T), with random concentrations."""
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.3, size=(n * n, 2)) * conc_scale
    od = c @ np.asarray(stain_matrix).T
    return np.clip(240 * 10.0 ** (-od), 0, 255).astype(np.uint8).reshape(n, n, 3)


def test_fit_stain_recovers_the_vectors_an_image_was_made_of():
    he = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    he = he / np.linalg.norm(he, axis=0)
    fit = hc.pp.fit_stain(_synthetic_he(he, np.array([1.0, 1.0])), angle_percentile=0.1)
    cos = np.abs((fit["stain_matrix"] * he).sum(0))
    assert cos.min() > 0.98, (fit["stain_matrix"], he)  # haematoxylin first, eosin second


def test_normalize_stain_makes_two_stainings_of_one_tissue_alike():
    # the same concentrations imaged with two different stain colours and intensities
    he_a = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    he_b = np.array([[0.50, 0.20], [0.80, 0.90], [0.35, 0.40]])
    a = _synthetic_he(he_a / np.linalg.norm(he_a, axis=0), np.array([1.0, 1.0]))
    b = _synthetic_he(he_b / np.linalg.norm(he_b, axis=0), np.array([1.6, 0.6]))
    before = np.abs(a.astype(float) - b.astype(float)).mean()
    na, nb = hc.pp.normalize_stain(a), hc.pp.normalize_stain(b)
    after = np.abs(na.astype(float) - nb.astype(float)).mean()
    assert na.dtype == np.uint8 and na.shape == a.shape
    assert after < before / 3, (before, after)


def test_normalize_stain_maps_onto_the_reference(ihc):
    out = hc.pp.normalize_stain(ihc)
    refit = hc.pp.fit_stain(out)
    cos = (refit["stain_matrix"] * REFERENCE["stain_matrix"] / np.linalg.norm(REFERENCE["stain_matrix"], axis=0)).sum(0)
    assert cos.min() > 0.95
    # a stack of patches with one source fit is normalised patch by patch the same way as the whole image
    src = hc.pp.fit_stain(ihc)
    patches = ihc[:256, :256].reshape(2, 128, 256, 3)
    np.testing.assert_array_equal(hc.pp.normalize_stain(patches, source=src),
                                  hc.pp.normalize_stain(ihc[:256, :256], source=src).reshape(2, 128, 256, 3))


def test_stain_errors():
    with pytest.raises(TypeError, match="uint8"):
        hc.pp.fit_stain(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        hc.pp.normalize_stain(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="background"):
        hc.pp.fit_stain(np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(ValueError, match="fit_stain returns"):
        hc.pp.normalize_stain(np.zeros((8, 8, 3), np.uint8), source={"stain_matrix": np.eye(2)})


def test_augment_stain_is_seeded_and_changes_each_patch_differently(ihc):
    patches = np.stack([ihc[:64, :64], ihc[64:128, :64], ihc[:64, 64:128]])
    a = augment_stain(patches, 0, sigma=0.2, bias=0.1)
    np.testing.assert_array_equal(a, augment_stain(patches, 0, sigma=0.2, bias=0.1))
    assert not np.array_equal(a, augment_stain(patches, 1, sigma=0.2, bias=0.1))
    assert a.shape == patches.shape and a.dtype == np.uint8
    assert np.abs(a.astype(float) - patches).mean() > 1
    # no jitter: the image comes back (up to rounding)
    same = augment_stain(patches, 0, sigma=0.0, bias=0.0)
    assert np.abs(same.astype(int) - patches).max() <= 1
