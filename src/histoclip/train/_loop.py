from __future__ import annotations

import copy
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .._settings import logger, settings
from ._distributed import rank_and_world


def pick_device(accelerator: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else MPS, else CPU; otherwise the named torch device."""
    if accelerator == "auto":
        accelerator = settings.device
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if accelerator == "gpu":
        accelerator = "cuda"
    dev = torch.device(accelerator)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"accelerator={accelerator!r} was asked for, but CUDA is not available; use 'cpu' or 'auto'."
        )
    return dev


def cpu_threads(num_workers: int = 0) -> int:
    """Torch threads for one call: ``settings.n_jobs`` less the DataLoader worker processes, at least one.

    Under torch.distributed with the default ``n_jobs``, the CPUs are shared between the processes of the node
    (``LOCAL_WORLD_SIZE``, else the world size), so that ``devices=n`` on one machine does not run n x n_jobs threads.
    """
    n = settings.n_jobs
    _, world = rank_and_world()
    if world > 1 and settings._n_jobs is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        n = max(1, n // max(1, local))
    return max(1, n - max(0, int(num_workers)))


@contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored afterwards, even on error."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def augment_batch(x: torch.Tensor, gen: torch.Generator, colour: float = 0.1) -> torch.Tensor:
    """Random flips, 90-degree rotations and mild brightness/contrast jitter of a uint8 (B, 3, H, W) batch.

    Draws only from ``gen``; returns float32 in [0, 255].
    """
    b = x.shape[0]
    x = x.float()
    k = torch.randint(0, 4, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for r in range(4):
        sel = (k == r).nonzero().flatten()
        if sel.numel():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    out[flip] = out[flip].flip(-1)
    if colour > 0:
        bright = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * colour
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * colour
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * contrast + mean) * bright
    return out.clamp_(0, 255)


_LAZY_IMPORTED = False


@contextmanager
def _deferred_sigint():
    """Hold back Ctrl-C (SIGINT) inside the block and deliver it as KeyboardInterrupt right after it.

    A no-op outside the main thread (where Python delivers signals) or when SIGINT is not Python's default handler.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def import_lazy_modules() -> None:
    """Import what torch imports lazily on a process's first optimizer (``torch._dynamo``, ~800 modules, ~1 s).

    Torch does that on the first ``torch.optim.AdamW(...)`` of a process. A Ctrl-C in the middle of it would
    leave half-imported modules behind, and torch failing for the rest of the process; so it happens here, once,
    with Ctrl-C held back until the imports are complete (then raised, before training starts).
    """
    global _LAZY_IMPORTED
    if _LAZY_IMPORTED:
        return
    with _deferred_sigint():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        p.sum().backward()
        opt.step()
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1)
        _progress_bar_class()
    _LAZY_IMPORTED = True


def _progress_bar_class():
    """The progress bar: tqdm's notebook bar where ipywidgets can draw it, the text bar otherwise.

    ``tqdm.auto`` in a Jupyter kernel without ipywidgets warns ("IProgress not found") into the notebook's output
    and falls back to the text bar anyway; this picks the text bar without the warning.
    """
    from importlib.util import find_spec

    if find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


@dataclass
class TrainingResult:
    """What a training run leaves: its history and how it ended."""

    history: pd.DataFrame
    epochs_completed: int
    interrupted: bool = False
    extras: dict = field(default_factory=dict)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16", "16"):
        dtype = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())) \
            else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype == torch.float16
    return torch.autocast(device.type, enabled=False), False


def fit(
    module: torch.nn.Module,
    dataset: Dataset,
    *,
    max_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    augment: bool = True,
    precision: str = "auto",
    num_workers: int = 0,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch_end=None,
) -> TrainingResult:
    """Train ``module`` (its ``forward(image, expression)`` returns a LossOutput) on ``dataset``.

    Seeded: shuffling, augmentation and dropout draw only from generators derived from ``seed``; the global
    torch random state is restored afterwards. Interrupting (Ctrl-C) keeps the weights of the last completed
    epoch; any other exception in a batch also restores them before it propagates. A non-finite loss stops
    training with :class:`FloatingPointError` naming the epoch and step.

    Runs on ``settings.n_jobs`` torch threads less ``num_workers`` (restored afterwards); the progress bar shows
    the count.

    ``start_epoch`` and ``optimizer_state`` resume a run: the cosine schedule (over ``start_epoch + max_epochs``
    epochs) is fast-forwarded and Adam's moments restored. ``on_epoch_end(epoch, optimizer, row)`` is called after
    each completed epoch with its history row (used for checkpoints).
    """
    n = len(dataset)
    if n < 2:
        raise ValueError(f"Training needs at least 2 spots, got {n}.")
    import_lazy_modules()  # before anything below: Ctrl-C during torch's first lazy imports must not break torch
    with torch_threads(cpu_threads(num_workers)) as n_threads:
        return _fit(module, dataset, n_threads=n_threads, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, seed=seed, device=device, augment=augment, precision=precision,
                    num_workers=num_workers, start_epoch=start_epoch, optimizer_state=optimizer_state,
                    on_epoch_end=on_epoch_end)


