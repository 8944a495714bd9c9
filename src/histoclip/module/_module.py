"""The two-tower image-expression network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._encoders import MLP, ImageEncoder, ProjectionHead
from ._loss import LossOutput, clip_loss, pml_clip_loss


class HistoclipModule(nn.Module):
    """Image tower and expression tower projected into one L2-normalised latent space.

    Parameters
    ----------
    n_inputs
        Width of the expression encoder's input (genes, or twice that with neighbour context).
    image_backbone, weights, freeze_backbone, image_in_features
        See :class:`~histoclip.module.ImageEncoder`.
    hidden_dim
        Width of the expression MLP (two layers: ``hidden_dim``, ``hidden_dim // 2``).
    latent_dim
        Size of each modality's embedding.
    dropout
        Dropout in the MLP and heads.
    temperature
        Softmax temperature of the contrastive loss.
    loss
        ``"clip"`` (cross-entropy on the B x B similarity matrix) or ``"pml"`` (pytorch-metric-learning's
        NTXentLoss; same values, slower).
    spatial_weight, spatial_temperature
        Weight and temperature of the expression-to-neighbourhood InfoNCE term (see :meth:`forward`).

    """

    def __init__(
        self,
        n_inputs: int,
        *,
        image_backbone: str = "cnn",
        weights: str | None = None,
        freeze_backbone: bool = False,
        image_in_features: int | None = None,
        hidden_dim: int = 512,
        latent_dim: int = 64,
        dropout: float = 0.1,
        temperature: float = 0.1,
        loss: str = "clip",
        spatial_weight: float = 1.0,
        spatial_temperature: float = 0.5,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if loss not in ("clip", "pml"):
            raise ValueError(f"loss must be 'clip' or 'pml', got {loss!r}.")
        self.image_encoder = ImageEncoder(
            image_backbone, weights=weights, freeze=freeze_backbone, in_features=image_in_features
        )
        self.expression_encoder = MLP((n_inputs, hidden_dim, hidden_dim // 2), dropout=dropout)
        self.image_head = ProjectionHead(self.image_encoder.out_dim, latent_dim, dropout)
        self.expression_head = ProjectionHead(hidden_dim // 2, latent_dim, dropout)
        self.temperature = float(temperature)
        self.loss_name = loss
        self.n_inputs = int(n_inputs)
        self.spatial_weight = float(spatial_weight)
        self.spatial_temperature = float(spatial_temperature)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding ``(B, latent_dim)``."""
        return F.normalize(self.image_head(self.image_encoder(x)).float(), dim=-1)

    def encode_expression(self, e: torch.Tensor) -> torch.Tensor:
        """L2-normalised expression embedding ``(B, latent_dim)``."""
        return F.normalize(self.expression_head(self.expression_encoder(e)).float(), dim=-1)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> LossOutput:
        """Contrastive loss of a batch of patches ``x`` and expression inputs ``e``.

        ``e`` is ``(B, n_inputs)``, or ``(B, 2 * n_inputs)`` holding each spot's own expression and the mean of its
        spatial neighbours': then the expression embedding of a spot must also pick out its neighbourhood's among
        the batch (a second InfoNCE term, weight ``spatial_weight``, temperature ``spatial_temperature``), which
        keeps the expression embedding spatially coherent where the image is a weak signal.
        """
        fn = clip_loss if self.loss_name == "clip" else pml_clip_loss
        own = e[:, : self.n_inputs]
        z_expr = self.encode_expression(own)
        out = fn(self.encode_image(x), z_expr, self.temperature)
        if e.shape[1] == 2 * self.n_inputs and self.spatial_weight > 0:
            z_nbr = self.encode_expression(e[:, self.n_inputs :])
            sp = fn(z_expr, z_nbr, self.spatial_temperature)
            out = LossOutput(out.loss + self.spatial_weight * sp.loss, out.image_to_expression,
                             out.expression_to_image, sp.loss.detach())
        return out
