"""SynthesisConfig: every knob of a synthesis run, recorded whole in each image's provenance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.synthesis.transforms import JitterConfig

Parameterization = Literal["pixel", "fourier"]
Start = Literal["noise", "rf_noise", "image"]
Optimizer = Literal["normgrad", "adam"]


@dataclass(frozen=True)
class SynthesisConfig:
    """Defaults follow the paper's released example (200 steps of gradient / std(gradient),
    uniform-noise start, random shifts) scaled to [0, 1] images.

    Regulariser weights are in objective units per unit of the penalty (see regularizers.py),
    so they depend on the objective: a one-hot score lives in (0, 1), a stretch score in the
    response units of the fitted sites.
    """

    size_px: int = 128
    color: bool = False  # False: (batch, 1, H, W) grayscale; True: RGB
    parameterization: Parameterization = "pixel"
    # "rf_noise": noise masked by the target's readout mask; "image": a given image per target
    # (e.g. its best natural image) plus uniform noise of amplitude start_noise
    start: Start = "noise"
    start_noise: float = 0.1
    steps: int = 200  # maximum steps; all of them unless plateau_patience_steps is set
    lr: float = 0.01  # normgrad: pixel step per unit of grad/std(grad); adam: its lr
    optimizer: Optimizer = "normgrad"
    plateau_patience_steps: int | None = None  # stop an image after this many steps without gain
    plateau_min_gain: float = 1e-4  # a gain smaller than this (objective units) does not count
    n_candidates: int = 1  # independent starts per target
    keep_k: int = 1  # best candidates kept per target, by objective on the final image
    seed: int = 0
    shift_frac: float = 0.06  # random shift per step, fraction of size_px (paper: 19/299)
    scale_frac: float = 0.0  # random scale per step, e.g. 0.05 for 0.95..1.05
    rotation_deg: float = 0.0  # random rotation per step, either direction
    jitter_copies: int = 1  # jittered copies per image per step (>= 2 for response variation)
    temperature: float = 1.0  # one-hot softmax temperature (z units)
    ensemble_spread_weight: float = 0.0  # > 0: optimise member mean - weight * member std
    tv_weight: float = 0.0
    response_variation_weight: float = 0.0
    contrast_weight: float = 0.0
    grad_blur_sigma_px: float = 0.0  # Gaussian blur of the image gradient before each step
    match_luminance: bool = True  # match mean luminance and RMS contrast before return
    match_tolerance: float = 0.05
    chunk_images: int = 64  # images (targets x candidates) optimised together; CUDA halves on OOM
    deterministic: bool = True  # deterministic kernels on the CPU (byte-identical PNGs)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.size_px > 0, f"size_px must be > 0, got {self.size_px}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.n_candidates >= 1, f"n_candidates must be >= 1, got {self.n_candidates}"),
            (
                1 <= self.keep_k <= self.n_candidates,
                f"keep_k must be in 1..n_candidates={self.n_candidates}, got {self.keep_k}",
            ),
            (0 <= self.shift_frac < 0.5, f"shift_frac must be in [0, 0.5), got {self.shift_frac}"),
            (0 <= self.scale_frac < 0.5, f"scale_frac must be in [0, 0.5), got {self.scale_frac}"),
            (self.rotation_deg >= 0, f"rotation_deg must be >= 0, got {self.rotation_deg}"),
            (self.jitter_copies >= 1, f"jitter_copies must be >= 1, got {self.jitter_copies}"),
            (
                self.response_variation_weight == 0 or self.jitter_copies >= 2,
                "response_variation_weight needs jitter_copies >= 2 (variance across copies)",
            ),
            (self.chunk_images >= 1, f"chunk_images must be >= 1, got {self.chunk_images}"),
            (0 < self.match_tolerance < 1, "match_tolerance must be in (0, 1)"),
            (
                self.plateau_patience_steps is None or self.plateau_patience_steps >= 1,
                "plateau_patience_steps must be >= 1 or None",
            ),
            (self.parameterization in ("pixel", "fourier"), "parameterization: pixel|fourier"),
            (
                self.start in ("noise", "rf_noise", "image"),
                "start must be 'noise', 'rf_noise' or 'image'",
            ),
            (0 <= self.start_noise <= 1, f"start_noise must be in [0, 1], got {self.start_noise}"),
            (self.optimizer in ("normgrad", "adam"), "optimizer must be 'normgrad' or 'adam'"),
        ]
        for weight in (
            "tv_weight",
            "response_variation_weight",
            "contrast_weight",
            "ensemble_spread_weight",
            "grad_blur_sigma_px",
        ):
            value = getattr(self, weight)
            checks.append((value >= 0, f"{weight} must be >= 0, got {value}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def channels(self) -> int:
        return 3 if self.color else 1

    @property
    def jitter(self) -> JitterConfig:
        return JitterConfig(self.shift_frac, self.scale_frac, self.rotation_deg)
