"""Image parameterisations: what the optimiser actually changes.

- ``PixelParam``: the pixels themselves, clipped to [0, 1] after every step (the paper's).
- ``FourierParam``: a spectrum scaled by 1/f, through an inverse real FFT and a sigmoid;
  steps in this space are decorrelated across frequencies, which favours smooth images.

Both start from given images (B, C, H, W) in [0, 1], so any start (uniform noise, noise
masked by a receptive field) works with either.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

_EPS = 1e-3  # keeps logit finite when a Fourier start image touches 0 or 1


class ImageParam(abc.ABC):
    @property
    @abc.abstractmethod
    def tensor(self) -> Tensor:
        """The leaf tensor the optimiser updates."""

    @abc.abstractmethod
    def images(self) -> Tensor:
        """(batch, C, H, W) in [0, 1], differentiable w.r.t. ``tensor``."""

    def project(self) -> None:  # noqa: B027 - optional hook, most parameterisations need none
        """Bring ``tensor`` back into its valid set after a step."""


class PixelParam(ImageParam):
    def __init__(self, start: Tensor) -> None:
        self._pixels = start.detach().clone().clamp_(0.0, 1.0).requires_grad_(True)

    @property
    def tensor(self) -> Tensor:
        return self._pixels

    def images(self) -> Tensor:
        return self._pixels

    def project(self) -> None:
        with torch.no_grad():
            self._pixels.clamp_(0.0, 1.0)


def _spectrum_scale(height: int, width: int, decay: float, device: torch.device) -> Tensor:
    """(H, W//2+1) weights 1/f**decay, f in cycles per image, the DC term kept at 1/f_min."""
    fy = torch.fft.fftfreq(height, device=device)[:, None] * height
    fx = torch.fft.rfftfreq(width, device=device)[None, :] * width
    freq = torch.sqrt(fx**2 + fy**2).clamp_min(1.0)
    return freq.pow(-decay)


class FourierParam(ImageParam):
    """image = sigmoid(irfft2(spectrum * 1/f)); spectrum stored as (B, C, H, W//2+1, 2) reals."""

    def __init__(self, start: Tensor, decay: float = 1.0) -> None:
        _, _, height, width = start.shape
        self._size = (height, width)
        self._scale = _spectrum_scale(height, width, decay, start.device)  # (H, W//2+1)
        logits = torch.logit(start.detach().clamp(_EPS, 1.0 - _EPS))
        spectrum = torch.fft.rfft2(logits, norm="ortho") / self._scale
        self._spectrum = torch.view_as_real(spectrum).contiguous().requires_grad_(True)

    @property
    def tensor(self) -> Tensor:
        return self._spectrum

    def images(self) -> Tensor:
        spectrum = torch.view_as_complex(self._spectrum) * self._scale
        logits = torch.fft.irfft2(spectrum, s=self._size, norm="ortho")
        return torch.sigmoid(logits)


def make_param(kind: str, start: Tensor) -> ImageParam:
    if kind == "pixel":
        return PixelParam(start)
    if kind == "fourier":
        return FourierParam(start)
    raise ValueError(f"unknown parameterization {kind!r}; use 'pixel' or 'fourier'")


def noise_start(generator: torch.Generator, channels: int, size_px: int) -> Tensor:
    """(channels, size, size) uniform noise in [0, 1] drawn from ``generator`` (on the CPU)."""
    return torch.rand((channels, size_px, size_px), generator=generator)


def rf_masked_start(noise: Tensor, mask: Tensor) -> Tensor:
    """Noise inside the receptive field, mid-gray outside.

    noise: (C, H, W) in [0, 1]; mask: (h, w) readout mask of the target site, any scale.
    """
    _, height, width = noise.shape
    weight = mask.detach().abs().float()[None, None]  # (1, 1, h, w)
    weight = torch.nn.functional.interpolate(
        weight, size=(height, width), mode="bilinear", align_corners=False
    )[0]  # (1, H, W)
    peak = weight.max()
    weight = weight / peak if peak > 0 else torch.ones_like(weight)
    return 0.5 + (noise - 0.5) * weight
