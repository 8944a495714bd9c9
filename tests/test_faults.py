"""Faults: untrusted model files, interrupted or failing training, checkpoints and resuming."""

import ast
import dataclasses
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import histoclip as hc
from histoclip.model import HistoCLIP
from histoclip.module import HistoclipModule

from .test_bad_input import assert_unchanged, snapshot

SRC = Path(hc.__file__).resolve().parent
TINY = {"n_genes": 20, "patch_px": 8, "hidden_dim": 32, "latent_dim": 8}
FIT = {"batch_size": 32, "rng": 0, "accelerator": "cpu"}  # 64 spots: two steps per epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small():
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    return adata


def fault_at(monkeypatch, call: int, fault) -> None:
    """Make the ``call``-th training step (1-based, counted over the whole run) fail.

    ``fault`` is an exception to raise, or ``"nan"`` to return a NaN loss.
    """
    forward = HistoclipModule.forward
    count = {"n": 0}

    def failing(self, x, e):
        count["n"] += 1
        out = forward(self, x, e)
        if count["n"] == call:
            if fault == "nan":
                return dataclasses.replace(out, loss=out.loss * float("nan"))
            raise fault
        return out

    monkeypatch.setattr(HistoclipModule, "forward", failing)


@pytest.fixture(scope="module")
def epoch1(one_torch_thread) -> np.ndarray:
    """The embedding after one uninterrupted epoch: what a run interrupted in epoch 2 must keep."""
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    return HistoCLIP(adata, **TINY).train(1, **FIT).get_latent_representation()


# ----------------------------------------------------------------------------------------- training faults
def test_keyboard_interrupt_keeps_last_completed_epoch(small, monkeypatch, epoch1):
    snap = snapshot(small)
    model = HistoCLIP(small, **TINY)
    fault_at(monkeypatch, 3, KeyboardInterrupt())  # first step of epoch 2
    model.train(2, **FIT)  # returns: Ctrl-C ends training, it does not lose it
    assert list(model.history["epoch"]) == [1]
    assert model.train_params["interrupted"] is True and model.train_params["epochs_completed"] == 1
    np.testing.assert_array_equal(model.get_latent_representation(), epoch1)
    assert_unchanged(small, snap)


@pytest.mark.parametrize("fault", [RuntimeError("injected fault"), "nan"])
def test_exception_in_a_batch_restores_last_epoch_and_propagates(small, monkeypatch, fault, epoch1):
    snap = snapshot(small)
    model = HistoCLIP(small, **TINY)
    fault_at(monkeypatch, 3, fault)
    exc, match = (RuntimeError, "injected fault") if fault != "nan" else (
        FloatingPointError, r"loss became nan at epoch 2, step 1\. Lower lr")
    with pytest.raises(exc, match=match):
        model.train(2, **FIT)
    assert model.is_trained and list(model.history["epoch"]) == [1]
    assert model.train_params["epochs_completed"] == 1 and model.train_params["interrupted"] is True
    np.testing.assert_array_equal(model.get_latent_representation(), epoch1)  # usable: epoch 1's weights
    assert_unchanged(small, snap)


