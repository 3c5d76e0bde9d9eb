"""Image priors and robustness terms, plus the luminance/contrast matching done before return.

Penalties return one value per image, (batch,), in pixel units ([0, 1] images); their
weights in SynthesisConfig convert them to objective units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


def total_variation(images: Tensor) -> Tensor:
    """(batch, C, H, W) -> (batch,) mean absolute difference between neighbouring pixels."""
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def contrast_energy(images: Tensor) -> Tensor:
    """(batch, C, H, W) -> (batch,) mean squared deviation from mid-gray (an L2 norm on x-0.5)."""
    return ((images - 0.5) ** 2).mean(dim=(1, 2, 3))


def response_variation(values: Tensor) -> Tensor:
    """(copies, batch) objective values of jittered copies -> (batch,) variance across copies."""
    return values.var(dim=0, unbiased=False)


def gaussian_kernel(sigma_px: float) -> Tensor:
    """(k,) normalised 1-D Gaussian, radius 3 sigma."""
    radius = max(1, math.ceil(3.0 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2.0 * sigma_px**2))
    return kernel / kernel.sum()


def blur(images: Tensor, sigma_px: float) -> Tensor:
    """Separable Gaussian blur of (batch, C, H, W), reflecting at the borders.

    Written as a weighted sum of shifted views: for the short kernels used here this is
    several times faster on the CPU than a depthwise convolution.
    """
    if sigma_px <= 0:
        return images
    taps = gaussian_kernel(sigma_px).tolist()
    radius = len(taps) // 2
    if radius >= min(images.shape[-2:]):
        raise ValueError(f"blur sigma {sigma_px} px is too large for {tuple(images.shape[-2:])}")
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    rows = sum(w * padded[..., :, k : k + width] for k, w in enumerate(taps))
    padded = F.pad(rows, (0, 0, radius, radius), mode="reflect")
    return sum(w * padded[..., k : k + height, :] for k, w in enumerate(taps))


def luminance(images: Tensor) -> Tensor:
    """(batch, C, H, W) with C in {1, 3} -> (batch, H, W) luminance."""
    if images.shape[1] == 1:
        return images[:, 0]
    w = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype)
    return (images * w[None, :, None, None]).sum(dim=1)


def image_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, C, H, W) -> mean luminance (batch,), RMS contrast = luminance std (batch,)."""
    lum = luminance(images).flatten(1)
    return lum.mean(dim=1), lum.std(dim=1, unbiased=False)


def match_luminance_contrast(
    images: Tensor,
    mean_lum: float,
    rms_contrast: float,
    tolerance: float = 0.05,
    max_rounds: int = 50,
) -> Tensor:
    """Rescale each image so its mean luminance and RMS contrast equal the targets, in [0, 1].

    An affine map per image (the same for all channels), repeated because clipping to
    [0, 1] moves the statistics; stops when both are within ``tolerance`` x the target,
    well inside it so 8-bit quantisation afterwards keeps them there.
    Raises ValueError if a target is unreachable (e.g. a contrast too high for the mean).
    """
    if not 0.0 < mean_lum < 1.0 or not rms_contrast > 0.0:
        raise ValueError(
            f"natural stats must be 0 < mean_lum < 1 and rms_contrast > 0, "
            f"got ({mean_lum}, {rms_contrast})"
        )
    out = images.detach().clone()
    goal = tolerance / 4.0
    for _ in range(max_rounds):
        mean, rms = image_stats(out)  # (batch,), (batch,)
        done = ((mean - mean_lum).abs() <= goal * mean_lum) & (
            (rms - rms_contrast).abs() <= goal * rms_contrast
        )
        if bool(done.all()):
            return out
        gain = (rms_contrast / rms.clamp_min(1e-6))[:, None, None, None]
        out = ((out - mean[:, None, None, None]) * gain + mean_lum).clamp(0.0, 1.0)
    mean, rms = image_stats(out)
    worst_mean = float(((mean - mean_lum).abs() / mean_lum).max())
    worst_rms = float(((rms - rms_contrast).abs() / rms_contrast).max())
    if worst_mean > tolerance or worst_rms > tolerance:
        raise ValueError(
            f"could not match luminance {mean_lum:.3f} and RMS contrast {rms_contrast:.3f} "
            f"within {tolerance:.0%} (off by {worst_mean:.1%} / {worst_rms:.1%}); such a "
            "contrast does not fit in [0, 1] at that mean: lower rms_contrast or disable matching"
        )
    return out
