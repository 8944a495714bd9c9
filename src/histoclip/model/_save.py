"""Saving, loading and checkpointing :class:`~histoclip.model.HistoCLIP` models, and checking model files.

A model file is untrusted input. It is one safetensors file (tensors + a JSON header, never unpickled) and
:func:`load_model` checks it before it allocates anything the file asks for:

1. the JSON metadata: its types, and bounds on every integer setting (layer widths, gene count, patch size);
2. the module it describes is built on torch's ``"meta"`` device (shapes only, no memory), and every tensor shape
   of that module is compared with the file's (read from the header by ``safe_open``, without reading data);
   so the memory a file can claim is the size of the file itself;
3. only then are the tensors read and the module built for real.

A path stored in the file (the ``weights`` an untrained model was configured with) is never opened unless the
caller names it again (``HistoCLIP.load(..., weights=path)``).

Files of one checkpoint folder (``model.safetensors``, ``optimizer.safetensors``) carry the id of the training
run that wrote them; an optimizer file of another run is not resumed from.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .._settings import logger
from .._utils import current_umask
from .._version import __version__

if TYPE_CHECKING:
    from ._histoclip import HistoCLIP

FILE_NAME = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # written next to FILE_NAME by train(checkpoint_dir=...)
FORMAT = 1

# Bounds on the integer settings a model file may hold. Everything that sizes a tensor is also checked against the
# file's own tensors (meta-device build); these bounds cover what sizes work later and is not in the tensors, and
# keep absurd values out of the meta build itself. patch_px sizes every image the network sees: one 256-px patch
# costs ~25 MB of activations and ~1 GFLOP in the small CNN (tl.embed shrinks its batches to a fixed memory budget;
# time still grows with patch_px ** 2; 224 px is the usual ImageNet input);
# n_neighbors sizes the spatial graph (n_spots * n_neighbors entries). Integers not listed get GENERIC_INT_BOUND.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "n_genes": (1, 200_000),
    "hidden_dim": (2, 65_536),
    "latent_dim": (1, 16_384),
    "patch_px": (8, 256),
    "n_neighbors": (1, 100),
    "image_in_features": (1, 1_000_000),
    "skip_components": (0, 200_000),
    "init_seed": (0, 2**63 - 1),
}
GENERIC_INT_BOUND = 10_000_000
MAX_WEIGHT = 1e8  # trained weights (and batch-norm statistics) are far smaller; 1e20 squared overflows float32
MAX_GENES = 200_000
MAX_HISTORY_ROWS = 1_000_000
_ALLOWED_DTYPES = {"F16", "BF16", "F32", "F64", "I64", "I32", "U8", "BOOL"}
_ST_DTYPE = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
# What histoclip writes besides the module's weights (which must have the module's own dtypes): the gene
# normalisation as float32 (float64 from older versions), and the predictors of tl.predict_expression. A tensor of
# another dtype is refused rather than cast: a file whose weights were rounded to float16 or truncated to integers
# is not the model that was saved.
_NORM_DTYPES = {"F32", "F64"}
_PREDICTOR_DTYPES = {"genes": {"U8"}, "n_train": {"I64"}}  # every other predictor tensor: F32


class ModelFileError(ValueError):
    """A model file that cannot be loaded: corrupted, truncated, or describing something else than its tensors."""


# ------------------------------------------------------------------------------------------------- paths
def model_file(path: str | os.PathLike, *, for_writing: bool) -> Path:
    """The model file of ``path``: ``path`` itself if it names a ``.safetensors`` file, else ``path/model.safetensors``.

    An existing folder is always a folder (older versions wrote ``save("x.safetensors")`` as a folder).
    """
    p = Path(path)
    if p.is_dir():
        return p / FILE_NAME
    if p.suffix == ".safetensors" or (not for_writing and p.is_file()):
        return p
    return p / FILE_NAME


def _json_default(obj: Any) -> Any:
    """Numpy scalars and arrays (e.g. from parameters read back from .h5ad) as plain JSON values."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _publish(tmp: str, target: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target`` atomically; without ``overwrite``, only if ``target`` does not exist.

    The no-overwrite case is an exclusive create (a hard link fails if the name exists), so two processes saving to
    one folder cannot both succeed: the second gets :class:`FileExistsError` and the first file stays whole.
    """
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it.") from None
    except OSError:  # no hard links on this file system: reserve the name exclusively, then replace it
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it.") from None
        os.close(fd)
        os.replace(tmp, target)


def _write(tensors: dict, target: Path, metadata: dict[str, str], *, overwrite: bool) -> None:
    """Write a safetensors file to a temporary name in the target's folder, then publish it (see :func:`_publish`)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would make the model private to its writer
        _publish(tmp, target, overwrite=overwrite)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------------- saving