def _fit(
    module: torch.nn.Module,
    dataset: Dataset,
    *,
    n_threads: int,
    max_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    augment: bool,
    precision: str,
    num_workers: int,
    start_epoch: int,
    optimizer_state: dict | None,
    on_epoch_end,
) -> TrainingResult:
    n = len(dataset)
    batch_size = int(min(batch_size, n))
    rank, world = rank_and_world()  # (0, 1) unless under torch.distributed (see train/_distributed.py)
    loader_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1 + 7919 * rank)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed) if world > 1 \
        else None
    n_local = n if sampler is None else len(sampler)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=n_local >= 2 * batch_size,
        generator=loader_gen,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=None,
    )
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:  # resuming: keep Adam's moments, take lr and weight decay from the arguments
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr  # the schedule below is fast-forwarded from the base lr
            group["weight_decay"] = weight_decay
    total = start_epoch + max_epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), last_epoch=-1)
    with warnings.catch_warnings():  # fast-forwarding a resumed schedule before any optimizer.step() is intended
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(start_epoch):
            sched.step()
    autocast, use_scaler = _autocast(device, precision)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    module.to(device)
    module.to(memory_format=torch.channels_last)  # NHWC convs: faster on CUDA and on x86 CPUs (oneDNN)
    net = module
    if world > 1:  # gradients averaged across ranks; the loss already sees every rank's embeddings
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    rows: list[dict] = []
    best_state = copy.deepcopy(module.state_dict())
    completed = 0
    interrupted = False
    tqdm = _progress_bar_class()
    where = f"{n_threads} CPU thread{'s' if n_threads > 1 else ''}" if device.type == "cpu" else device.type
    bar = tqdm(range(start_epoch, total), desc=f"histoclip training ({where})", unit="epoch",
               disable=not settings.progress or rank != 0, leave=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 2 + 7919 * rank)
        try:
            for epoch in bar:
                module.train()
                if sampler is not None:
                    sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                sums = np.zeros(3)
                count = 0
                for step, (img, expr, _) in enumerate(loader):
                    if augment and img.dtype == torch.uint8:
                        img = augment_batch(img, aug_gen)
                    img = img.to(device, non_blocking=True)
                    expr = expr.to(device, non_blocking=True)
                    if img.ndim == 4:
                        img = img.contiguous(memory_format=torch.channels_last)
                    with autocast:
                        out = net(img, expr)
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(
                            f"The loss became {out.loss.item()} at epoch {epoch + 1}, step {step + 1}. Lower lr "
                            f"(now {lr}), raise the temperature, or check the inputs for NaN/inf values."
                        )
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(out.loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        out.loss.backward()
                        opt.step()
                    bs = img.shape[0]
                    sums += bs * np.array([out.loss.item(), out.image_to_expression.item(),
                                           out.expression_to_image.item()])
                    count += bs
                sched.step()
                if world > 1:  # the history holds all-rank means
                    tot = torch.tensor([*sums, count], dtype=torch.float64, device=device)
                    torch.distributed.all_reduce(tot)
                    sums, count = tot[:3].cpu().numpy(), int(tot[3].item())
                mean = sums / max(count, 1)
                rows.append({"epoch": epoch + 1, "loss": mean[0], "image_to_expression": mean[1],
                             "expression_to_image": mean[2], "lr": opt.param_groups[0]["lr"],
                             "seconds": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{mean[0]:.3f}")
                if world > 1:  # BatchNorm running stats drift per rank after the last forward: take rank 0's
                    for t in module.state_dict().values():
                        torch.distributed.broadcast(t, src=0)
                best_state = copy.deepcopy(module.state_dict())
                completed += 1
                if on_epoch_end is not None and rank == 0:
                    on_epoch_end(epoch + 1, opt, rows[-1])
        except KeyboardInterrupt:
            interrupted = True
            module.load_state_dict(best_state)
            logger.warning("Training interrupted; keeping the weights of the last completed epoch (%d).",
                           start_epoch + completed)
        except BaseException:
            module.load_state_dict(best_state)
            raise
        finally:
            bar.close()
            module.to(memory_format=torch.contiguous_format)  # saved/loaded weights then run the same kernels
    module.eval()
    history = pd.DataFrame(rows, columns=["epoch", "loss", "image_to_expression", "expression_to_image", "lr",
                                          "seconds"])
    return TrainingResult(history, completed, interrupted, {"optimizer_state": opt.state_dict()})
