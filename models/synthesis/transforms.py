"""Per-step random transforms: shift (default +-6 % of the size, the paper's +-19 px at 299 px),
optional small scale and rotation, applied as one affine resampling per image.

Random numbers come from one generator per image, so an image's jitter sequence does not
depend on which other images share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class JitterConfig:
    shift_frac: float = 0.06  # max shift as a fraction of the image size, each axis
    scale_frac: float = 0.0  # max relative scale change (0.05 = 0.95..1.05)
    rotation_deg: float = 0.0  # max rotation, either direction

    @property
    def active(self) -> bool:
        return self.shift_frac > 0 or self.scale_frac > 0 or self.rotation_deg > 0


@dataclass(frozen=True)
class JitterDraw:
    """Random transform parameters for n = copies * batch views, copy-major."""

    shift_px: Tensor  # (n, 2) whole-pixel shifts (x, y): view pixel i shows image pixel i + shift
    scale: Tensor  # (n,) zoom factor
    angle_rad: Tensor  # (n,)


def draw_jitter(
    generators: Sequence[torch.Generator], copies: int, size_px: int, config: JitterConfig
) -> JitterDraw:
    """Draw the transforms of ``copies`` views of each image; row k*batch + b is copy k of b."""
    max_shift_px = round(config.shift_frac * size_px)
    u = torch.stack([torch.rand((copies, 4), generator=gen) for gen in generators], dim=1)
    u = u.reshape(copies * len(generators), 4)  # (copies*batch, 4) in [0, 1)
    return JitterDraw(
        shift_px=torch.floor(u[:, :2] * (2 * max_shift_px + 1)) - max_shift_px,
        scale=1.0 + (2.0 * u[:, 2] - 1.0) * config.scale_frac,
        angle_rad=(2.0 * u[:, 3] - 1.0) * math.radians(config.rotation_deg),
    )


def affine_matrices(draw: JitterDraw, size_px: int) -> Tensor:
    """(n, 2, 3) sampling matrices for ``F.affine_grid`` (normalised coordinates span 2)."""
    shift = draw.shift_px * 2.0 / size_px
    cos, sin = torch.cos(draw.angle_rad) / draw.scale, torch.sin(draw.angle_rad) / draw.scale
    theta = torch.zeros((shift.shape[0], 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1]
    return theta


def apply_jitter(images: Tensor, draw: JitterDraw, config: JitterConfig) -> Tensor:
    """images (batch, C, H, W) -> (copies * batch, C, H, W) transformed views.

    Content leaving the frame re-enters mirrored (edge pixel repeated), so image statistics
    stay natural. Pure shifts take an exact, cheaper path (padding and cropping).
    """
    if config.scale_frac == 0 and config.rotation_deg == 0:
        return shift_views(images, draw.shift_px)
    return apply_affine(images, affine_matrices(draw, images.shape[-1]))


def shift_views(images: Tensor, shift_px: Tensor) -> Tensor:
    """images (batch, C, H, W), shift_px (copies * batch, 2) -> (copies * batch, C, H, W)."""
    batch, _, height, width = images.shape
    shifts = [(int(dx), int(dy)) for dx, dy in shift_px.to(torch.long).tolist()]
    margin = max([abs(v) for row in shifts for v in row] + [0])
    if margin == 0:
        return images.repeat(len(shifts) // batch, 1, 1, 1) if len(shifts) > batch else images
    if margin > min(height, width):
        raise ValueError(f"shift of {margin} px exceeds the image size {height}x{width}")
    padded = _symmetric_pad(images, margin)  # (batch, C, H + 2m, W + 2m)
    windows = [(row % batch, margin + dy, margin + dx) for row, (dx, dy) in enumerate(shifts)]
    return _Crop.apply(padded, windows, height, width)


class _Crop(torch.autograd.Function):
    """Stack of (height, width) windows of a batch; backward adds each window's gradient in place.

    Autograd's own slicing backward would allocate a full-size zero gradient per window.
    """

    @staticmethod
    def forward(
        ctx: Any, padded: Tensor, windows: list[tuple[int, int, int]], height: int, width: int
    ) -> Tensor:
        ctx.windows, ctx.shape, ctx.size = windows, padded.shape, (height, width)
        return torch.stack([padded[b, :, y : y + height, x : x + width] for b, y, x in windows])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None, None, None]:
        grad = grads[0]
        height, width = ctx.size
        out = grad.new_zeros(ctx.shape)
        for row, (b, y, x) in enumerate(ctx.windows):
            out[b, :, y : y + height, x : x + width] += grad[row]
        return out, None, None, None


def _symmetric_pad(images: Tensor, margin: int) -> Tensor:
    """Mirror padding that repeats the edge pixel (matches grid_sample's 'reflection')."""
    left, right = images[..., :margin].flip(-1), images[..., -margin:].flip(-1)
    wide = torch.cat([left, images, right], dim=-1)
    top, bottom = wide[..., :margin, :].flip(-2), wide[..., -margin:, :].flip(-2)
    return torch.cat([top, wide, bottom], dim=-2)


def apply_affine(images: Tensor, theta: Tensor) -> Tensor:
    """images (batch, C, H, W), theta (copies * batch, 2, 3) -> (copies * batch, C, H, W)."""
    copies = theta.shape[0] // images.shape[0]
    tiled = images.repeat(copies, 1, 1, 1) if copies > 1 else images  # copy-major
    grid = F.affine_grid(
        theta.to(images.device, images.dtype), list(tiled.shape), align_corners=False
    )
    return F.grid_sample(
        tiled, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
