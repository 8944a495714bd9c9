"""Reproducibility: the same seed gives the same results in fresh processes, and every result records enough to
rerun it (docs/reproducibility.md)."""

import inspect
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest

import histoclip as hc
from histoclip.model import HistoCLIP

TINY = {"n_genes": 20, "patch_px": 8, "hidden_dim": 32, "latent_dim": 8}

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    torch.set_num_threads(1)  # same thread count in both runs: same float summation order
    import histoclip as hc

    hc.settings.progress = False
    out = Path(sys.argv[1])
    adata = hc.datasets.toy(n_rows=10, n_cols=10, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.tl.train(adata, max_epochs=2, batch_size=64, rng=7, accelerator="cpu", n_genes=20, patch_px=8,
                        hidden_dim=32, latent_dim=8)
    hc.tl.embed(adata, model)
    hc.tl.domains(adata, n_domains=3, rng=7)
    for key in ("X_histoclip", "X_histoclip_image", "X_histoclip_expression"):
        np.save(out / f"{key}.npy", adata.obsm[key])
    np.save(out / "domains.npy", adata.obs["histoclip_domain"].astype(int).to_numpy())
    np.save(out / "loss.npy", model.history["loss"].to_numpy())
""")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_same_seed_identical_results_in_two_fresh_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    runs = []
    for i in (1, 2):  # both at once: two fresh interpreters, different hash seeds
        out = tmp_path / f"run{i}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": str(i), "OMP_NUM_THREADS": "1",
               "HISTOCLIP_CACHE": str(tmp_path / f"cache{i}")}
        runs.append((out, subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for _, proc in runs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    (a, _), (b, _) = runs
    names = sorted(p.name for p in a.iterdir())
    assert names == ["X_histoclip.npy", "X_histoclip_expression.npy", "X_histoclip_image.npy", "domains.npy",
                     "loss.npy"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between two runs"
    z = np.load(a / "X_histoclip.npy")
    assert z.shape == (100, 42) and np.isfinite(z).all() and np.abs(z).max() > 0
    assert len(np.unique(np.load(a / "domains.npy"))) > 1


def test_params_hold_enough_to_rerun_each_step(tmp_path):
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = hc.tl.train(adata, max_epochs=1, batch_size=32, rng=3, accelerator="cpu", **TINY)
    hc.tl.embed(adata, model)
    hc.tl.domains(adata, n_domains=3, rng=5)

    adata.write_h5ad(tmp_path / "a.h5ad")  # only h5ad-serialisable values
    params = ad.read_h5ad(tmp_path / "a.h5ad").uns["histoclip"]["params"]
    patches, embed, domains = params["patches"], params["embed"], params["domains"]
    assert {"size_um", "size_px", "um_per_px", "img_key", "key_added", "source"} <= set(patches)
    assert patches["size_um"] == 110.0 and patches["size_px"]["toy"] == 22 and patches["img_key"]["toy"] == "hires"
    assert {"seed", "max_epochs", "batch_size", "lr", "weight_decay", "augment", "precision", "patch_size_um",
            "n_genes", "patch_px", "latent_dim", "hidden_dim", "image_backbone", "key_added"} <= set(embed)
    assert embed["seed"] == 3 and embed["patch_size_um"] == 110.0
    assert {"seed", "n_domains", "method", "use_rep", "radius_um", "n_hops", "n_pcs", "refine",
            "key_added"} <= set(domains)
    assert domains["seed"] == 5 and domains["n_domains"] == 3

    # rerun every step from its record alone, on a fresh copy of the input
    again = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(again, size_um=patches["size_um"], img_key=patches["img_key"]["toy"],
                          key_added=patches["key_added"])
    np.testing.assert_array_equal(again.obsm["histoclip_patch_box"], adata.obsm["histoclip_patch_box"])

    init_args = inspect.signature(HistoCLIP.__init__).parameters
    train_args = inspect.signature(HistoCLIP.train).parameters
    rerun = HistoCLIP(again, **{k: embed[k] for k in init_args if k in embed})
    rerun.train(**{k: embed[k] for k in train_args if k in embed}, rng=embed["seed"], accelerator="cpu")
    hc.tl.embed(again, rerun, key_added=embed["key_added"])
    np.testing.assert_array_equal(again.obsm["X_histoclip"], adata.obsm["X_histoclip"])

    domain_args = inspect.signature(hc.tl.domains).parameters
    hc.tl.domains(again, **{k: domains[k] for k in domain_args if k in domains}, rng=domains["seed"])
    assert (again.obs["histoclip_domain"] == adata.obs["histoclip_domain"]).all()
