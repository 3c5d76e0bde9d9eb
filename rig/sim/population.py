"""The virtual monkey's hidden ground truth: a V4-like population of multi-unit sites.

It shares no code, weights or deep network with the model backbones. Like the ``v1`` backbone
it starts from oriented filters, but a different bank built differently (one-sided Fourier-domain
filters, 3 scales, on a 64 px image), and it adds what no backbone has (normalisation, threshold,
saturation, drift), so even the ``v1`` model only approximates it:

1. the image (grayscale, [0, 1]) is resampled to ``image_px`` and whitened slightly;
2. a bank of complex oriented band-pass filters (``n_orientations`` x ``n_scales``, built in the
   Fourier domain) gives local energy (a quadrature pair's magnitude) per channel;
3. divisive normalisation: each channel's squared energy over the pooled energy of all
   orientations at its scale, blurred over space, plus a semi-saturation constant;
4. each site reads the normalised maps through a Gaussian receptive field (positions clustered
   per array, sizes varied) with orientation/scale tuning, a second preference (conjunctions,
   curvature-like), and a suppressive component; a threshold-power nonlinearity follows;
5. rates: baseline 5-20 spikes/s per site; the drive is measured in units of its 95th
   percentile over seeded 1/f noise images and mapped through tanh(drive / saturation_drive) to
   an evoked rate of at most ``1 + gain`` times baseline (gain 2.5-5.5). The best natural
   photographs reach roughly 40 % of saturation (2-3x baseline), so images built for a site can
   drive it further, as in V4 (Bashivan et al. 2019 report synthetic images driving most sites
   well past their best natural image): at saturation a site's spike count in the response
   window is a median 1.7x its best natural count (bench/control.py); latency 60-90 ms per site.

Slow drift across days rotates each site's tuning towards a second random tuning and lets
baselines and gains wander (a seeded random walk); with ``site_loss_per_day`` sites can stop
responding for good. Trial-to-trial variability: a gain shared by all sites of a presentation and
a private gain per site (log-normal), then Poisson spiking.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PopulationConfig:
    n_sites: int = 288
    n_arrays: int = 3
    seed: int = 0
    image_px: int = 64  # images are resampled to this before filtering
    rf_grid: int = 16  # receptive fields live on this grid over the image
    n_orientations: int = 8
    n_scales: int = 3
    baseline_hz: tuple[float, float] = (5.0, 20.0)
    gain: tuple[float, float] = (2.5, 5.5)  # evoked at saturation = (1 + gain) x baseline
    # Drive (in units of the calibration images' 95th percentile) at which the response reaches
    # tanh(1) = 76 % of saturation. Natural photographs reach about 40 % of saturation at their
    # best, as V4 sites are not saturated by natural images: optimised images have headroom.
    saturation_drive: float = 12.0
    latency_ms: tuple[float, float] = (60.0, 90.0)
    response_ms: float = 110.0  # how long the evoked rate lasts after the latency
    shared_gain_sd: float = 0.15  # log-normal trial gain shared by all sites
    private_gain_sd: float = 0.35  # log-normal trial gain per site
    drift_rad_per_day: float = 0.12  # tuning rotation per day
    baseline_walk_sd: float = 0.05  # per day, log scale
    site_loss_per_day: float = 0.0
    weak_site_fraction: float = (
        0.25  # sites with little tuning (low reliability, as in real arrays)
    )

    def __post_init__(self) -> None:
        assert self.n_sites >= 1 and self.n_arrays >= 1, "need at least one site and one array"
        assert self.baseline_hz[0] > 0 and self.baseline_hz[1] >= self.baseline_hz[0], (
            "baseline_hz: (low, high) > 0"
        )
        assert self.latency_ms[1] >= self.latency_ms[0] >= 0, "latency_ms: (low, high)"


def _resample(image: np.ndarray, px: int) -> np.ndarray:
    """(H, W) float in [0, 1] -> (px, px) float32."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=-1)
    assert img.ndim == 2, f"images must be (H, W) grayscale, got shape {img.shape}"
    if img.shape != (px, px):
        img = ndimage.zoom(img, (px / img.shape[0], px / img.shape[1]), order=1, prefilter=False)
        img = img[:px, :px]
        if img.shape != (px, px):
            img = np.pad(img, ((0, px - img.shape[0]), (0, px - img.shape[1])), mode="edge")
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def noise_images(n: int, px: int, seed: int) -> np.ndarray:
    """(n, px, px) seeded 1/f images in [0, 1] (the calibration set)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(px)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(n, px, px)) + 1j * rng.normal(size=(n, px, px))) / radius
    img = np.fft.ifft2(spectrum).real
    img -= img.min(axis=(1, 2), keepdims=True)
    img /= img.max(axis=(1, 2), keepdims=True) + 1e-9
    return img.astype(np.float32)


class V4Population:
    """Images -> expected firing rates of every site on a given day; see the module docstring."""

    def __init__(self, config: PopulationConfig | None = None) -> None:
        self.config = config or PopulationConfig()
        c = self.config
        rng = np.random.default_rng([c.seed, 4242])
        n, n_ch = c.n_sites, c.n_orientations * c.n_scales
        self.n_channels = n_ch
        self._filters = self._filter_bank()  # (channels, px, px) complex frequency responses
        # Receptive fields: array clusters, scatter, varied sizes (in rf_grid units).
        array_of = np.repeat(np.arange(c.n_arrays), int(np.ceil(n / c.n_arrays)))[:n]
        centers = rng.uniform(0.3, 0.7, size=(c.n_arrays, 2)) * c.rf_grid
        self.rf_xy = centers[array_of] + rng.normal(0, 0.12 * c.rf_grid, size=(n, 2))
        self.rf_xy = np.clip(self.rf_xy, 0.5, c.rf_grid - 1.5)
        self.rf_sigma = rng.uniform(0.06, 0.2, size=n) * c.rf_grid
        # Tuning: two preferences per site (a conjunction), a suppressive orthogonal component.
        self.tuning_day0 = self._random_tuning(rng)  # (sites, channels)
        self.tuning_alt = self._random_tuning(rng)  # the direction drift rotates towards
        weak = rng.random(n) < c.weak_site_fraction
        self.baseline_hz = rng.uniform(*c.baseline_hz, size=n)
        self.gain = rng.uniform(*c.gain, size=n) * np.where(weak, 0.25, 1.0)
        self.latency_ms = rng.uniform(*c.latency_ms, size=n)
        self.threshold = rng.uniform(0.0, 0.3, size=n)
        self.exponent = rng.uniform(1.0, 2.0, size=n)
        self._calibration = noise_images(48, c.image_px, c.seed + 7)

    # ------------------------------------------------------------------ image features

    def _filter_bank(self) -> np.ndarray:
        c = self.config
        f = np.fft.fftfreq(c.image_px)
        fy, fx = np.meshgrid(f, f, indexing="ij")
        bank = []
        for k in range(c.n_scales):
            f0 = 0.25 / (2**k)  # cycles/pixel: 0.25, 0.125, 0.0625
            bw = 0.45 * f0
            for o in range(c.n_orientations):
                theta = np.pi * o / c.n_orientations
                u = fx * np.cos(theta) + fy * np.sin(theta)
                v = -fx * np.sin(theta) + fy * np.cos(theta)
                bank.append(np.exp(-((u - f0) ** 2 + v**2) / (2 * bw**2)))  # one-sided: analytic
        return np.stack(bank).astype(np.complex64)

    def features(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(n, H, W) images -> (n, channels, rf_grid, rf_grid) normalised energy."""
        c = self.config
        imgs = np.stack([_resample(im, c.image_px) for im in images])  # (n, px, px)
        imgs = imgs - imgs.mean(axis=(1, 2), keepdims=True)
        out = []
        pool = c.image_px // c.rf_grid
        for i in range(0, len(imgs), 32):
            spec = np.fft.fft2(imgs[i : i + 32])[:, None]  # (b, 1, px, px)
            energy = np.abs(np.fft.ifft2(spec * self._filters[None])) ** 2  # (b, ch, px, px)
            e = energy.reshape(-1, c.n_scales, c.n_orientations, c.image_px, c.image_px)
            norm_pool = ndimage.gaussian_filter(
                e.mean(axis=2, keepdims=True), sigma=(0, 0, 0, 3, 3)
            )
            normed = e / (norm_pool + 0.1 * float(np.median(norm_pool)) + 1e-6)
            normed = normed.reshape(-1, self.n_channels, c.rf_grid, pool, c.rf_grid, pool).mean(
                axis=(3, 5)
            )
            out.append(normed.astype(np.float32))
        return np.concatenate(out)

    def _random_tuning(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        n = c.n_sites
        ori = np.arange(c.n_orientations) * np.pi / c.n_orientations
        scale = np.arange(c.n_scales)

        def bump(pref_o: np.ndarray, pref_s: np.ndarray, kappa: np.ndarray) -> np.ndarray:
            tun_o = np.exp(
                kappa[:, None] * (np.cos(2 * (ori[None, :] - pref_o[:, None])) - 1)
            )  # (n, ori)
            tun_s = np.exp(-((scale[None, :] - pref_s[:, None]) ** 2) / 0.8)  # (n, scales)
            w = tun_s[:, :, None] * tun_o[:, None, :]  # (n, scales, ori)
            return w.reshape(n, -1)

        kappa = rng.uniform(0.5, 3.0, n)
        p_o, p_s = rng.uniform(0, np.pi, n), rng.uniform(0, c.n_scales - 1, n)
        w = bump(p_o, p_s, kappa) + rng.uniform(0.2, 0.8, (n, 1)) * bump(
            rng.uniform(0, np.pi, n), rng.uniform(0, c.n_scales - 1, n), kappa
        )
        w -= rng.uniform(0.1, 0.5, (n, 1)) * bump(p_o + np.pi / 2, p_s, kappa)  # suppression
        w += 0.1 * rng.normal(size=w.shape)
        return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

    # ------------------------------------------------------------------ days

    def tuning(self, day: int) -> np.ndarray:
        """(sites, channels) tuning on ``day``: rotated towards the alternative tuning."""
        theta = self.config.drift_rad_per_day * day
        w = np.cos(theta) * self.tuning_day0 + np.sin(theta) * self.tuning_alt
        return w / np.linalg.norm(w, axis=1, keepdims=True)

    def day_state(self, day: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(baseline_hz, gain, alive) of every site on ``day`` (a seeded walk from day 0)."""
        c = self.config
        log_b = np.log(self.baseline_hz).copy()
        log_g = np.log(self.gain).copy()
        alive = np.ones(c.n_sites, bool)
        for d in range(1, day + 1):
            rng = np.random.default_rng([c.seed, 977, d])
            log_b += rng.normal(0, c.baseline_walk_sd, c.n_sites)
            log_g += rng.normal(0, c.baseline_walk_sd, c.n_sites)
            alive &= rng.random(c.n_sites) >= c.site_loss_per_day
        lo, hi = c.baseline_hz
        baseline = np.clip(np.exp(log_b), 0.8 * lo, 1.2 * hi)
        gain = np.where(alive, np.exp(log_g), 0.0)
        return baseline, gain, alive

    def _drive(self, feats: np.ndarray, day: int) -> np.ndarray:
        """(n, ch, g, g) features -> (n, sites) drive."""
        c = self.config
        g = np.arange(c.rf_grid) + 0.5
        dx = g[None, :] - self.rf_xy[:, 0:1]  # (sites, g)
        dy = g[None, :] - self.rf_xy[:, 1:2]
        wx = np.exp(-(dx**2) / (2 * self.rf_sigma[:, None] ** 2))
        wy = np.exp(-(dy**2) / (2 * self.rf_sigma[:, None] ** 2))
        rf = wy[:, :, None] * wx[:, None, :]  # (sites, gy, gx)
        rf /= rf.sum(axis=(1, 2), keepdims=True)
        pooled = np.einsum("nchw,shw->nsc", feats, rf, optimize=True)  # (n, sites, ch)
        lin = np.einsum("nsc,sc->ns", pooled, self.tuning(day), optimize=True)
        return lin

    @cached_property
    def _calibration_feats(self) -> np.ndarray:
        return self.features(list(self._calibration))

    def _scale(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-site (offset, 95th percentile span) of the drive on the calibration images."""
        d = self._drive(self._calibration_feats, day)
        lo = np.percentile(d, 20, axis=0)
        hi = np.percentile(d, 95, axis=0)
        return lo, np.maximum(hi - lo, 1e-6)

    def rates(self, images: np.ndarray | list[np.ndarray], day: int = 0) -> np.ndarray:
        """(n, H, W) images -> (n, sites) evoked firing rate in spikes/s (before trial noise)."""
        return self.rates_from_features(self.features(images), day)

    def rates_from_features(self, feats: np.ndarray, day: int = 0) -> np.ndarray:
        drive = self._drive(feats, day)
        lo, span = self._scale(day)
        x = np.maximum((drive - lo) / span - self.threshold, 0.0) / (1 - self.threshold)
        x = x**self.exponent
        response = np.tanh(x / self.config.saturation_drive)  # 0..1, saturating
        baseline, gain, _ = self.day_state(day)
        return baseline[None, :] * (1.0 + gain[None, :] * response)

    def expected_counts(
        self, rates_hz: np.ndarray, day: int, window_ms: tuple[float, float] = (70.0, 170.0)
    ) -> np.ndarray:
        """(n, sites) evoked rates -> expected spike counts in [onset + window) (latency-aware)."""
        baseline, _, _ = self.day_state(day)
        w0, w1 = window_ms
        on0 = self.latency_ms
        on1 = self.latency_ms + self.config.response_ms
        overlap_ms = np.clip(np.minimum(w1, on1) - np.maximum(w0, on0), 0, None)  # (sites,)
        base = baseline[None, :] * (w1 - w0) / 1000
        return base + (rates_hz - baseline[None, :]) * overlap_ms[None, :] / 1000

    def trial_gains(self, rng: np.random.Generator, n_trials: int) -> np.ndarray:
        """(n_trials, sites) multiplicative gains, mean 1: shared x private log-normal."""
        c = self.config
        shared = rng.normal(0, c.shared_gain_sd, (n_trials, 1))
        private = rng.normal(0, c.private_gain_sd, (n_trials, c.n_sites))
        return np.exp(shared + private - 0.5 * (c.shared_gain_sd**2 + c.private_gain_sd**2))


def simulate_responses(
    images: np.ndarray | list[np.ndarray],
    day: int = 0,
    seed: int = 0,
    n_sites: int = 288,
    window_ms: tuple[float, float] = (70.0, 170.0),
) -> np.ndarray:
    """(n_images, n_sites) expected spike counts in the response window (no trial noise)."""
    pop = V4Population(PopulationConfig(n_sites=n_sites, seed=seed))
    return pop.expected_counts(pop.rates(images, day), day, window_ms)
