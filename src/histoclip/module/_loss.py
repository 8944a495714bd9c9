"""Symmetric image-expression contrastive loss (CLIP/InfoNCE form)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    """The total loss, its two image-expression directions, the spatial and reconstruction terms (for logging)."""

    loss: torch.Tensor
    image_to_expression: torch.Tensor
    expression_to_image: torch.Tensor
    spatial: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None


def gather_global(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``z`` across processes (with gradients) so every process sees global negatives.

    Returns the gathered tensor and the offset of this process's rows in it. Single-process runs return ``z``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(z.contiguous())
    offset = sum(p.shape[0] for p in parts[: dist.get_rank()])
    return torch.cat(parts, dim=0), offset


def clip_loss(z_img: torch.Tensor, z_expr: torch.Tensor, temperature: float = 0.1) -> LossOutput:
    """Symmetric InfoNCE: each spot's image should pick its own expression among the batch, and back.

    ``z_img`` and ``z_expr`` are L2-normalised ``(B, d)`` embeddings. Under torch.distributed the other
    processes' embeddings are gathered and used as extra negatives.
    """
    all_img, offset = gather_global(z_img)
    all_expr, _ = gather_global(z_expr)
    targets = torch.arange(z_img.shape[0], device=z_img.device) + offset
    logits_i2e = z_img @ all_expr.T / temperature
    logits_e2i = z_expr @ all_img.T / temperature
    i2e = F.cross_entropy(logits_i2e.float(), targets)
    e2i = F.cross_entropy(logits_e2i.float(), targets)
    return LossOutput(0.5 * (i2e + e2i), i2e.detach(), e2i.detach())


def pml_clip_loss(z_img: torch.Tensor, z_expr: torch.Tensor, temperature: float = 0.1) -> LossOutput:
    """The same loss through pytorch-metric-learning's ``NTXentLoss`` (cross-modal ``ref_emb`` form).

    Gives the values of :func:`clip_loss` (tested), but is much slower (see ``benchmarks/loss.py``); kept for users who
    want to swap in other pytorch-metric-learning losses.
    """
    from pytorch_metric_learning.losses import NTXentLoss

    loss_fn = NTXentLoss(temperature=temperature)
    labels = torch.arange(z_img.shape[0], device=z_img.device)
    # a distinct tensor for ref_labels: the same object makes the library treat it as self-comparison (loss 0)
    i2e = loss_fn(z_img, labels, ref_emb=z_expr, ref_labels=labels.clone())
    e2i = loss_fn(z_expr, labels, ref_emb=z_img, ref_labels=labels.clone())
    return LossOutput(0.5 * (i2e + e2i), i2e.detach(), e2i.detach())
