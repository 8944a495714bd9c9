"""Fuzzing ``HistoCLIP.load`` with mutated model files: random metadata edits, truncations, swapped, reshaped and
dropped tensors. Each load either succeeds or raises a clear ``ValueError`` naming the file; memory stays bounded;
and no file outside the model's folder is opened (paths stored in the file included)."""

import json
import os
import resource
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import histoclip as hc
from histoclip.model import HistoCLIP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CASES = int(os.environ.get("HISTOCLIP_FUZZ_CASES", 120))  # more: HISTOCLIP_FUZZ_CASES=5000
_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event, args):
    if _WATCHING[0] and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # (audit hooks cannot be removed; this one only records while _WATCHING)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    model = HistoCLIP(adata, n_genes=20, patch_px=8, hidden_dim=32, latent_dim=8).train(
        1, batch_size=32, rng=0, accelerator="cpu")
    # as if predict_expression had built its reference bank: saved with the model, read back by load
    rng = np.random.default_rng(0)
    model.predictor_state = {"bank": {"expression_embedding": rng.normal(size=(64, 8)).astype(np.float32),
                                      "image_embedding": rng.normal(size=(64, 8)).astype(np.float32),
                                      "expression": rng.random((64, 20)).astype(np.float32)}}
    folder = tmp_path_factory.mktemp("base")
    path = model.save(folder)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip"])
    return path.read_bytes(), meta, load_file(str(path))


HOSTILE_VALUES = [
    60_000, 10**9, 10**18, -1, 0, 1, 2.5, float("nan"), float("inf"), 1e308, True, None, "", "x" * 10_000,
    "/etc/passwd", "../../../outside.pth", [], [1, 2, 3], {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}, ["g"] * 3,
]


