"""Fit neuron models end to end: the entry point the worker calls.

    result = fit_model(
        images,            # Tensor (n_images, 1|3, H, W) in [0, 1], or an ImageLoader
        responses,         # Tensor (n_presentations, sites): spike counts per presentation
        stimulus_index,    # Tensor (n_presentations,): row of ``images`` shown at each one
        config=FitConfig(weights="/data/alexnet.pth"),
        site_ids=[...],    # stable ids, one per response column (default 0..sites-1)
        stimulus_ids=[...],  # sha256 per image: keys the feature cache (default: content hash)
        device="cuda", seed=0,
        progress=lambda done, total: ...,
    )
    result.encoder       # Encoder (frozen backbone + readout), natural stats set
    result.metrics       # SiteMetrics: cv_r, ceiling, ncev, reliable per site
    result.save(path)    # one safetensors artifact with JSON metadata

Steps: validate inputs (ValueError naming the problem); average repetitions per image (the fit
targets); split-half reliability on the per-presentation data (the ceiling); backbone features
(cached on disk when ``config.cache_dir`` is set); ``cv_folds``-fold cross-validated predictions
(pooled out-of-fold, Pearson r per site against the image means); a final fit on all images;
natural statistics from the final model's predictions on the fitted images. Images that no
presentation refers to are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.artifact import save_encoder
from models.backbones import Backbone, load_backbone
from models.encoder import Encoder
from models.features import FeatureCache, FeatureExtractor, ImageLoader, Progress, Trunk
from models.metrics import SiteMetrics, kfold_indices, pearson_r, split_half_reliability
from models.readouts import ReadoutConfig, fit_readout, predict_features


@dataclass(frozen=True)
class FitConfig:
    """Everything that defines a fit. ``weights``: local backbone weights file (None = random
    init from ``backbone_seed``, with a warning). ``reliability_threshold`` applies to the
    Spearman–Brown corrected split-half reliability."""

    backbone: str = "alexnet"
    weights: str | None = None
    backbone_seed: int = 0
    layer: str = "conv3"
    input_size: int = 224
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    cv_folds: int = 5
    reliability_threshold: float = 0.5
    reliability_splits: int = 10
    feature_batch_size: int = 64
    cache_dir: str | None = None


@dataclass(frozen=True)
class FitResult:
    encoder: Encoder
    metrics: SiteMetrics
    config: FitConfig
    image_rows: Tensor  # (n_used,) rows of the input images that had presentations
    mean_responses: Tensor  # (n_used, sites) the fit targets
    cv_predictions: Tensor  # (n_used, sites) out-of-fold predictions
    seconds: dict[str, float]

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        info = {
            "cv_folds": self.config.cv_folds,
            "n_images": len(self.image_rows),
            "seconds": self.seconds,
            **(extra or {}),
        }
        return save_encoder(self.encoder, path, metrics=self.metrics.to_dict(), extra=info)


def validate_responses(
    n_images: int,
    responses: Tensor,
    stimulus_index: Tensor,
    site_ids: Sequence[int],
) -> None:
    """Raise ValueError for shape mismatches, bad indices, NaN/inf or duplicate site ids."""
    if responses.ndim != 2:
        raise ValueError(
            f"responses must be (presentations, sites); got shape {tuple(responses.shape)}"
        )
    if stimulus_index.ndim != 1 or len(stimulus_index) != responses.shape[0]:
        raise ValueError(
            f"stimulus_index must have one entry per presentation: {responses.shape[0]} "
            f"presentations but stimulus_index has shape {tuple(stimulus_index.shape)}"
        )
    if stimulus_index.is_floating_point():
        raise ValueError("stimulus_index must be integer image rows")
    if len(stimulus_index) and (
        int(stimulus_index.min()) < 0 or int(stimulus_index.max()) >= n_images
    ):
        raise ValueError(
            f"stimulus_index values must be image rows in [0, {n_images}); got range "
            f"[{int(stimulus_index.min())}, {int(stimulus_index.max())}]"
        )
    if len(site_ids) != responses.shape[1]:
        raise ValueError(f"{len(site_ids)} site ids for {responses.shape[1]} response columns")
    if len(set(site_ids)) != len(site_ids):
        raise ValueError("site ids must be unique")
    finite = torch.isfinite(responses.double())
    if not bool(finite.all()):
        bad_rows = torch.nonzero(~finite.all(1)).flatten()[:10].tolist()
        bad_sites = [site_ids[i] for i in torch.nonzero(~finite.all(0)).flatten()[:10].tolist()]
        raise ValueError(
            f"responses contain NaN or inf (presentations {bad_rows}, sites {bad_sites}); "
            f"drop or mark those presentations invalid before fitting"
        )


def mean_responses(
    responses: Tensor, stimulus_index: Tensor, n_images: int
) -> tuple[Tensor, Tensor]:
    """Average repetitions: -> (rows (n_used,), means (n_used, sites)) for images shown >= once."""
    counts = torch.bincount(stimulus_index.long(), minlength=n_images)
    sums = torch.zeros(n_images, responses.shape[1], dtype=torch.float64).index_add_(
        0, stimulus_index.long(), responses.double()
    )
    rows = torch.nonzero(counts > 0).flatten()
    return rows, (sums[rows] / counts[rows, None]).float()


def fit_model(
    images: Tensor | ImageLoader,
    responses: Tensor,
    stimulus_index: Tensor,
    *,
    config: FitConfig = FitConfig(),
    site_ids: Sequence[int] | None = None,
    stimulus_ids: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    backbone: Backbone | None = None,
) -> FitResult:
    """Fit an encoder for every site; see the module docstring. ``backbone`` may be passed
    prebuilt (it must match ``config.backbone``); otherwise it is loaded from ``config``."""
    responses = torch.as_tensor(responses)
    stimulus_index = torch.as_tensor(stimulus_index)
    n_images = len(images) if isinstance(images, ImageLoader) else int(images.shape[0])
    if not isinstance(images, ImageLoader) and images.ndim != 4:
        raise ValueError(f"images must be (n, 1|3, H, W); got shape {tuple(images.shape)}")
    if site_ids is None:
        site_ids = list(range(responses.shape[1] if responses.ndim == 2 else 0))
    site_ids = list(site_ids)
    validate_responses(n_images, responses, stimulus_index, site_ids)
    rows, targets = mean_responses(responses, stimulus_index, n_images)
    if len(rows) < max(config.cv_folds, 2):
        raise ValueError(
            f"{len(rows)} distinct images were shown, fewer than the {config.cv_folds} "
            f"cross-validation folds; record more images or lower cv_folds"
        )
    flat = targets.std(0, unbiased=False) <= 1e-12 * targets.abs().amax(0).clamp_min(1.0)
    if bool(flat.any()):
        bad = [site_ids[i] for i in torch.nonzero(flat).flatten().tolist()]
        raise ValueError(
            f"sites {bad[:20]}{' ...' if len(bad) > 20 else ''} have zero variance across "
            f"images (constant responses); exclude them before fitting"
        )

    total_steps = 1 + config.cv_folds + 1
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_steps)

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    ceiling = split_half_reliability(
        responses, stimulus_index, n_splits=config.reliability_splits, seed=seed
    )
    seconds["reliability"] = time.perf_counter() - start

    if backbone is None:
        backbone = load_backbone(config.backbone, config.weights, seed=config.backbone_seed)
    elif backbone.backbone_id != config.backbone:
        raise ValueError(
            f"backbone {backbone.backbone_id!r} does not match config.backbone {config.backbone!r}"
        )
    trunk = Trunk(backbone, config.layer, config.input_size)
    cache = FeatureCache(config.cache_dir) if config.cache_dir is not None else None
    extractor = FeatureExtractor(
        trunk, device=device, batch_size=config.feature_batch_size, cache=cache
    )
    start = time.perf_counter()
    if isinstance(images, ImageLoader):
        used: Tensor | ImageLoader = ImageLoader(
            tuple(images.stimulus_ids[i] for i in rows.tolist()), images.load
        )
        ids = None
    else:
        if stimulus_ids is not None and len(stimulus_ids) != n_images:
            raise ValueError(f"{len(stimulus_ids)} stimulus ids for {n_images} images")
        used = images[rows]
        ids = [stimulus_ids[i] for i in rows.tolist()] if stimulus_ids is not None else None
    features = extractor.extract(used, ids)  # (n_used, C, h, w)
    seconds["features"] = time.perf_counter() - start
    step()

    start = time.perf_counter()
    cv_pred = torch.zeros_like(targets)
    for fold, test in enumerate(kfold_indices(len(rows), config.cv_folds, seed=seed)):
        train = torch.ones(len(rows), dtype=torch.bool)
        train[test] = False
        train_rows = torch.nonzero(train).flatten()
        readout = fit_readout(
            features,
            targets[train_rows],
            config.readout,
            rows=train_rows,
            seed=seed + 1000 * (fold + 1),
            device=device,
        )
        cv_pred[test] = predict_features(readout, features, test, device=device)
        step()
    cv_r = pearson_r(cv_pred, targets)
    seconds["cross_validation"] = time.perf_counter() - start

    start = time.perf_counter()
    readout = fit_readout(features, targets, config.readout, seed=seed, device=device)
    encoder = Encoder(trunk, readout, site_ids).to(device)
    encoder.set_natural_stats_from_predictions(predict_features(readout, features, device=device))
    seconds["final_fit"] = time.perf_counter() - start
    step()
    metrics = SiteMetrics.compute(site_ids, cv_r, ceiling, config.reliability_threshold)
    return FitResult(
        encoder=encoder,
        metrics=metrics,
        config=config,
        image_rows=rows,
        mean_responses=targets,
        cv_predictions=cv_pred,
        seconds=seconds,
    )


def summarize(metrics: SiteMetrics) -> dict[str, float]:
    """Medians over all sites and over reliable sites (NaN-safe), for logs and reports."""
    reliable = metrics.reliable
    return {
        "median_cv_r": float(np.nanmedian(metrics.cv_r)),
        "median_ceiling": float(np.nanmedian(metrics.ceiling)),
        "median_ncev": float(np.nanmedian(metrics.ncev)),
        "median_ncev_reliable": (
            float(np.nanmedian(metrics.ncev[reliable])) if reliable.any() else float("nan")
        ),
        "n_reliable": float(reliable.sum()),
    }