def test_failed_tl_train_writes_nothing(small, monkeypatch):
    snap = snapshot(small)
    fault_at(monkeypatch, 2, RuntimeError("injected fault"))
    with pytest.raises(RuntimeError, match="injected fault"):
        hc.tl.train(small, max_epochs=2, **FIT, **TINY)
    assert_unchanged(small, snap)


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_continues_epochs_schedule_and_optimizer(small, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    reference = HistoCLIP(small, **TINY).train(3, **FIT)
    fault_at(monkeypatch, 5, KeyboardInterrupt())  # first step of epoch 3
    HistoCLIP(small, **TINY).train(3, checkpoint_dir=ckpt, **FIT)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.safetensors"]
    opt = load_file(str(ckpt / "optimizer.safetensors"))  # tensors only: nothing to unpickle
    assert float(opt["state.0.step"]) == 4.0  # two epochs of two steps

    resumed = HistoCLIP.load(ckpt, small, accelerator="cpu")
    assert list(resumed.history["epoch"]) == [1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(1, checkpoint_dir=ckpt, **FIT)
    # fast-forwarding the schedule is intended: torch's step-order warning is not shown to the user
    assert not [w for w in caught if "lr_scheduler.step" in str(w.message)]
    assert list(resumed.history["epoch"]) == [1, 2, 3]
    # the cosine schedule continues over the three epochs of the original run, not over a new one
    np.testing.assert_allclose(resumed.history["lr"], reference.history["lr"], rtol=1e-12)
    np.testing.assert_allclose(resumed.history["loss"][:2], reference.history["loss"][:2], rtol=1e-6)
    assert float(load_file(str(ckpt / "optimizer.safetensors"))["state.0.step"]) == 6.0  # Adam's state continued
    assert resumed.train_params["epochs_completed"] == 3 and resumed.train_params["interrupted"] is False
    assert HistoCLIP.load(ckpt, small, accelerator="cpu").train_params["epochs_completed"] == 3


def test_optimizer_checkpoint_of_another_epoch_is_ignored(small, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    model = HistoCLIP(small, **TINY).train(1, checkpoint_dir=ckpt, **FIT)
    stale = (ckpt / "optimizer.safetensors").read_bytes()
    model.train(1, checkpoint_dir=ckpt, **FIT)  # epoch 2
    (ckpt / "optimizer.safetensors").write_bytes(stale)  # as if the run died between the two files
    loaded = HistoCLIP.load(ckpt, small, accelerator="cpu")
    assert "is from epoch 1 but the model from epoch 2" in caplog.text
    assert loaded._optimizer_state is None


def test_train_without_data_says_what_to_do(small, tmp_path):
    HistoCLIP(small, **TINY).train(1, **FIT).save(tmp_path / "m")
    with pytest.raises(RuntimeError, match=r"no training data attached; .*HistoCLIP.load\(dir_path, data\)"):
        HistoCLIP.load(tmp_path / "m", accelerator="cpu").train(1, **FIT)


# ----------------------------------------------------------------------------------------- model files
class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_file_posing_as_model_is_rejected_without_running_code(tmp_path, writer):
    marker = tmp_path / "code_ran"
    target = tmp_path / "m" / "model.safetensors"
    target.parent.mkdir()
    if writer == "pickle":
        target.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"weights": torch.zeros(3), "payload": _Payload(marker)}, target)
    assert not marker.exists()
    with pytest.raises(ValueError, match="is not a readable histoclip model file"):
        HistoCLIP.load(tmp_path / "m", accelerator="cpu")
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True; no pickle, joblib, dill or np.load(allow_pickle=True)."""
    problems = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if not isinstance(node, ast.Call):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            func = ast.unparse(node.func)
            if func == "torch.load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                             and kw["allow_pickle"].value is False):
                problems.append(f"{path.name}:{node.lineno} {func}(allow_pickle=...)")
    assert not problems, problems
    assert "weights_only=False" not in "".join(p.read_text() for p in SRC.rglob("*.py"))


def test_truncated_model_and_optimizer_files_are_clear_errors(small, tmp_path):
    ckpt = tmp_path / "ckpt"
    HistoCLIP(small, **TINY).train(1, checkpoint_dir=ckpt, **FIT)
    for name, match in [("optimizer.safetensors", "not a readable optimizer checkpoint.*Delete it"),
                        ("model.safetensors", "not a readable histoclip model file")]:
        path = ckpt / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ValueError, match=match):
            HistoCLIP.load(ckpt, accelerator="cpu")


def test_save_is_atomic_and_refuses_to_overwrite(small, tmp_path, monkeypatch):
    import safetensors.torch

    model = HistoCLIP(small, **TINY).train(1, **FIT)
    target = model.save(tmp_path / "m")
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m", overwrite=True)
    assert target.read_bytes() == before  # the previous file is intact
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]  # no temporary left
    monkeypatch.undo()
    loaded = HistoCLIP.load(tmp_path / "m", small, accelerator="cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6)
