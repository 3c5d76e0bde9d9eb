"""Encoder: frozen backbone truncated at a layer + fitted readout(s). The fit/synthesis seam.

Images are float tensors in [0, 1], (batch, 1, H, W) or (batch, 3, H, W), on the encoder's
device; the encoder does all preprocessing itself. Predictions are in the units of the responses
the readout was fitted on. Only pixels get gradients: the backbone and readout are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.features import Trunk
from models.readouts import Readout


class Encoder(nn.Module):
    """``forward(images) -> (batch, sites)``, the ensemble mean; differentiable wrt images."""

    natural_mean: Tensor | None  # (sites,) predicted-response mean over the natural set
    natural_std: Tensor | None  # (sites,) predicted-response std over the natural set (> 0)

    def __init__(self, trunk: Trunk, readout: Readout, site_ids: Sequence[int]) -> None:
        super().__init__()
        if len(site_ids) != readout.n_sites:
            raise ValueError(f"{len(site_ids)} site ids for a readout of {readout.n_sites} sites")
        if len(set(site_ids)) != len(site_ids):
            raise ValueError("site ids must be unique")
        self.trunk = trunk
        self.readout = readout.requires_grad_(False)
        self.site_ids: list[int] = [int(s) for s in site_ids]
        self.input_size: int = trunk.input_size
        self.min_image_size: int = trunk.min_image_size
        self.n_members: int = readout.n_members
        self.register_buffer("natural_mean", None)
        self.register_buffer("natural_std", None)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.readout.target_scale.device

    @property
    def backbone_id(self) -> str:
        return self.trunk.backbone_id

    @property
    def weights_sha256(self) -> str:
        return self.trunk.weights_sha256

    @property
    def layer(self) -> str:
        return self.trunk.layer

    def forward_members(self, images: Tensor) -> Tensor:
        """(batch, 1|3, H, W) -> (members, batch, sites)."""
        return self.readout.forward_members(self.trunk(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_members(images).mean(0)  # (batch, sites)

    def predict_with_spread(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Ensemble mean and standard deviation across members, each (batch, sites)."""
        members = self.forward_members(images)
        spread = (
            members.std(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(members[0])
        )
        return members.mean(0), spread

    def spatial_masks(self) -> Tensor | None:
        """(sites, h, w) factorized masks averaged over members; None for ridge."""
        return self.readout.spatial_masks()

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """Batched, gradient-free forward over many images -> (n, sites) on the encoder device."""
        outputs = [
            self(images[start : start + batch_size].to(self.device))
            for start in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(outputs)

    def set_natural_stats(self, images: Tensor, batch_size: int = 64) -> None:
        """Natural-set mean/std of the predictions (for z-scoring objectives)."""
        if images.shape[0] < 2:
            raise ValueError("natural statistics need at least 2 images")
        self.set_natural_stats_from_predictions(self.predict(images, batch_size))

    @torch.no_grad()
    def set_natural_stats_from_predictions(self, predictions: Tensor) -> None:
        """predictions (n, sites) of this encoder on the natural set."""
        if predictions.ndim != 2 or predictions.shape[1] != len(self.site_ids):
            raise ValueError(
                f"predictions must be (n, {len(self.site_ids)}); got {tuple(predictions.shape)}"
            )
        predictions = predictions.to(self.device, torch.float32)
        self.natural_mean = predictions.mean(0)
        self.natural_std = predictions.std(0, unbiased=False).clamp_min(1e-8)

    def train(self, mode: bool = True) -> Encoder:
        # Frozen model: always in eval mode.
        return super().train(False)
