"""Hostile and odd inputs: TIFF layouts and colour encodings, model and checkpoint files that claim too much,
records that travel with a file, non-finite models. One test per row of the "Hostile and odd files" table of
docs/bad_input.md; each input is read right, or refused before any work with a message naming the file and the fix,
within bounded memory and time, and the user's data is never overwritten."""

import copy
import json
import logging
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

import histoclip as hc
from histoclip.io import open_image

from .test_bad_input import assert_unchanged, snapshot

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
SRC = Path(hc.__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_bounded(code: str, limit_gib: float = 3, timeout: float = 120) -> str:
    """Run ``code`` in a child process; return its stdout (it must exit 0), with its time and peak memory.

    The address-space limit only keeps a regression from taking the machine's memory (torch alone reserves about
    1 GiB of address space); the bounds are asserted on the child's peak resident memory.
    """
    script = textwrap.dedent(f"""
        import resource, time
        limit = int({limit_gib} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        t0 = time.perf_counter()
    """) + textwrap.dedent(code) + textwrap.dedent("""
        print("seconds", time.perf_counter() - t0)
        # VmHWM is this process's own peak (ru_maxrss would keep the forking parent's, e.g. a large pytest process)
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
        print("maxrss_mib", int(hwm) / 1024)
    """)
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def one_strip_bomb(path: Path, side: int) -> None:
    """A side x side RGB TIFF of zeros stored as one deflate strip: a few MB that decode to 3 side**2 bytes."""
    comp, row, parts, left = zlib.compressobj(1), bytes(side * 3 * 512), [], side * side * 3
    while left:
        n = min(len(row), left)
        parts.append(comp.compress(row[:n]))
        left -= n
    parts.append(comp.flush())
    blob = b"".join(parts)
    tifffile.imwrite(path, iter([blob]), shape=(side, side, 3), dtype=np.uint8, photometric="rgb",
                     compression="zlib", rowsperstrip=side)


# ------------------------------------------------------------------------------------------------ TIFF resources
def test_tiff_strip_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.tif"
    one_strip_bomb(path, 24_000)  # 4.6 MB on disk, 1.6 GiB decoded
    assert path.stat().st_size < 10 * 2**20
    out = run_bounded(f"""
        import histoclip as hc
        try:
            hc.io.open_image({str(path)!r}).read_patch(100, 100, 210, 210, 32)
        except ValueError as err:
            print("refused", err)
    """)
    assert "refused" in out, out
    msg = out.split("refused", 1)[1]
    assert "bomb.tif" in msg and "strips or tiles of 1,648 MiB" in msg and "tiled pyramidal TIFF" in msg
    assert "tifffile.imwrite" in msg and "vips tiffsave" in msg
    assert float(re.search(r"seconds (\S+)", out).group(1)) < 5
    assert float(re.search(r"maxrss_mib (\S+)", out).group(1)) < 600


def test_tiff_with_large_strips_under_the_pixel_limit_is_decoded_once(tmp_path, monkeypatch):
    from histoclip.io import _image

    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, rgb, compression="zlib", rowsperstrip=300)  # one 180 kB strip
    monkeypatch.setattr(_image, "MAX_TIFF_CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(hc.settings, "cachedir", tmp_path / "cache")
    image = open_image(path)
    assert isinstance(image.array, np.memmap)  # decoded once into the cache, then memory-mapped
    np.testing.assert_array_equal(image.read(10, 20, 60, 90), rgb[20:90, 10:60])
    monkeypatch.setattr(hc.settings, "max_image_pixels", 50_000)
    with pytest.raises(ValueError, match=r"strip.tif' stores its 300x200x3 pixels in strips or tiles of 0 MiB.*"
                                         r"max_image_pixels = 50,000.*tiled pyramidal TIFF"):
        open_image(path)


def test_truncated_tiff_names_the_path(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, (400, 300, 3), dtype=np.uint8),
                     compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.tif' is truncated: its image data runs to byte [\d,]+ but the file "
                                         r"has [\d,]+ bytes"):
        open_image(path)
    path.write_bytes(b"II*\x00" + b"\xff" * 20)  # a header pointing nowhere
    with pytest.raises(ValueError, match=r"cut.tif' is not a readable TIFF"):
        open_image(path)


# ------------------------------------------------------------------------------------------------ TIFF pixels
def _tissue() -> np.ndarray:
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    rgb[:, 25:] = (30, 160, 240)
    rgb[:10] = 255
    return rgb


