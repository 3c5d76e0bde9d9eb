"""Per-step random transforms: shift (default +-6 % of the size, the paper's +-19 px at 299 px),
optional small scale and rotation, applied as one affine resampling per image.

Random numbers come from one generator per image, so an image's jitter sequence does not
depend on which other images share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def draw_affine(
    generators: Sequence[torch.Generator], copies: int, size_px: int, config: JitterConfig
) -> Tensor:
    """(copies * batch, 2, 3) affine matrices, copy-major: row k*batch + b is copy k of image b.

    Shifts are whole pixels so that a pure shift resamples exactly.
    """
    max_shift_px = round(config.shift_frac * size_px)
    rows = []
    for gen in generators:
        u = torch.rand((copies, 4), generator=gen)  # (copies, 4) in [0, 1)
        rows.append(u)
    u = torch.stack(rows, dim=1).reshape(copies * len(generators), 4)  # (copies*batch, 4)
    shift_px = torch.floor(u[:, :2] * (2 * max_shift_px + 1)) - max_shift_px
    shift = shift_px * 2.0 / size_px  # normalised coordinates span 2 over the image
    scale = 1.0 + (2.0 * u[:, 2] - 1.0) * config.scale_frac
    angle = (2.0 * u[:, 3] - 1.0) * math.radians(config.rotation_deg)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros((u.shape[0], 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1]
    return theta


def apply_affine(images: Tensor, theta: Tensor) -> Tensor:
    """images (batch, C, H, W), theta (copies * batch, 2, 3) -> (copies * batch, C, H, W).

    Content leaving the frame re-enters mirrored, so the image statistics stay natural.
    """
    copies = theta.shape[0] // images.shape[0]
    tiled = images.repeat(copies, 1, 1, 1)  # copy-major, matches draw_affine
    grid = F.affine_grid(
        theta.to(images.device, images.dtype), list(tiled.shape), align_corners=False
    )
    return F.grid_sample(
        tiled, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