def metadata(model: HistoCLIP) -> dict[str, Any]:
    meta = {
        "format": FORMAT,
        "version": __version__,
        "init_params": model.init_params,
        "setup_params": model.setup_params,
        "patch_settings": model.patch_settings,
        "train_params": model.train_params,
        "is_trained": model.is_trained,
        "genes": model.genes,
        "history": model.history.to_dict(orient="list"),
    }
    run_id = getattr(model, "_run_id", None)
    if run_id is not None:
        meta["run_id"] = run_id
    return meta


def save_model(model: HistoCLIP, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """See :meth:`HistoCLIP.save`."""
    target = model_file(path, for_writing=True)
    if target.parent.exists() and not target.parent.is_dir():
        raise NotADirectoryError(f"{target.parent} is a file, not a folder; pass a folder to save into, or a file name "
                                 "ending in .safetensors.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    tensors["norm.gene_mean"] = torch.from_numpy(np.ascontiguousarray(model.gene_mean))
    tensors["norm.gene_std"] = torch.from_numpy(np.ascontiguousarray(model.gene_std))
    for kind, arrays in model.predictor_state.items():
        for name, value in arrays.items():
            value = np.asarray(value)
            tensors[f"predictor.{kind}.{name}"] = torch.from_numpy(value.copy() if value.ndim == 0
                                                                   else np.ascontiguousarray(value))
    _write(tensors, target, {"histoclip": json.dumps(metadata(model), default=_json_default)}, overwrite=overwrite)
    logger.info("Saved the model to %s", target)
    return target


def run_id(model: HistoCLIP) -> str:
    """The id of the model's training run (kept across resumed runs), made on first use."""
    rid = getattr(model, "_run_id", None)
    if rid is None:
        rid = model._run_id = uuid.uuid4().hex
    return rid


def save_checkpoint(model: HistoCLIP, dir_path: str | os.PathLike, optimizer_state: dict | None, epoch: int) -> None:
    """Write ``optimizer.safetensors`` (tensors + JSON, no pickle), then ``model.safetensors``, both atomically.

    Both files are stamped with the run's id.
    """
    dir_path = Path(dir_path)
    dir_path.mkdir(parents=True, exist_ok=True)
    rid = run_id(model)
    if optimizer_state is not None:
        tensors, scalars = {}, {}
        for pid, entry in optimizer_state["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{name}"] = value
        meta = {"format": FORMAT, "epoch": int(epoch), "run_id": rid, "param_groups": optimizer_state["param_groups"],
                "scalars": scalars}
        _write(tensors, dir_path / OPTIMIZER_FILE, {"histoclip_optimizer": json.dumps(meta, default=_json_default)},
               overwrite=True)
    save_model(model, dir_path, overwrite=True)
    logger.info("Checkpoint of epoch %d written to %s", epoch, dir_path)


# ------------------------------------------------------------------------------------------------- checking
def _bad(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a valid histoclip model file: {what}. Save the model again with "
                          "model.save(...) from the histoclip version that trained it.")


def _check_value(path: Path, name: str, value: Any, depth: int = 0) -> None:
    """Bounds on one JSON setting: integers in range, floats finite, strings short, nesting shallow."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        lo, hi = INT_BOUNDS.get(name.rsplit(".", 1)[-1], (-GENERIC_INT_BOUND, GENERIC_INT_BOUND))
        if not lo <= value <= hi:
            raise _bad(path, f"{name} = {value} is outside [{lo}, {hi}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(path, f"{name} = {value} is not finite")
    elif isinstance(value, str):
        if len(value) > 4096:
            raise _bad(path, f"{name} is a {len(value)}-character string")
    elif isinstance(value, list | dict):
        if depth > 4:
            raise _bad(path, f"{name} is nested too deeply")
        if len(value) > 10_000:
            raise _bad(path, f"{name} holds {len(value)} entries")
        for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
            _check_value(path, f"{name}.{k}", v, depth + 1)
    else:
        raise _bad(path, f"{name} has an unexpected type {type(value).__name__}")


def check_metadata(path: Path, meta: Any) -> dict[str, Any]:
    """Validate the JSON header of a model file (types and bounds); return it."""
    if not isinstance(meta, dict):
        raise _bad(path, f"its metadata is a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise _bad(path, f"format {meta.get('format')!r} (this version reads format {FORMAT})")
    for key, kind in (("init_params", dict), ("setup_params", dict), ("genes", list)):
        if not isinstance(meta.get(key), kind):
            raise _bad(path, f"{key!r} is missing or not a {kind.__name__}")
    for key in ("patch_settings", "train_params", "history"):
        if not isinstance(meta.get(key, {}), dict):
            raise _bad(path, f"{key!r} is not an object")
    for name, value in meta["init_params"].items():
        if name in INT_BOUNDS and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _bad(path, f"init_params.{name} = {value!r} is not an integer")
        _check_value(path, f"init_params.{name}", value)
    for name in ("setup_params", "patch_settings", "train_params"):
        _check_value(path, name, meta.get(name, {}))
    genes = meta["genes"]
    if not 1 <= len(genes) <= MAX_GENES or not all(isinstance(g, str) and len(g) <= 1024 for g in genes):
        raise _bad(path, f"'genes' must be 1 to {MAX_GENES} names, got {len(genes)} entries")
    if len(set(genes)) != len(genes):
        raise _bad(path, "'genes' has duplicated names")
    history = meta.get("history", {})
    lengths = {len(v) if isinstance(v, list) else -1 for v in history.values()}
    if history and (len(lengths) != 1 or -1 in lengths or max(lengths) > MAX_HISTORY_ROWS
                    or not all(isinstance(x, int | float) and not isinstance(x, bool)
                               for v in history.values() for x in v)):
        raise _bad(path, "'history' must be columns of numbers of one length")
    if history and "epoch" not in history:
        raise _bad(path, "'history' has no 'epoch' column")
    if history and not all(isinstance(e, int) and 0 <= e <= GENERIC_INT_BOUND for e in history["epoch"]):
        raise _bad(path, "'history' epochs must be non-negative integers")
    if "run_id" in meta and not (isinstance(meta["run_id"], str) and len(meta["run_id"]) <= 64):
        raise _bad(path, "'run_id' is not a short string")
    return meta


def _meta_module(model: HistoCLIP, path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The state-dict shapes and safetensors dtypes of the module the metadata describes (meta device: no memory)."""
    try:
        with torch.device("meta"):
            module = model._build_module(seed=0)
    except Exception as err:  # noqa: BLE001 (any failure to build is a file this version cannot load)
        raise _bad(path, f"it describes a model this version cannot build ({type(err).__name__}: {err})") from err
    state = module.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {k: _ST_DTYPE.get(v.dtype, str(v.dtype)) for k, v in
                                                           state.items()}


def check_tensors(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                  expected: dict[str, tuple[int, ...]], n_genes: int,
                  expected_dtypes: dict[str, str] | None = None) -> None:
    """Compare the file's tensor shapes and dtypes with those of the module its metadata describes."""
    bad_dtype = sorted(k for k, d in dtypes.items() if d not in _ALLOWED_DTYPES)
    if bad_dtype:
        raise _bad(path, f"tensors of unexpected dtype: {[(k, dtypes[k]) for k in bad_dtype[:5]]}")
    wanted = {f"module.{k}": {d} for k, d in (expected_dtypes or {}).items()}
    for k in shapes:
        if k.startswith("norm."):
            wanted[k] = _NORM_DTYPES
        elif k.startswith("predictor."):
            wanted[k] = _PREDICTOR_DTYPES.get(k.rsplit(".", 1)[-1], {"F32"})
    retyped = sorted(k for k in shapes if k in wanted and dtypes.get(k) not in wanted[k])
    if retyped:
        raise _bad(path, "tensors stored as another dtype than histoclip writes (they are refused, not cast: "
                         "rounded or truncated weights are not the saved model): "
                         + ", ".join(f"{k} {dtypes[k]} instead of {'/'.join(sorted(wanted[k]))}" for k in retyped[:3]))
    for key in ("norm.gene_mean", "norm.gene_std"):
        if shapes.get(key) != (n_genes,):
            raise _bad(path, f"{key} has shape {shapes.get(key)}, expected ({n_genes},) for its {n_genes} genes")
    found = {k[len("module."):]: s for k, s in shapes.items() if k.startswith("module.")}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (first: {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected weights (first: {extra[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} weights of the wrong shape (first: "
                         + ", ".join(f"{k} {found[k]} instead of {expected[k]}" for k in wrong[:3]) + ")")
        raise _bad(path, "its tensors do not match the model its metadata describes: " + "; ".join(parts))
    others = [k for k in shapes if not k.startswith(("module.", "norm.")) and
              not (k.startswith("predictor.") and k.count(".") >= 2)]
    if others:
        raise _bad(path, f"unexpected tensors {others[:5]}")


def _image_feature_dim(expected: dict[str, tuple[int, ...]]) -> int | None:
    """The width of the image tower's features (the input of ``image_latent``), from the module's shapes."""
    first = [v for k, v in expected.items() if k.startswith("image_latent.") and k.endswith("weight") and len(v) == 2]
    return int(first[0][1]) if first else None


# The tensors of each predictor tl.predict_expression saves, by kind ("bank", "bank_<hash>", "ridge",
# "ridge_<hash>"), with their dimensions: N reference spots, D latent, G genes, F features, P components.
_PREDICTORS = {
    "bank": {"expression_embedding": ("N", "D"), "image_embedding": ("N", "D"), "expression": ("N", "G")},
    "bank_": {"expression": ("N", "G"), "genes": ("B",)},
    "ridge": {"mean": ("F",), "std": ("F",), "components": ("F", "P"), "coef": ("P", "G"), "intercept": ("G",),
              "alpha": (), "n_train": ()},
}
_PREDICTORS["ridge_"] = {**_PREDICTORS["ridge"], "genes": ("B",)}


def check_predictors(path: Path, shapes: dict[str, tuple[int, ...]], genes: list[str], latent_dim: int,
                     feature_dim: int | None) -> None:
    """The saved predictors' tensors: known names, and shapes that fit each other and the model."""
    kinds: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith("predictor."):
            _, kind, name = key.split(".", 2)
            kinds.setdefault(kind, {})[name] = shape
    bank_n = None
    for kind in sorted(kinds, key=lambda k: k != "bank"):  # the bank first: the others' N refers to it
        found = kinds[kind]
        base = kind if kind in ("bank", "ridge") else kind.split("_", 1)[0] + "_" if "_" in kind else None
        schema = _PREDICTORS.get(base or "")
        if schema is None or set(found) != set(schema):
            raise _bad(path, f"its predictor {kind!r} holds tensors {sorted(found)}; histoclip saves 'bank' "
                             f"({sorted(_PREDICTORS['bank'])}) and 'ridge' ({sorted(_PREDICTORS['ridge'])}) predictors")
        dims: dict[str, int] = {"D": latent_dim}
        if base in ("bank", "ridge"):
            dims["G"] = len(genes)
        if base == "bank_" and bank_n is not None:
            dims["N"] = bank_n
        if base and base.startswith("ridge") and feature_dim is not None:
            dims["F"] = 2 * feature_dim  # the features and their neighbourhood mean
        for name, letters in schema.items():
            shape = found[name]
            if len(shape) != len(letters):
                raise _bad(path, f"predictor.{kind}.{name} has shape {shape}, expected {len(letters)} dimensions")
            for d, letter in zip(shape, letters, strict=True):
                if dims.setdefault(letter, d) != d:
                    raise _bad(path, f"predictor.{kind}.{name} has shape {shape}, which does not fit the model and "
                                     f"the predictor's other tensors ({letter} = {dims[letter]})")
        if base and base.startswith("ridge") and dims["P"] > dims["F"]:
            raise _bad(path, f"predictor.{kind}.components has more components than features")
        if base == "bank":
            bank_n = dims["N"]


# ------------------------------------------------------------------------------------------------- loading
def _read_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("histoclip")
            if raw is None:
                raise KeyError("no 'histoclip' entry in its metadata")
            meta = json.loads(raw)
            shapes, dtypes = {}, {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(k)
                shapes[k] = tuple(int(d) for d in sl.get_shape())
                dtypes[k] = str(sl.get_dtype())
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError, RecursionError) as err:
        raise ModelFileError(f"{path} is not a readable histoclip model file (corrupted or truncated?): {err}") from err
    return meta, shapes, dtypes


def load_model(cls: type[HistoCLIP], path: str | os.PathLike, data=None, *, accelerator: str = "auto",
               weights: str | os.PathLike | None = None) -> HistoCLIP:
    """See :meth:`HistoCLIP.load`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..train import pick_device

    file = model_file(path, for_writing=False)
    if not file.is_file():
        raise FileNotFoundError(f"No saved model at {file}; save one with model.save(path) (a folder, or a file "
                                "ending in .safetensors).")
    meta, shapes, dtypes = _read_header(file)
    check_metadata(file, meta)
    self = cls.__new__(cls)
    self.init_params = dict(meta["init_params"])
    self.setup_params = dict(meta["setup_params"])
    self.patch_settings = meta.get("patch_settings", {})
    self.train_params = meta.get("train_params", {})
    self.is_trained = bool(meta.get("is_trained", False))
    self.genes = list(meta["genes"])
    self._run_id = meta.get("run_id")
    stored_weights = self.init_params.get("weights")
    self._weights_named = str(weights) if weights is not None else None
    self.init_params["weights"] = None  # the file's tensors hold them; a stored path is never opened here
    try:
        expected, expected_dtypes = _meta_module(self, file)
    finally:
        self.init_params["weights"] = stored_weights
    check_tensors(file, shapes, dtypes, expected, len(self.genes), expected_dtypes)
    check_predictors(file, shapes, self.genes, int(self.init_params.get("latent_dim") or 0),
                     _image_feature_dim(expected))
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{file} is not a readable histoclip model file (corrupted or truncated?): {err}") from err
    self.history = pd.DataFrame(meta.get("history", {}))
    mean, std = tensors.pop("norm.gene_mean"), tensors.pop("norm.gene_std")
    self.gene_mean = mean.to(torch.float32).numpy()
    self.gene_std = std.to(torch.float32).numpy()
    if not (np.isfinite(self.gene_mean).all() and np.isfinite(self.gene_std).all() and (self.gene_std > 0).all()):
        raise _bad(file, "its gene normalisation (norm.gene_mean, norm.gene_std) is not finite and positive")
    self.predictor_state = {}
    for key in [k for k in tensors if k.startswith("predictor.")]:
        _, kind, name = key.split(".", 2)
        value = tensors.pop(key)
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _bad(file, f"its predictor tensor {key} holds NaN or inf values")
        self.predictor_state.setdefault(kind, {})[name] = value.numpy()
    for kind, arrays in self.predictor_state.items():
        if "genes" in arrays:
            try:
                names = bytes(arrays["genes"]).decode().split("\n")
            except UnicodeDecodeError:
                names = []
            n_out = shapes.get(f"predictor.{kind}.coef", shapes.get(f"predictor.{kind}.expression", (0, 0)))[-1]
            if len(names) != n_out or len(set(names)) != len(names) or not all(names):
                raise _bad(file, f"its predictor {kind!r} names {len(names)} genes (or duplicated or empty names) "
                                 f"for {n_out} predicted columns")
    self.init_params["weights"] = None
    try:
        self.module = self._build_module(seed=0)
    finally:
        self.init_params["weights"] = stored_weights
    state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    try:
        self.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _bad(file, f"its weights do not fit the model it describes ({err})") from err
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise _bad(file, "its weights hold NaN or inf values")
    huge = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel()
                  and float(v.abs().max()) > MAX_WEIGHT)
    if huge:
        raise _bad(file, f"{len(huge)} weights hold values above {MAX_WEIGHT:.0e} in size (first: {huge[:3]}): finite, "
                         "but they overflow to inf in the first layers (trained weights are of order one)")
    self._loaded_from = str(file)
    self.device = pick_device(accelerator)
    self.module.to(self.device).eval()
    epoch = int(self.history["epoch"].max()) if len(self.history) else 0
    self._optimizer_state = read_optimizer_state(file.parent, epoch, self._run_id, self.module) \
        if file.name == FILE_NAME else None
    self._data, self._sections, self._train_inputs = [], [], []
    if data is not None:
        self._attach(data)
    return self


# The param group histoclip's AdamW writes: each entry's type and allowed values. Anything else (maximize: true turns
# training into gradient ascent; betas outside [0, 1) or a negative second moment give NaN steps) is refused.
_GROUP_FLAGS = {"amsgrad": {False}, "maximize": {False}, "foreach": {None, False, True}, "capturable": {False},
                "differentiable": {False}, "fused": {None, False}, "decoupled_weight_decay": {True}}
_GROUP_NUMBERS = {"lr": (0.0, 10.0), "initial_lr": (0.0, 10.0), "eps": (1e-12, 1e-2), "weight_decay": (0.0, 10.0)}


def _number(name: str, value: Any, lo: float, hi: float, *, closed_hi: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} = {value!r} is not a number")
    if not (math.isfinite(value) and lo <= value and (value <= hi if closed_hi else value < hi)):
        raise ValueError(f"{name} = {value!r} is outside [{lo}, {hi}{']' if closed_hi else ')'}")
    return float(value)


def check_optimizer_state(meta: dict, tensors: dict[str, torch.Tensor],
                          params: list[torch.Tensor] | None) -> tuple[dict[int, dict], list[dict]]:
    """Validate an optimizer checkpoint against what histoclip's AdamW writes; return (state, param_groups).

    One param group holding each trainable parameter once; its flags as histoclip sets them (no ``maximize``, no
    ``amsgrad``); ``betas`` in [0, 1), finite and sane ``lr``, ``eps``, ``weight_decay``; per parameter a float32
    ``exp_avg`` and a non-negative ``exp_avg_sq`` of the parameter's shape and a non-negative integral ``step``,
    all finite; no other entries.
    """
    groups = meta["param_groups"]
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping):
        raise ValueError(f"param_groups must be one group (histoclip trains all parameters in one), got "
                         f"{len(groups) if isinstance(groups, list) else type(groups).__name__}")
    group = dict(groups[0])
    known = set(_GROUP_FLAGS) | set(_GROUP_NUMBERS) | {"betas", "params"}
    if set(group) - known:
        raise ValueError(f"param group entries {sorted(set(group) - known)} are not AdamW's")
    for name, allowed in _GROUP_FLAGS.items():
        if name in group and (group[name] not in allowed or not isinstance(group[name], bool | None)):
            raise ValueError(f"{name} = {group[name]!r} in its param group (histoclip writes "
                             f"{' or '.join(map(str, sorted(allowed, key=str)))})")
    for name, (lo, hi) in _GROUP_NUMBERS.items():
        if name in group:
            _number(name, group[name], lo, hi)
    betas = group.get("betas")
    if not isinstance(betas, list | tuple) or len(betas) != 2:
        raise ValueError(f"betas = {betas!r} is not two numbers")
    group["betas"] = tuple(_number(f"betas[{i}]", b, 0.0, 1.0, closed_hi=False) for i, b in enumerate(betas))
    ids = group.get("params")
    n = len(params) if params is not None else None
    if (not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            or len(set(ids)) != len(ids) or (n is not None and sorted(ids) != list(range(n)))):
        raise ValueError(f"its param group lists parameters {str(ids)[:80]}, not each of the model's "
                         f"{n if n is not None else ''} trainable parameters once")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        pid = int(pid)
        if pid not in ids:
            raise ValueError(f"{key} belongs to no parameter of its param group")
        if name not in ("exp_avg", "exp_avg_sq", "step"):
            raise ValueError(f"{key} is not an AdamW state tensor (exp_avg, exp_avg_sq, step)")
        if value.dtype != torch.float32:
            raise ValueError(f"{key} is {value.dtype}, not float32")
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf values")
        if name == "step":
            if value.numel() != 1 or float(value) < 0 or float(value) != int(float(value)):
                raise ValueError(f"{key} must be one non-negative whole number, got shape {tuple(value.shape)}")
        else:
            if params is not None and tuple(value.shape) != tuple(params[pid].shape):
                raise ValueError(f"{key} of shape {tuple(value.shape)} does not fit parameter {pid} of shape "
                                 f"{tuple(params[pid].shape)}")
            if name == "exp_avg_sq" and bool((value < 0).any()):
                raise ValueError(f"{key} holds negative second moments")
        state.setdefault(pid, {})[name] = value
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, Mapping):
        raise ValueError("scalars is not an object")
    for key, value in scalars.items():
        pid, name = str(key).split(".", 1)
        if int(pid) not in ids or name != "step":
            raise ValueError(f"scalar {key!r} is not a step of one of its parameters")
        state.setdefault(int(pid), {})[name] = _number(f"scalar {key}", value, 0.0, 1e12)
    incomplete = sorted(p for p, entry in state.items() if set(entry) != {"exp_avg", "exp_avg_sq", "step"})
    if incomplete:
        raise ValueError(f"the state of parameters {incomplete[:5]} lacks some of exp_avg, exp_avg_sq, step")
    return state, [group]


def read_optimizer_state(dir_path: Path, epoch: int, rid: str | None = None,
                         module: torch.nn.Module | None = None) -> dict | None:
    """The optimizer state saved next to a model of ``epoch`` completed epochs by the same run, or None.

    An optimizer file of another epoch or of another training run (two runs sharing a checkpoint folder) is
    ignored with a warning; one whose moments do not fit ``module``'s trainable parameters is an error.
    """
    from safetensors import SafetensorError, safe_open

    path = dir_path / OPTIMIZER_FILE
    if not path.is_file():
        return None
    fix = "Delete it to resume with fresh optimizer moments."
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["histoclip_optimizer"])
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not an object")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError, RecursionError) as err:
        raise ValueError(
            f"{path} is not a readable optimizer checkpoint (corrupted or truncated?): {err}. {fix}"
        ) from err
    if meta.get("run_id") != rid:
        logger.warning("%s was written by another training run (run %s) than the model next to it (run %s): two "
                       "trainings shared this checkpoint folder? Resuming with fresh optimizer moments.",
                       path, meta.get("run_id"), rid)
        return None
    if meta.get("epoch") != epoch:
        logger.warning("%s is from epoch %s but the model from epoch %d (interrupted while saving?); resuming "
                       "with fresh optimizer moments.", path, meta.get("epoch"), epoch)
        return None
    try:
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else None
        state, groups = check_optimizer_state(meta, tensors, params)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a valid optimizer checkpoint for the model next to it: {err}. {fix}") from err
    return {"state": state, "param_groups": groups}
