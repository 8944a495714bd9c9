"""Data-parallel training over several processes with :mod:`torch.distributed`.

Two ways in, one code path:

* under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT``), each process joins the group from those variables (``init_method="env://"``) and trains its
  share of the spots: multi-GPU and multi-node;
* otherwise ``strategy="ddp", devices=n`` starts ``n`` worker processes on this machine with
  :mod:`torch.multiprocessing` (``spawn``), rendezvous on ``127.0.0.1`` at a free port.

Backend: NCCL on CUDA, gloo on CPU. Inside :func:`histoclip.train.fit` the module is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged across processes, BatchNorm buffers
broadcast from rank 0), the spots are split by a seeded :class:`~torch.utils.data.DistributedSampler`
(``set_epoch`` every epoch), and the contrastive loss gathers every process's embeddings with a differentiable
all-gather (:func:`histoclip.module._loss.gather_global`), so each spot's negatives are the whole global batch.
Only rank 0 shows the progress bar; the history holds global (all-rank) means. The weights end identical on every
rank (checked when the workers were spawned here).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._settings import logger

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_launcher() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``RANK``/``WORLD_SIZE``)."""
    return all(k in os.environ for k in _ENV[:2]) and int(os.environ["WORLD_SIZE"]) > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for CUDA, the device itself otherwise."""
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def init_from_env(device: torch.device) -> None:
    """Join the process group described by the launcher's environment variables (no-op when already joined)."""
    if not dist.is_available():
        raise RuntimeError("This torch build has no torch.distributed support; train with strategy='auto'.")
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", *_ENV[:2]) if k not in os.environ]
        if missing:
            raise RuntimeError(f"Distributed training needs the environment variables {missing} (set by torchrun).")
        dist.init_process_group(backend_for(device), init_method="env://")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, device_type: str, fn, args: tuple, threads: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    if device_type == "cpu":
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    init_from_env(device)
    try:
        fn(rank, local_device(device), *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, args: tuple, *, nprocs: int, device: torch.device) -> None:
    """Run ``fn(rank, device, *args)`` in ``nprocs`` fresh processes forming one group on 127.0.0.1.

    ``fn`` and ``args`` must be picklable (module-level function). CPU workers share the cores evenly.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"devices must be at least 1, got {nprocs}.")
    if device.type == "cuda" and nprocs > torch.cuda.device_count():
        raise ValueError(f"devices={nprocs} asked for, but only {torch.cuda.device_count()} CUDA devices are visible.")
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    mp.start_processes(_worker, args=(nprocs, free_port(), device.type, fn, args, threads), nprocs=nprocs,
                       join=True, start_method="spawn")


def _fit_worker(rank: int, device: torch.device, module, dataset, fit_kwargs: dict, out_dir: str) -> None:
    from ._loop import fit

    result = fit(module, dataset, device=device, **fit_kwargs)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    record: dict[str, Any] = {"state": state}
    if rank == 0:
        record.update(history=result.history.to_dict(orient="list"), epochs_completed=result.epochs_completed,
                      interrupted=result.interrupted, optimizer_state=result.extras.get("optimizer_state"))
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


def fit_spawned(module: torch.nn.Module, dataset, *, devices: int, device: torch.device, **fit_kwargs):
    """Train ``module`` with ``devices`` data-parallel worker processes; load rank 0's weights into it.

    Returns rank 0's :class:`~histoclip.train.TrainingResult`; ``extras["rank_states"]`` holds every rank's final
    state dict (they are checked to be identical).
    """
    import pandas as pd

    from ._loop import TrainingResult

    if fit_kwargs.get("on_epoch_end") is None:
        fit_kwargs.pop("on_epoch_end", None)  # a callback, when given, must be picklable (it runs on rank 0)
    module.cpu()
    with tempfile.TemporaryDirectory(prefix="histoclip-ddp-") as tmp:
        logger.info("Spawning %d %s training processes (backend %s)", devices, device.type, backend_for(device))
        spawn(_fit_worker, (module, dataset, fit_kwargs, tmp), nprocs=devices, device=device)
        records = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    states = [r["state"] for r in records]
    for r, st in enumerate(states[1:], start=1):
        diff = [k for k in st if not torch.equal(st[k], states[0][k])]
        if diff:
            raise RuntimeError(
                f"Rank {r} ended with weights different from rank 0 ({len(diff)} tensors, e.g. {diff[:3]}).")
    module.load_state_dict(states[0])
    module.to(device).eval()
    head = records[0]
    history = pd.DataFrame(head["history"])
    return TrainingResult(history, int(head["epochs_completed"]), bool(head["interrupted"]),
                          {"optimizer_state": head["optimizer_state"], "rank_states": states})


def fit_with_strategy(module, dataset, *, device: torch.device, devices: int | str = 1, strategy: str = "auto",
                      **fit_kwargs):
    """Dispatch to single-process, launcher-driven (torchrun) or spawned data-parallel training."""
    from ._loop import fit

    if strategy not in ("auto", "ddp"):
        raise ValueError(f"strategy must be 'auto' or 'ddp', got {strategy!r}.")
    if devices == "auto":
        devices = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer or 'auto', got {devices!r}.")
    if under_launcher() or (dist.is_available() and dist.is_initialized()):
        init_from_env(device)
        return fit(module, dataset, device=local_device(device), **fit_kwargs)
    if strategy == "ddp" or devices > 1:
        return fit_spawned(module, dataset, devices=devices, device=device, **fit_kwargs)
    return fit(module, dataset, device=device, **fit_kwargs)