def _to_cmyk(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float64) / 255
    k = 1 - f.max(-1, keepdims=True)
    cmy = np.where(k < 1, (1 - f - k) / np.maximum(1 - k, 1e-12), 0)
    return np.round(np.concatenate([cmy, k], -1) * 255).astype(np.uint8)


def test_cmyk_tiff_is_converted(tmp_path):
    rgb = _tissue()
    tifffile.imwrite(tmp_path / "cmyk.tif", _to_cmyk(rgb), photometric="separated")
    got = open_image(tmp_path / "cmyk.tif").read(0, 0, 50, 40)
    assert np.abs(got.astype(int) - rgb).max() <= 1  # (it was read as RGBA: (200, 100, 50) -> (55, 155, 205))


def test_unsupported_photometric_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((20, 20, 3), np.uint8), photometric="cielab")
    with pytest.raises(ValueError, match=r"lab.tif' stores colours as photometric=CIELAB.*convert\('RGB'\)"):
        open_image(tmp_path / "lab.tif")


def test_miniswhite_tiff_is_inverted(tmp_path):
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    tifffile.imwrite(tmp_path / "mw.tif", grey, photometric="miniswhite")
    np.testing.assert_array_equal(open_image(tmp_path / "mw.tif").read(0, 0, 5, 5)[..., 0], 255 - grey)


