"""Shared pieces for the models tests: a small random AlexNet and planted factorized data."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from models.backbones import Backbone, RandomWeightsWarning, load_backbone

SMALL_INPUT_PX = 96  # conv3 of AlexNet is 384 x 5 x 5 at this input size


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tests use small tensors: one thread avoids thread-pool contention on a shared
    machine (up to 20x slower with two threads there). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def alexnet() -> Backbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_backbone("alexnet", None, seed=0)


def smooth_images(n: int, size_px: int, seed: int) -> Tensor:
    """(n, 1, size, size) smooth random images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, 1, size_px // 4, size_px // 4), generator=gen)
    up = torch.nn.functional.interpolate(noise, size=(size_px, size_px), mode="bilinear")
    return up.clamp(0.0, 1.0)


def gaussian_masks(centers: list[tuple[float, float]], size: int, sigma: float) -> Tensor:
    """(sites, size, size) Gaussian blobs."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.stack(
        [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)) for cy, cx in centers]
    )
