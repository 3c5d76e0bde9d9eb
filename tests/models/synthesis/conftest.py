"""A toy encoder with a known optimum: each site is a linear readout of a fixed filter.

It has every member of the Encoder contract (models/synthesis/protocol.py) without
subclassing anything, so synthesis is tested against the interface, not an implementation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

FILTER_PX = 32


def smooth_filters(generator: torch.Generator, n: int, size_px: int, blur_px: int = 5) -> Tensor:
    """(n, size, size) smooth zero-mean random patterns with unit RMS."""
    noise = torch.randn((n, 1, size_px + blur_px - 1, size_px + blur_px - 1), generator=generator)
    smooth = F.avg_pool2d(noise, blur_px, stride=1)[:, 0]  # (n, size, size)
    smooth = smooth - smooth.mean(dim=(1, 2), keepdim=True)
    return smooth / smooth.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


class ToyEncoder(torch.nn.Module):
    """prediction[k, b, s] = bias + gain * mean_xy(filter[k, s] * (image[b] - 0.5)).

    Filters share a common component so that sites are correlated, as neighbouring V4 sites
    are; members are small perturbations of the same filters (an ensemble).
    """

    filters: Tensor  # (members, sites, H, W), a buffer

    def __init__(
        self,
        n_sites: int = 6,
        n_members: int = 1,
        seed: int = 0,
        site_ids: list[int] | None = None,
        shared: float = 0.6,
        member_noise: float = 0.3,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        common = smooth_filters(gen, 1, FILTER_PX)  # (1, H, W)
        own = smooth_filters(gen, n_sites, FILTER_PX)  # (sites, H, W)
        base = shared * common + (1 - shared) * own
        jitter = smooth_filters(gen, n_members * n_sites, FILTER_PX).view(
            n_members, n_sites, FILTER_PX, FILTER_PX
        )
        filters = base[None] + (member_noise if n_members > 1 else 0.0) * jitter
        self.register_buffer("filters", filters)  # (members, sites, H, W)
        self.site_ids = site_ids if site_ids is not None else list(range(100, 100 + n_sites))
        self.input_size = FILTER_PX
        self.min_image_size = 16
        self.natural_mean: Tensor | None = None
        self.natural_std: Tensor | None = None
        self.n_members = n_members
        self.gain = 20.0
        self.bias = 10.0

    @property
    def device(self) -> torch.device:
        return self.filters.device

    def _prepare(self, images: Tensor) -> Tensor:
        gray = images.mean(dim=1, keepdim=True)  # (batch, 1, H, W)
        if gray.shape[-1] != FILTER_PX or gray.shape[-2] != FILTER_PX:
            gray = F.interpolate(gray, size=(FILTER_PX, FILTER_PX), mode="bilinear")
        return gray[:, 0] - 0.5  # (batch, H, W)

    def forward_members(self, images: Tensor) -> Tensor:
        x = self._prepare(images)
        drive = torch.einsum("kshw,bhw->kbs", self.filters, x) / (FILTER_PX * FILTER_PX)
        return self.bias + self.gain * drive  # (members, batch, sites)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_members(images).mean(dim=0)  # (batch, sites)

    def spatial_masks(self) -> Tensor | None:
        return F.avg_pool2d(self.filters.abs().mean(0)[:, None], 4)[:, 0]  # (sites, 8, 8)

    def set_natural_stats(self, images: Tensor, batch_size: int = 64) -> None:
        with torch.no_grad():
            preds = torch.cat(
                [
                    self.forward(images[i : i + batch_size])
                    for i in range(0, len(images), batch_size)
                ]
            )
        self.natural_mean = preds.mean(dim=0)
        self.natural_std = preds.std(dim=0).clamp_min(1e-6)


def natural_like_images(n: int, seed: int = 1, size_px: int = FILTER_PX) -> Tensor:
    """(n, 1, H, W) smooth random images in [0, 1]: a stand-in natural set."""
    gen = torch.Generator().manual_seed(seed)
    patterns = smooth_filters(gen, n, size_px, blur_px=7)
    return (0.45 + 0.15 * patterns).clamp(0, 1)[:, None]


class ToyWithoutMasks(ToyEncoder):
    def spatial_masks(self) -> Tensor | None:
        return None


@pytest.fixture
def toy() -> ToyEncoder:
    return ToyEncoder()


@pytest.fixture
def toy_with_stats() -> ToyEncoder:
    encoder = ToyEncoder()
    encoder.set_natural_stats(natural_like_images(64))
    return encoder


@pytest.fixture
def toy_ensemble() -> ToyEncoder:
    encoder = ToyEncoder(n_members=4)
    encoder.set_natural_stats(natural_like_images(64))
    return encoder
