"""The image-expression network: two encoders, per-spot attention fusion, decoders and contrastive heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._encoders import ImageEncoder, ProjectionHead
from ._loss import LossOutput, clip_loss, pml_clip_loss

#: colour statistics of a patch that the image decoder reconstructs: per-channel mean and sd in each 2 x 2 quadrant
IMAGE_TARGET_DIM = 24


def patch_colour_targets(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of each quadrant of uint8 ``(B, 3, H, W)`` patches, centred on 0.

    A cheap description of what a patch looks like (stain density, texture contrast, where in the patch) that the
    fused embedding must be able to reconstruct, so morphology keeps a voice in it.
    """
    v = x.float() / 255.0
    h, w = v.shape[-2] // 2 or 1, v.shape[-1] // 2 or 1
    quads = [v[..., :h, :w], v[..., :h, w:], v[..., h:, :w], v[..., h:, w:]]
    stats = [torch.cat([q.mean(dim=(2, 3)), q.std(dim=(2, 3), correction=0)], dim=1) for q in quads]
    return (torch.cat(stats, dim=1) - 0.3) / 0.2


class HistoclipModule(nn.Module):
    """Image and expression encoders, a per-spot attention fusion of the two, and the losses that train them.

    Expression path: the standardised log expression of the model's genes is projected on a fixed basis (the
    training data's principal components, the buffer ``expression_basis`` set by :class:`~histoclip.model.HistoCLIP`,
    which does the projection: :meth:`project`), and a spot's own projection is joined with the mean of its spatial
    neighbours' (a one-hop graph layer) and mapped linearly to the ``embedding_dim`` expression latent. The network
    itself only ever sees the projections (``n_components`` values per spot), so what a slide costs does not grow
    with its genes. Image path: the image backbone (small CNN, ResNet or precomputed
    features) and an MLP give the image latent. Fusion: an attention score per modality and spot (SpatialGlue's
    form), softmax over the two, and the weighted sum of the latents: the joint embedding.

    Training objective (each term can be switched off for ablations):

    - ``reconstruction_weight``: the joint embedding must reconstruct the spot's expression projection (half its own,
      half its neighbourhood's) and, with ``image_reconstruction_weight``, the colour statistics of its patch
      (or its precomputed features): both modalities' own structure stays in the joint embedding;
    - ``cross_modal_weight``: symmetric InfoNCE between projections of the image and expression latents (CLIP/BLEEP);
      its projections are what expression retrieval from the image uses;
    - ``spatial_weight``: InfoNCE between a spot's expression latent and that of a random spatial neighbour
      (spots of one tissue domain share a code), with ``spatial_temperature``.

    Parameters
    ----------
    n_inputs
        Genes (width of the expression input).
    image_backbone, weights, freeze_backbone, image_in_features
        See :class:`~histoclip.module.ImageEncoder`.
    hidden_dim
        Width of the image MLP.
    latent_dim
        Width of the contrastive projections (retrieval space).
    embedding_dim
        Width of the image, expression and joint embeddings.
    n_components
        Principal components the expression is projected on.
    dropout
        Dropout in the image MLP and the contrastive heads.
    temperature
        Softmax temperature of the cross-modal InfoNCE.
    loss
        ``"clip"`` (cross-entropy on the B x B similarity matrix) or ``"pml"`` (pytorch-metric-learning's
        NTXentLoss; same values, slower).
    spatial_weight, spatial_temperature
        Weight and temperature of the neighbour InfoNCE term.
    reconstruction_weight, image_reconstruction_weight, cross_modal_weight
        Weights of the other terms (see above).
    mask_rate
        Share of a spot's own expression components zeroed at random during training (a denoising corruption).
    fusion
        ``"attention"`` (learned per-spot weights) or ``"mean"`` (fixed equal weights).
    use_image, spatial_context
        Ablation switches: without the image the joint embedding is the expression latent; without spatial context
        the neighbourhood input is zero and the neighbour term is off.

    """

    def __init__(
        self,
        n_inputs: int,
        *,
        image_backbone: str = "cnn",
        weights: str | None = None,
        freeze_backbone: bool = False,
        image_in_features: int | None = None,
        hidden_dim: int = 256,
        latent_dim: int = 64,
        embedding_dim: int = 32,
        n_components: int = 50,
        dropout: float = 0.1,
        temperature: float = 0.1,
        loss: str = "clip",
        spatial_weight: float = 1.0,
        spatial_temperature: float = 0.5,
        reconstruction_weight: float = 1.0,
        image_reconstruction_weight: float = 1.0,
        cross_modal_weight: float = 1.0,
        mask_rate: float = 0.2,
        fusion: str = "attention",
        use_image: bool = True,
        spatial_context: bool = True,
        skip_components: int = 0,
    ) -> None:
        super().__init__()
        if temperature <= 0 or spatial_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {spatial_temperature}.")
        if loss not in ("clip", "pml"):
            raise ValueError(f"loss must be 'clip' or 'pml', got {loss!r}.")
        if fusion not in ("attention", "mean"):
            raise ValueError(f"fusion must be 'attention' or 'mean', got {fusion!r}.")
        if not 0 <= mask_rate < 1:
            raise ValueError(f"mask_rate must be in [0, 1), got {mask_rate}.")
        for name, w in (("spatial_weight", spatial_weight), ("reconstruction_weight", reconstruction_weight),
                        ("image_reconstruction_weight", image_reconstruction_weight),
                        ("cross_modal_weight", cross_modal_weight)):
            if w < 0:
                raise ValueError(f"{name} must be non-negative, got {w}.")
        self.n_inputs = int(n_inputs)
        n_components = int(min(n_components, n_inputs))
        self.n_components = n_components
        self.register_buffer("expression_basis", torch.zeros(self.n_inputs, n_components))
        # the expression skip: principal axes of the log expression (not standardised: the model-free representation
        # of tl.domains), kept beside the learned joint embedding; and the scales of the two blocks of the output
        self.skip_components = int(max(0, min(skip_components, n_inputs)))
        self.register_buffer("skip_basis", torch.zeros(self.n_inputs, self.skip_components))
        self.register_buffer("block_scale", torch.ones(2))
        self.image_encoder = ImageEncoder(
            image_backbone, weights=weights, freeze=freeze_backbone, in_features=image_in_features
        )
        d = int(embedding_dim)
        self.expression_latent = nn.Linear(2 * n_components, d)
        self.image_latent = nn.Sequential(
            nn.LayerNorm(self.image_encoder.out_dim), nn.Linear(self.image_encoder.out_dim, hidden_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden_dim, d),
        )
        self.attention = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
        self.expression_decoder = nn.Linear(d, n_components)
        self.image_target_dim = image_in_features if image_backbone == "features" else IMAGE_TARGET_DIM
        self.image_decoder = nn.Linear(d, int(self.image_target_dim))
        self.image_head = ProjectionHead(d, latent_dim, dropout)
        self.expression_head = ProjectionHead(d, latent_dim, dropout)
        self.temperature = float(temperature)
        self.loss_name = loss
        self.spatial_weight = float(spatial_weight) if spatial_context else 0.0
        self.spatial_temperature = float(spatial_temperature)
        self.reconstruction_weight = float(reconstruction_weight)
        self.image_reconstruction_weight = float(image_reconstruction_weight) if use_image else 0.0
        self.cross_modal_weight = float(cross_modal_weight) if use_image else 0.0
        self.mask_rate = float(mask_rate)
        self.fusion = fusion
        self.use_image = bool(use_image)
        self.spatial_context = bool(spatial_context)

    def init_expression_latent_from_pca(self) -> None:
        """Start the expression latent at the spot's smoothed principal components.

        The latent is ``0.5 * (own + neighbourhood)`` of the first ``embedding_dim`` components (identity blocks, zero
        bias): an untrained or barely trained model is then already the expression PCA it projects, and training moves
        it from there.
        """
        lin = self.expression_latent
        d, k = lin.out_features, self.n_components
        m = min(d, k)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            idx = torch.arange(m)
            lin.weight[idx, idx] = 0.5 if self.spatial_context else 1.0
            if self.spatial_context:
                lin.weight[idx, k + idx] = 0.5

    # ------------------------------------------------------------------------------------------- encoders
    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Standardised inputs ``(B, n_inputs)`` projected on the expression basis, ``(B, n_components)``."""
        return e.float() @ self.expression_basis

    def expression_embedding(self, p: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expression latent ``(B, embedding_dim)`` of projected inputs ``p = [own, neighbourhood mean]`` (or own).

        Each block is ``n_components`` wide: the spot's (and its neighbourhood mean's) :meth:`project`.
        """
        k = self.n_components
        own = p[:, :k].float()
        if mask is not None:
            own = own * mask
        if p.shape[1] >= 2 * k and self.spatial_context:
            nbr = p[:, k : 2 * k].float()
        else:
            nbr = torch.zeros_like(own)
        return self.expression_latent(torch.cat([own, nbr], dim=1))

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Image latent ``(B, embedding_dim)``."""
        return self.image_latent(self.image_encoder(x).float())

    def fuse(self, z_img: torch.Tensor | None, z_expr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint embedding and the image's weight per spot (``(B, d)``, ``(B,)``)."""
        if z_img is None or not self.use_image:
            return z_expr, torch.zeros(z_expr.shape[0], device=z_expr.device)
        if self.fusion == "mean":
            w = torch.full((z_expr.shape[0], 2), 0.5, device=z_expr.device)
        else:
            scores = torch.cat([self.attention(z_expr), self.attention(z_img)], dim=1)
            w = torch.softmax(scores, dim=1)
        return w[:, :1] * z_expr + w[:, 1:] * z_img, w[:, 1]

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive projection of the image (the retrieval space), ``(B, latent_dim)``."""
        return F.normalize(self.image_head(self.image_embedding(x)).float(), dim=-1)

    def encode_expression(self, p: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive projection of projected expression inputs, ``(B, latent_dim)``."""
        return F.normalize(self.expression_head(self.expression_embedding(p)).float(), dim=-1)

    # ------------------------------------------------------------------------------------------- training
    def _image_target(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # precomputed features
            return F.layer_norm(x.float(), x.shape[1:])
        return patch_colour_targets(x)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> LossOutput:
        """Training loss of a batch of patches ``x`` and projected expression inputs ``e``.

        With ``k = n_components`` (each block a :meth:`project` of standardised inputs): ``e`` is ``(B, k)`` (own
        expression), ``(B, 2k)`` (own and neighbourhood mean) or ``(B, 4k)`` (also a random spatial neighbour's own and
        neighbourhood mean: the positive of the neighbour term).
        """
        fn = clip_loss if self.loss_name == "clip" else pml_clip_loss
        g = self.n_components
        mask = None
        if self.mask_rate > 0:
            mask = (torch.rand(e.shape[0], self.n_components, device=e.device) >= self.mask_rate).float()
        z_expr = self.expression_embedding(e[:, : 2 * g], mask=mask)
        z_img = self.image_embedding(x) if self.use_image else None
        joint, _ = self.fuse(z_img, z_expr)
        zero = torch.zeros((), device=e.device)
        total = zero
        rec = zero
        if self.reconstruction_weight > 0:
            own = e[:, :g].float()
            nbr = e[:, g : 2 * g].float() if e.shape[1] >= 2 * g and self.spatial_context else own
            rec = F.mse_loss(self.expression_decoder(joint).float(), 0.5 * (own + nbr))
            if self.image_reconstruction_weight > 0 and z_img is not None:
                rec = rec + self.image_reconstruction_weight * F.mse_loss(
                    self.image_decoder(z_img).float(), self._image_target(x))
            total = total + self.reconstruction_weight * rec
        i2e = e2i = zero
        if self.cross_modal_weight > 0 and z_img is not None:
            out = fn(F.normalize(self.image_head(z_img).float(), dim=-1),
                     F.normalize(self.expression_head(z_expr).float(), dim=-1), self.temperature)
            total = total + self.cross_modal_weight * out.loss
            i2e, e2i = out.image_to_expression, out.expression_to_image
        sp = None
        if self.spatial_weight > 0 and e.shape[1] >= 4 * g:
            z_pos = F.normalize(self.expression_embedding(e[:, 2 * g : 4 * g]).float(), dim=-1)
            sp = fn(F.normalize(z_expr.float(), dim=-1), z_pos, self.spatial_temperature).loss
            if z_img is not None:
                sp = 0.5 * (sp + fn(F.normalize(joint.float(), dim=-1), z_pos, self.spatial_temperature).loss)
            total = total + self.spatial_weight * sp
            sp = sp.detach()
        return LossOutput(total, i2e, e2i, sp, rec.detach())
