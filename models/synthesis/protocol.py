"""The part of the Encoder (models/encoder.py) that synthesis relies on.

Typed as a Protocol so that anything with these members can be optimised against,
including the small analytic encoders the tests use. Images are float tensors in [0, 1],
(batch, 1, H, W) or (batch, 3, H, W), on the encoder's device; the encoder does its own
preprocessing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class EncoderLike(Protocol):
    site_ids: list[int]  # stable site ids, in output column order
    input_size: int  # backbone input size in px
    min_image_size: int  # smallest H/W accepted
    natural_mean: Tensor | None  # (sites,) predicted mean over the natural set
    natural_std: Tensor | None  # (sites,) predicted std over the natural set, > 0
    n_members: int  # ensemble size K

    def forward(self, images: Tensor) -> Tensor:
        """(batch, C, H, W) in [0, 1] -> (batch, sites), ensemble mean, differentiable."""
        ...

    def forward_members(self, images: Tensor) -> Tensor:
        """(batch, C, H, W) -> (members, batch, sites), differentiable."""
        ...

    def spatial_masks(self) -> Tensor | None:
        """(sites, h, w) readout masks, None when the readout has none."""
        ...

    def set_natural_stats(self, images: Tensor, batch_size: int = 64) -> None: ...

    @property
    def device(self) -> torch.device: ...