def test_twelve_bit_uint16_tiff_is_scaled_by_its_range(tmp_path, caplog):
    rgb = _tissue()
    twelve = (rgb.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tagged.tif", twelve, photometric="rgb", extratags=[(341, "H", 3, (4095,) * 3, True)])
    tifffile.imwrite(tmp_path / "untagged.tif", twelve, photometric="rgb")
    with caplog.at_level(logging.INFO, logger="histoclip"):
        tagged = open_image(tmp_path / "tagged.tif").read(0, 0, 50, 40)
        assert "read as [0, 4095] from its SMaxSampleValue tag" in caplog.text
        untagged = open_image(tmp_path / "untagged.tif").read(0, 0, 50, 40)
        assert "sampled maximum of 4095: read as 12-bit data" in caplog.text
    assert np.abs(tagged.astype(int) - rgb).max() <= 1  # (it was divided by 257: 16x too dark)
    assert np.abs(untagged.astype(int) - rgb).max() <= 1
    full = (rgb.astype(np.uint16) * 257)  # a real 16-bit image keeps the [0, 65535] rule
    tifffile.imwrite(tmp_path / "sixteen.tif", full, photometric="rgb")
    np.testing.assert_array_equal(open_image(tmp_path / "sixteen.tif").read(0, 0, 50, 40), rgb)


def test_nan_pixels_read_as_background(tmp_path):
    img = _tissue().astype(np.float32) / 255
    img[20:, :5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", img, photometric="rgb")
    got = open_image(tmp_path / "nan.tif").read(-3, 18, 8, 25)
    np.testing.assert_array_equal(got[2:, :8], 255)  # NaN like the white padding outside the image
    np.testing.assert_array_equal(got[2:, 8:], np.broadcast_to(np.uint8([200, 100, 50]), (5, 3, 3)))


def test_tiff_whose_first_page_is_a_thumbnail(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "thumb_first.tif") as tif:
        tif.write(rgb[::10, ::10], photometric="rgb")  # the thumbnail some scanners store first
        tif.write(rgb, photometric="rgb", compression="zlib", tile=(64, 64))
        tif.write(rgb[::20, ::20].copy(), photometric="rgb")  # a label image
    image = open_image(tmp_path / "thumb_first.tif")
    assert image.shape == (300, 400)
    np.testing.assert_array_equal(image.read(350, 250, 400, 300), rgb[250:300, 350:400])


# ------------------------------------------------------------------------------------------------ the docs
def test_every_test_is_a_row_of_the_docs_table():
    text = DOC.read_text().split("## Hostile and odd files", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(test_\w+)`", text))
    this = "test_every_test_is_a_row_of_the_docs_table"
    here = {name for name in globals() if name.startswith("test_") and name != this}
    assert here == documented


# ------------------------------------------------------------------------------------------------ model files
TINY = {"n_genes": 20, "patch_px": 8, "hidden_dim": 32, "latent_dim": 8}
FIT = {"batch_size": 32, "rng": 0, "accelerator": "cpu"}


@pytest.fixture
def small():
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    return adata


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_torch_thread):
    """A trained tiny model's file: (bytes, metadata, tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    path = hc.model.HistoCLIP(adata, **TINY).train(1, **FIT).save(tmp_path_factory.mktemp("model"))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip"])
    return path.read_bytes(), meta, load_file(str(path))


def write_model(folder: Path, meta: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"histoclip": json.dumps(meta)})
    return folder


def test_model_file_claiming_a_huge_patch_size(saved, tmp_path):
    _, meta, tensors = saved
    for px in (2048, 257):
        meta = json.loads(json.dumps(meta))
        meta["init_params"]["patch_px"] = px
        folder = write_model(tmp_path / f"px{px}", meta, tensors)
        with pytest.raises(ValueError, match=rf"model.safetensors is not a valid histoclip model file: "
                                             rf"init_params.patch_px = {px} is outside \[8, 256\]"):
            hc.model.HistoCLIP.load(folder, accelerator="cpu")


def test_embed_memory_is_bounded_whatever_the_patch_size(saved, tmp_path):
    """A model file may still ask for 256-px patches: tl.embed cuts its batches to a fixed memory budget."""
    _, meta, tensors = saved
    meta = json.loads(json.dumps(meta))
    meta["init_params"]["patch_px"] = 256
    folder = write_model(tmp_path / "px256", meta, tensors)
    out = run_bounded(f"""
        import torch
        import histoclip as hc
        torch.set_num_threads(1)
        hc.settings.progress = False
        adata = hc.datasets.toy(n_rows=8, n_cols=12, n_genes=40, rng=0)  # 96 spots
        hc.pp.extract_patches(adata, size_um=110)
        model = hc.model.HistoCLIP.load({str(folder)!r}, adata, accelerator="cpu")
        hc.tl.embed(adata, model, modality="image")
        print("shape", adata.obsm["X_histoclip_image"].shape)
    """, timeout=300)
    assert "shape (96, 32)" in out, out
    # one batch of 96 such patches took ~2.4 GB; the budget's batches of 10 stay under 256 MiB of activations
    assert float(re.search(r"maxrss_mib (\S+)", out).group(1)) < 1000


def test_model_file_with_huge_finite_weights(saved, tmp_path):
    _, meta, tensors = saved
    name = next(k for k in tensors if k.startswith("module.image_encoder") and k.endswith("weight"))
    huge = {**tensors, name: tensors[name] * 1e30}
    with pytest.raises(ValueError, match=r"px.*model.safetensors is not a valid histoclip model file: 1 weights hold "
                                         r"values above 1e\+08.*overflow"):
        hc.model.HistoCLIP.load(write_model(tmp_path / "px", meta, huge), accelerator="cpu")


def test_embed_refuses_non_finite_embeddings(saved, small, tmp_path):
    import torch

    _, meta, tensors = saved
    # weights under the load bound that still overflow together: every layer of the image tower times 1e7
    scaled = {k: (v * 1e7 if k.startswith("module.image") and v.is_floating_point() and "running_var" not in k
                  else v) for k, v in tensors.items()}
    folder = write_model(tmp_path / "big", meta, scaled)
    model = hc.model.HistoCLIP.load(folder, small, accelerator="cpu")
    with torch.inference_mode():
        assert not np.isfinite(model.get_latent_representation(small, modality="image")).all()
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"model loaded from .*big/model.safetensors gives NaN or inf embeddings for "
                                         r"\d+ of 64 spots .*Nothing was written. Retrain"):
        hc.tl.embed(small, model)
    assert_unchanged(small, before)


# ------------------------------------------------------------------------------------------------ records
def test_record_copied_from_another_object_does_not_claim_a_column(small):
    other = small.copy()
    other.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(other.n_obs, 4)).astype(np.float32)
    hc.tl.domains(other, n_domains=2, use_rep="X_histoclip", key_added="region")
    small.obsm["X_histoclip"] = other.obsm["X_histoclip"].copy()
    small.obs["region"] = pd.Categorical(["tumour", "stroma"] * (small.n_obs // 2))  # the user's labels
    small.uns["histoclip"] = copy.deepcopy(dict(other.uns["histoclip"]))  # the record (and hashes) travel along
    assert small.uns["histoclip"]["params"]["domains"]["key_added"] == "region"
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"key_added='region' would overwrite adata.obs\['region'\], which histoclip "
                                         r"did not write .*del adata.obs\['region'\]"):
        hc.tl.domains(small, n_domains=2, use_rep="X_histoclip", key_added="region")
    assert_unchanged(small, before)
    # a column histoclip wrote and the user then replaced is the user's too
    hc.tl.domains(other, n_domains=3, use_rep="X_histoclip", key_added="region")  # its own column: replaced
    other.obs["region"] = other.obs["region"].cat.rename_categories(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"which histoclip did not write \(it is your data, or it was changed"):
        hc.tl.domains(other, n_domains=2, use_rep="X_histoclip", key_added="region")


def test_rerun_replaces_its_own_column_after_an_h5ad_round_trip(small, tmp_path):
    import anndata as ad

    small.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(small.n_obs, 4)).astype(np.float32)
    hc.tl.domains(small, n_domains=2, use_rep="X_histoclip", key_added="my_domains")
    small.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    hc.tl.domains(back, n_domains=3, use_rep="X_histoclip", key_added="my_domains")
    assert back.obs["my_domains"].nunique() == 3


def test_image_embedding_after_a_joint_keeps_the_record_true(small):
    model = hc.model.HistoCLIP(small, **TINY).train(1, **FIT)
    hc.tl.embed(small, model)
    joint = small.obsm["X_histoclip"].copy()
    hc.tl.embed(small, model, modality="image")  # the same model: everything stored is still the joint call's
    record = small.uns["histoclip"]["params"]["embed"]
    assert record["modality"] == "all"
    np.testing.assert_array_equal(small.obsm["X_histoclip"], joint)
    other = hc.model.HistoCLIP(small, **TINY).train(1, batch_size=32, rng=1, accelerator="cpu")
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"adata.obsm\['X_histoclip'\], adata.obsm\['X_histoclip_expression'\], "
                                         r"adata.obs\['histoclip_image_weight'\] hold the joint embedding of another "
                                         r"model.*del adata.obsm\['X_histoclip'\]"):
        hc.tl.embed(small, other, modality="image")
    assert_unchanged(small, before)
    hc.tl.embed(small, other, modality="image", key_added="X_other")  # under its own key: recorded as an image call
    assert small.uns["histoclip"]["params"]["embed"]["modality"] == "image"


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_torch_thread):
    """A checkpoint folder after one epoch: (folder, optimizer metadata, optimizer tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    folder = tmp_path_factory.mktemp("ckpt")
    hc.model.HistoCLIP(adata, **TINY).train(1, checkpoint_dir=folder, **FIT)
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip_optimizer"])
    return folder, meta, load_file(str(folder / "optimizer.safetensors"))


def _group(**changes):
    return lambda meta, t: meta["param_groups"][0].update(changes)


OPTIMIZER_FAULTS = {
    "maximize": (_group(maximize=True), r"maximize = True in its param group"),
    "beta_one": (_group(betas=[1.0, 0.999]), r"betas\[0\] = 1.0 is outside \[0.0, 1.0\)"),
    "beta_negative": (_group(betas=[0.9, -0.5]), r"betas\[1\] = -0.5 is outside"),
    "eps_zero": (_group(eps=0.0), r"eps = 0.0 is outside"),
    "lr_string": (_group(lr="0.001"), r"lr = '0.001' is not a number"),
    "amsgrad": (_group(amsgrad=True), r"amsgrad = True"),
    "unknown_entry": (_group(nesterov=True), r"entries \['nesterov'\] are not AdamW's"),
    "duplicated_group": (lambda meta, t: meta["param_groups"].append(dict(meta["param_groups"][0])),
                         r"param_groups must be one group"),
    "duplicated_param": (lambda meta, t: meta["param_groups"][0]["params"].append(0), r"not each of the model's"),
    "negative_second_moment": (lambda meta, t: t["state.0.exp_avg_sq"].fill_(-1.0), r"negative second moments"),
    "nan_moment": (lambda meta, t: t["state.1.exp_avg"].fill_(float("nan")), r"state.1.exp_avg holds NaN"),
    "negative_step": (lambda meta, t: t["state.0.step"].fill_(-3.0), r"state.0.step must be one non-negative"),
    "float16_moment": (lambda meta, t: t.update({"state.0.exp_avg": t["state.0.exp_avg"].half()}),
                       r"state.0.exp_avg is torch.float16, not float32"),
    "string_scalar": (lambda meta, t: meta.update(scalars={"0.step": "4"}), r"scalar 0.step = '4' is not a number"),
}


@pytest.mark.parametrize("fault", sorted(OPTIMIZER_FAULTS))
def test_optimizer_checkpoint_fields_are_checked(checkpoint, small, tmp_path, fault):
    from safetensors.torch import save_file

    folder, meta, tensors = checkpoint
    edit, message = OPTIMIZER_FAULTS[fault]
    meta, tensors = json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()}
    edit(meta, tensors)
    case = tmp_path / "ckpt"
    case.mkdir()
    (case / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    save_file(tensors, str(case / "optimizer.safetensors"), metadata={"histoclip_optimizer": json.dumps(meta)})
    with pytest.raises(ValueError, match=rf"ckpt/optimizer.safetensors is not a valid optimizer checkpoint .*"
                                         rf"{message}.*Delete it to resume with fresh optimizer moments"):
        hc.model.HistoCLIP.load(case, small, accelerator="cpu")
    (case / "optimizer.safetensors").unlink()  # the fix in the message works
    hc.model.HistoCLIP.load(case, small, accelerator="cpu").train(1, **FIT)


def test_model_weights_of_another_dtype_are_refused(saved, tmp_path):
    import torch

    _, meta, tensors = saved
    weight = next(k for k in tensors if k.startswith("module.") and tensors[k].is_floating_point())
    for dtype, name in ((torch.float16, "F16"), (torch.int64, "I64")):
        folder = write_model(tmp_path / name, meta, {**tensors, weight: tensors[weight].to(dtype)})
        with pytest.raises(ValueError, match=rf"tensors stored as another dtype than histoclip writes .*refused, not "
                                             rf"cast.*{re.escape(weight)} {name} instead of F32"):
            hc.model.HistoCLIP.load(folder, accelerator="cpu")


def test_predictor_tensors_must_fit_the_model(saved, tmp_path):
    import torch

    _, meta, tensors = saved
    latent, genes = meta["init_params"]["latent_dim"], len(meta["genes"])
    bank = {"predictor.bank.expression_embedding": torch.ones(30, latent),
            "predictor.bank.image_embedding": torch.ones(30, latent),
            "predictor.bank.expression": torch.ones(30, genes)}
    model = hc.model.HistoCLIP.load(write_model(tmp_path / "ok", meta, {**tensors, **bank}), accelerator="cpu")
    assert model.predictor_state["bank"]["expression"].shape == (30, genes)
    for name, bad, message in (
        ("predictor.bank.image_embedding", torch.ones(30, latent + 3), r"image_embedding has shape \(30, 11\), which "
                                                                       r"does not fit.*D = 8"),
        ("predictor.bank.expression", torch.ones(29, genes), r"expression has shape \(29, 20\).*N = 30"),
        ("predictor.bank.expression_embedding", torch.ones(30, latent, 2), r"expected 2 dimensions"),
        ("predictor.nonsense.x", torch.ones(3), r"predictor 'nonsense' holds tensors \['x'\]"),
    ):
        folder = write_model(tmp_path / name, meta, {**tensors, **bank, name: bad})
        with pytest.raises(ValueError, match=rf"{re.escape(name.split('.')[0])}.*model.safetensors is not a valid "
                                             rf"histoclip model file: .*{message}"):
            hc.model.HistoCLIP.load(folder, accelerator="cpu")


# ------------------------------------------------------------------------------------------------ smaller
def test_all_spots_at_one_coordinate(small):
    small.obsm["spatial"][:] = (500.0, 500.0)
    small.obsm["X_histoclip"] = np.random.default_rng(0).normal(size=(small.n_obs, 4)).astype(np.float32)
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"All 64 spots of library 'toy' sit at one point of obsm\['spatial'\]: "
                                         r"spatial neighbours .*cannot be defined"):
        hc.tl.domains(small, n_domains=2, use_rep="X_histoclip")
    assert_unchanged(small, before)
    with pytest.raises(ValueError, match=r"sit at one point"):
        hc.pp.spatial_neighbors(small)


def test_seed_beyond_what_the_libraries_take():
    from histoclip._utils import resolve_seed

    assert resolve_seed(2**32 - 1) == 2**32 - 1
    for seed in (2**32, 2**70, np.uint64(2**63)):
        with pytest.raises(ValueError, match=r"rng must be an int seed in \[0, 2\*\*32 - 1\].*got \d+"):
            resolve_seed(seed)


def test_saved_model_files_follow_the_umask(saved, small, tmp_path):
    import os

    model = hc.model.HistoCLIP(small, **TINY).train(1, **FIT)
    old = os.umask(0o022)
    try:
        path = model.save(tmp_path / "m")
        assert path.stat().st_mode & 0o777 == 0o644  # (mkstemp's 0600 made it private to the writer)
        os.umask(0o077)
        assert model.save(tmp_path / "p").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
