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


# ----------------------------------------------------------------------------------------- races and hostile files
def test_save_without_overwrite_is_an_exclusive_create(small, tmp_path, monkeypatch):
    """Two processes saving to one folder: the one that finishes second gets FileExistsError, and the first file
    stays whole (no check-then-write window)."""
    import safetensors.torch

    model = HistoCLIP(small, **TINY).train(1, **FIT)
    real = safetensors.torch.save_file
    other = b"the other process's model"

    def other_process_finishes_first(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        (tmp_path / "m" / "model.safetensors").write_bytes(other)  # written while this one was serialising

    monkeypatch.setattr(safetensors.torch, "save_file", other_process_finishes_first)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == other
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]


def test_checkpoint_files_of_two_runs_are_not_mixed(small, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    HistoCLIP(small, **TINY).train(1, checkpoint_dir=ckpt, **FIT)
    theirs = (ckpt / "optimizer.safetensors").read_bytes()
    HistoCLIP(small, **TINY).train(1, checkpoint_dir=ckpt, **{**FIT, "rng": 1})  # a second run, same folder
    (ckpt / "optimizer.safetensors").write_bytes(theirs)  # the first run's optimizer next to the second's model
    loaded = HistoCLIP.load(ckpt, small, accelerator="cpu")
    assert "written by another training run" in caplog.text
    assert loaded._optimizer_state is None
    # the same run resumes as before
    caplog.clear()
    loaded.train(1, checkpoint_dir=ckpt, **FIT)
    assert HistoCLIP.load(ckpt, small, accelerator="cpu")._optimizer_state is not None
    assert "another training run" not in caplog.text


def test_stored_weights_path_is_never_opened(small, tmp_path, monkeypatch):
    """A model file naming weights elsewhere: load() and train() never open that path unless the caller names it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = HistoCLIP(small, **TINY).save(tmp_path / "m")  # untrained
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip"])
    secret = tmp_path / "elsewhere" / "secret.pth"
    secret.parent.mkdir()
    secret.write_bytes(b"not for you")
    meta["init_params"]["weights"] = str(secret)
    save_file(load_file(str(path)), str(path), metadata={"histoclip": json.dumps(meta)})

    opened = []
    real_open, real_load = open, torch.load
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (opened.append(str(f)), real_load(f, *a, **k))[1])
    loaded = HistoCLIP.load(tmp_path / "m", small, accelerator="cpu")
    with pytest.raises(ValueError, match=r"names backbone weights .*secret.pth.*never opened.*weights="):
        loaded.train(1, **FIT)
    assert not [p for p in opened if "secret" in p]
    assert loaded.init_params["weights"] == str(secret)  # kept as a record


def test_ctrl_c_while_torch_imports_lazily_leaves_torch_working(tmp_path):
    """Ctrl-C in the first second of a process's first train(), while torch imports ~800 modules on its first
    optimizer, must not leave half-imported modules that break torch for the rest of the process."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ctrl_c.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job ignores SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import torch
        import histoclip as hc
        from histoclip.model import HistoCLIP

        torch.set_num_threads(1)
        hc.settings.progress = False
        adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
        hc.pp.extract_patches(adata, size_um=110)
        model = HistoCLIP(adata, n_genes=20, patch_px=8, hidden_dim=32, latent_dim=8)
        assert "torch._dynamo" not in sys.modules, "this test needs torch's lazy imports still to come"

        class CtrlC:  # presses Ctrl-C while torch, importing torch._dynamo, starts on torch._inductor.config
            fired = False
            def find_spec(self, name, path=None, target=None):
                if name == "torch._inductor.config" and not CtrlC.fired:
                    CtrlC.fired = True
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlC())
        try:
            model.train(1, batch_size=32, accelerator="cpu")
        except KeyboardInterrupt:
            print("interrupted")
        assert CtrlC.fired
        model.train(1, batch_size=32, accelerator="cpu")
        print("trained", len(model.history))
    """))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC.parent)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 1" in out.stdout


def test_save_and_load_a_safetensors_file_name(small, tmp_path):
    model = HistoCLIP(small, **TINY).train(1, **FIT)
    path = model.save(tmp_path / "x.safetensors")
    assert path == tmp_path / "x.safetensors" and path.is_file()
    loaded = HistoCLIP.load(tmp_path / "x.safetensors", small, accelerator="cpu")
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "x.safetensors")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder"):
        model.save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # a folder of that name (what earlier versions made) is still a folder
    old = model.save(tmp_path / "y.safetensors" / "model.safetensors")
    assert HistoCLIP.load(tmp_path / "y.safetensors", accelerator="cpu").genes == model.genes and old.is_file()


def test_loading_onto_other_genes_names_both_gene_sets(small, tmp_path):
    model = HistoCLIP(small, **TINY).train(1, **FIT)
    model.save(tmp_path / "m")
    other = small.copy()
    other.var_names = [f"ENSG{i:011d}" for i in range(other.n_vars)]
    snap = snapshot(other)
    with pytest.raises(KeyError, match=r"20 of the model's 20 genes are absent from the data \(first: \['gene_.*"
                                       r"the data has 40 genes \(e.g. \['ENSG00000000000'.*0 of them the model's.*"
                                       r"model.genes"):
        HistoCLIP.load(tmp_path / "m", other, accelerator="cpu")
    assert_unchanged(other, snap)


def _rewrite(path: Path, edit) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip"])
    tensors = load_file(str(path))
    meta, tensors = edit(meta, tensors)
    save_file(tensors, str(path), metadata={"histoclip": json.dumps(meta)})


@pytest.mark.parametrize("value", [60_000, 10**9])
def test_model_file_claiming_huge_layers_is_rejected_before_allocating(small, tmp_path, value):
    import resource
    import time

    path = HistoCLIP(small, **TINY).train(1, **FIT).save(tmp_path / "m")

    def huge(meta, tensors):
        meta["init_params"]["hidden_dim"] = value
        return meta, tensors

    _rewrite(path, huge)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(ValueError, match=r"not a valid histoclip model file: (init_params.hidden_dim = 1000000000 is "
                                         r"outside|its tensors do not match .* of the wrong shape)"):
        HistoCLIP.load(tmp_path / "m", accelerator="cpu")
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KiB: under 200 MB more