def _paths(obj, prefix=()):
    """Every (path, value) of a JSON object, to pick an edit from."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list) and obj:
        yield from _paths(obj[0], (*prefix, 0))


def _set(obj, path, value):
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def mutate(rng: np.random.Generator, raw: bytes, meta: dict, tensors: dict, outside: Path):
    """One hostile variant of a model file: (bytes, description)."""
    from safetensors.torch import save

    kind = rng.choice(["meta", "meta", "meta", "truncate", "swap", "reshape", "retype", "drop", "extra", "flip",
                       "weights"])
    meta, tensors = json.loads(json.dumps(meta)), dict(tensors)
    if kind == "truncate":
        n = int(rng.integers(0, len(raw)))
        return raw[:n], f"truncated at {n} of {len(raw)} bytes"
    if kind == "flip":
        b = bytearray(raw)
        for pos in rng.integers(0, min(len(b), 4000), size=int(rng.integers(1, 8))):
            b[int(pos)] = int(rng.integers(0, 256))
        return bytes(b), "header bytes flipped"
    what = kind
    if kind == "meta":
        paths = [p for p, _ in _paths(meta) if p]
        path = paths[int(rng.integers(len(paths)))]
        value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
        meta = _set(meta, path, value)
        what = f"meta {'.'.join(map(str, path))} = {str(value)[:40]}"
    elif kind == "weights":
        meta["init_params"]["weights"] = str(outside)
        meta["is_trained"] = bool(rng.integers(2))
    else:
        keys = sorted(tensors)
        a, b = (keys[int(i)] for i in rng.choice(len(keys), size=2, replace=False))
        if kind == "swap":
            tensors[a], tensors[b] = tensors[b], tensors[a]
        elif kind == "reshape":
            tensors[a] = torch.zeros(*[int(d) for d in rng.integers(1, 70, size=int(rng.integers(1, 4)))])
        elif kind == "retype":
            dtype = [torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8, torch.bool][
                int(rng.integers(6))]
            tensors[a] = tensors[a].to(dtype)
            what = f"retype {a} {dtype}"
        elif kind == "drop":
            del tensors[a]
        else:
            tensors[f"module.extra.{a}"] = tensors[a].clone()
        if kind != "retype":
            what = f"{kind} {a} {b}"
    return save(tensors, metadata={"histoclip": json.dumps(meta)}), what


def test_load_survives_mutated_model_files(saved, tmp_path):
    raw, meta, tensors = saved
    outside = tmp_path / "outside" / "weights.pth"
    outside.parent.mkdir()
    outside.write_bytes(b"must never be read")
    allowed_roots = [str(tmp_path / "case"), sys.prefix, sys.base_prefix, str(Path(hc.__file__).parents[1])]
    rng = np.random.default_rng(int(os.environ.get("HISTOCLIP_FUZZ_SEED", 12)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"loaded": 0, "rejected": 0}
    for case in range(N_CASES):
        data, what = mutate(rng, raw, meta, tensors, outside)
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(data)
        _OPENED.clear()
        _WATCHING[0] = True
        try:
            model = HistoCLIP.load(folder, accelerator="cpu")
        except ValueError as err:  # the clear error: it names the file and says what is wrong
            msg = str(err)
            assert str(folder / "model.safetensors") in msg, (case, what, msg)
            assert "model file" in msg, (case, what, msg)
            outcomes["rejected"] += 1
        except Exception as err:  # noqa: BLE001 (anything else is the bug this test looks for)
            pytest.fail(f"case {case} ({what}): {type(err).__name__}: {err}")
        else:
            outcomes["loaded"] += 1
            assert len(model.genes) == model.gene_mean.shape[0]
            assert np.isfinite(model.gene_std).all() and (model.gene_std > 0).all()
        finally:
            _WATCHING[0] = False
        strays = [p for p in _OPENED if not any(os.path.abspath(p).startswith(r) for r in allowed_roots)
                  and not p.startswith(("/proc", "/sys", "/dev"))]
        assert not strays, (case, what, strays)
        assert not [p for p in _OPENED if "outside" in p], (case, what)
    assert outcomes["rejected"] > N_CASES // 3  # the mutations do reach the checks
    assert outcomes["loaded"] > 0  # and the unmutated parts of the file (predictors included) load
    # memory: no file claimed more than its own size (a 60,000-wide layer alone would be gigabytes)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300 * 1024  # KiB


# ------------------------------------------------------------------------------------------ checkpoint folders
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint folder after one epoch: (model bytes, optimizer metadata, optimizer tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    folder = tmp_path_factory.mktemp("ckpt")
    HistoCLIP(adata, n_genes=20, patch_px=8, hidden_dim=32, latent_dim=8).train(
        1, batch_size=32, rng=0, accelerator="cpu", checkpoint_dir=folder)
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["histoclip_optimizer"])
    return (folder / "model.safetensors").read_bytes(), meta, load_file(str(folder / "optimizer.safetensors"))


OPTIMIZER_VALUES = [
    True, False, None, 0, 1, -1, 0.5, 1.0, 1.5, -0.5, 1e-300, 1e308, float("nan"), float("inf"), "0.9", "", [],
    [0.9], [0.9, 0.999], [1.0, 0.999], [0.9, -0.1], {"a": 1}, 10**20,
]


def mutate_optimizer(rng: np.random.Generator, meta: dict, tensors: dict):
    """One hostile variant of an optimizer file, touching every field it has: (meta, tensors, description)."""
    import torch

    meta, tensors = json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()}
    kind = rng.choice(["group", "group", "group", "groups", "params", "tensor", "tensor", "scalars", "drop", "none"])
    group = meta["param_groups"][0]
    if kind == "group":  # any entry of the param group, or a new one
        name = [*group, "nesterov"][int(rng.integers(len(group) + 1))]
        group[name] = OPTIMIZER_VALUES[int(rng.integers(len(OPTIMIZER_VALUES)))]
        return meta, tensors, f"param_groups[0].{name} = {str(group[name])[:30]}"
    if kind == "groups":
        meta["param_groups"] = [group, dict(group)] if rng.integers(2) else []
        return meta, tensors, f"{len(meta['param_groups'])} param groups"
    if kind == "params":
        ids = group["params"]
        group["params"] = [ids + [ids[0]], ids[:-1], [*ids[:-1], len(ids) + 5], [str(i) for i in ids]][
            int(rng.integers(4))]
        return meta, tensors, f"params {str(group['params'])[-30:]}"
    keys = sorted(tensors)
    key = keys[int(rng.integers(len(keys)))]
    if kind == "tensor":
        op = int(rng.integers(6))
        value = tensors[key]
        tensors[key] = [lambda: value.fill_(float("nan")), lambda: value.fill_(-1.0), lambda: value.half(),
                        lambda: value.to(torch.int64), lambda: torch.zeros(*[int(d) + 1 for d in value.shape] or [2]),
                        lambda: value * 1e3][op]()
        return meta, tensors, f"tensor {key} op {op}"
    if kind == "scalars":
        meta["scalars"] = {f"{key.split('.')[1]}.step": OPTIMIZER_VALUES[int(rng.integers(len(OPTIMIZER_VALUES)))]}
        return meta, tensors, f"scalars {str(meta['scalars'])[:40]}"
    if kind == "drop":
        del tensors[key]
        return meta, tensors, f"dropped {key}"
    return meta, tensors, "unchanged"


def test_resume_survives_mutated_optimizer_files(checkpoint, tmp_path):
    """Every field of optimizer.safetensors: each file either resumes training with a finite, non-rising loss
    or is refused at load with a ValueError naming it; memory stays bounded."""
    from safetensors.torch import save_file

    model_bytes, meta, tensors = checkpoint
    adata = hc.datasets.toy(n_rows=8, n_cols=8, n_genes=40, rng=0)
    hc.pp.extract_patches(adata, size_um=110)
    rng = np.random.default_rng(int(os.environ.get("HISTOCLIP_FUZZ_SEED", 12)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"resumed": 0, "rejected": 0}
    for case in range(max(N_CASES // 6, 12)):
        m, t, what = mutate_optimizer(rng, meta, tensors)
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(model_bytes)
        save_file(t, str(folder / "optimizer.safetensors"), metadata={"histoclip_optimizer": json.dumps(m)})
        try:
            model = HistoCLIP.load(folder, adata, accelerator="cpu")
        except ValueError as err:
            assert str(folder / "optimizer.safetensors") in str(err), (case, what, str(err))
            assert "Delete it to resume with fresh optimizer moments" in str(err), (case, what, str(err))
            outcomes["rejected"] += 1
            continue
        except Exception as err:  # noqa: BLE001 (anything else is the bug this test looks for)
            pytest.fail(f"case {case} ({what}): {type(err).__name__}: {err}")
        try:
            model.train(1, batch_size=32, rng=0, accelerator="cpu")
        except Exception as err:  # noqa: BLE001 (a file that loads must resume)
            pytest.fail(f"case {case} ({what}) loaded but did not resume: {type(err).__name__}: {err}")
        losses = model.history["loss"].to_numpy()
        assert np.isfinite(losses).all(), (case, what, losses)
        assert losses[-1] < losses[0] + 1.0, (case, what, losses)  # descent, not ascent
        outcomes["resumed"] += 1
    assert outcomes["rejected"] > 0 and outcomes["resumed"] > 0, outcomes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300 * 1024  # KiB
