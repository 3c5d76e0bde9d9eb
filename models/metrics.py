"""Per-site model metrics (Brain-Score conventions).

* ``pearson_r``: correlation per site between predictions and mean responses.
* ``split_half_reliability``: each stimulus's repetitions are split in two halves, the two half
  means are correlated across stimuli (averaged over random splits), and Spearman–Brown
  corrected to the full number of repetitions: the ceiling, i.e. the r^2 a perfect model
  would reach against the noisy mean responses.
* ``noise_corrected_ev`` = r^2 / ceiling (0 where r <= 0: an anti-correlated prediction explains
  no variance; NaN where the ceiling is not positive).
* ``SiteMetrics``: everything per site plus a ``reliable`` flag (ceiling >= threshold). Sites
  below the threshold are flagged, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def pearson_r(predictions: Tensor, targets: Tensor) -> Tensor:
    """(n, sites), (n, sites) -> (sites,) float64; NaN for a constant column."""
    if predictions.shape != targets.shape or predictions.ndim != 2:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must both "
            f"be (n, sites)"
        )
    x = predictions.double() - predictions.double().mean(0)
    y = targets.double() - targets.double().mean(0)
    denom = torch.sqrt((x * x).sum(0) * (y * y).sum(0))
    r = (x * y).sum(0) / denom
    return torch.where(denom > 0, r, torch.full_like(r, float("nan")))


def spearman_brown(r: Tensor, factor: float = 2.0) -> Tensor:
    """Reliability of a measure ``factor`` times longer: factor r / (1 + (factor - 1) r)."""
    return factor * r / (1.0 + (factor - 1.0) * r)


def split_half_reliability(
    responses: Tensor,  # (presentations, sites)
    stimulus_index: Tensor,  # (presentations,) int
    *,
    n_splits: int = 10,
    seed: int = 0,
    randomize: bool = True,
) -> Tensor:
    """Spearman–Brown corrected split-half reliability per site, (sites,) float64.

    Only stimuli with at least 2 presentations count; with fewer than 3 such stimuli the result
    is NaN. ``randomize=False`` splits each stimulus's presentations by order (first half vs
    second half, one split) instead of ``n_splits`` random splits.
    """
    if responses.ndim != 2 or stimulus_index.ndim != 1 or len(stimulus_index) != len(responses):
        raise ValueError(
            f"responses {tuple(responses.shape)} must be (presentations, sites) with one "
            f"stimulus index per presentation; got {tuple(stimulus_index.shape)} indices"
        )
    resp = responses.double()
    _, stim, counts = torch.unique(stimulus_index.long(), return_inverse=True, return_counts=True)
    used = counts[stim] >= 2
    n_sites = resp.shape[1]
    if int((counts >= 2).sum()) < 3:
        return torch.full((n_sites,), float("nan"), dtype=torch.float64)
    resp, stim = resp[used], stim[used]
    _, stim, counts = torch.unique(stim, return_inverse=True, return_counts=True)
    n_stim = len(counts)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each stimulus
    generator = torch.Generator().manual_seed(seed)
    position = torch.arange(len(stim), dtype=torch.float64) / max(len(stim), 1)
    r_sum = torch.zeros(n_sites, dtype=torch.float64)
    splits = n_splits if randomize else 1
    for _ in range(splits):
        key = (
            torch.rand(len(stim), generator=generator, dtype=torch.float64)
            if randomize
            else position
        )
        order = torch.argsort(stim.double() + key * 0.5)  # grouped by stimulus, shuffled inside
        rank = torch.empty_like(stim)
        rank[order] = torch.arange(len(stim)) - starts[stim[order]]
        first = rank < (counts[stim] // 2)
        means = []
        for half in (first, ~first):
            total = torch.zeros(n_stim, n_sites, dtype=torch.float64).index_add_(
                0, stim[half], resp[half]
            )
            n_half = torch.bincount(stim[half], minlength=n_stim).double()
            means.append(total / n_half[:, None])
        r_sum += torch.nan_to_num(pearson_r(means[0], means[1]), nan=0.0)
    return spearman_brown(r_sum / splits)


def noise_corrected_ev(r: Tensor, ceiling: Tensor) -> Tensor:
    """r^2 / ceiling per site; 0 where r <= 0, NaN where the ceiling is not positive."""
    r = r.double()
    ceiling = ceiling.double()
    ev = torch.where(r > 0, r * r, torch.zeros_like(r)) / ceiling
    return torch.where(ceiling > 0, ev, torch.full_like(ev, float("nan")))


def kfold_indices(n: int, folds: int, seed: int = 0) -> list[Tensor]:
    """Random disjoint test-index sets covering range(n), sizes differing by at most one."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds; got {folds}")
    if n < folds:
        raise ValueError(f"{n} images are fewer than the {folds} cross-validation folds")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [chunk.sort().values for chunk in torch.tensor_split(perm, folds)]


@dataclass(frozen=True)
class SiteMetrics:
    """Per-site metrics, arrays in ``site_ids`` order."""

    site_ids: tuple[int, ...]
    cv_r: np.ndarray  # (sites,) cross-validated Pearson r against mean responses
    ceiling: np.ndarray  # (sites,) Spearman–Brown corrected split-half reliability
    ncev: np.ndarray  # (sites,) noise-corrected explained variance r^2 / ceiling
    reliable: np.ndarray  # (sites,) bool: ceiling >= reliability_threshold
    reliability_threshold: float

    @classmethod
    def compute(
        cls,
        site_ids: Sequence[int],
        cv_r: Tensor,
        ceiling: Tensor,
        reliability_threshold: float,
    ) -> SiteMetrics:
        ceiling_np = ceiling.double().numpy()
        return cls(
            site_ids=tuple(int(s) for s in site_ids),
            cv_r=cv_r.double().numpy(),
            ceiling=ceiling_np,
            ncev=noise_corrected_ev(cv_r, ceiling).numpy(),
            reliable=np.nan_to_num(ceiling_np, nan=-np.inf) >= reliability_threshold,
            reliability_threshold=float(reliability_threshold),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""

        def clean(values: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in values]

        return {
            "site_ids": list(self.site_ids),
            "cv_r": clean(self.cv_r),
            "ceiling": clean(self.ceiling),
            "ncev": clean(self.ncev),
            "reliable": [bool(v) for v in self.reliable],
            "reliability_threshold": self.reliability_threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteMetrics:
        def arr(values: list[float | None]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        return cls(
            site_ids=tuple(int(s) for s in data["site_ids"]),
            cv_r=arr(data["cv_r"]),
            ceiling=arr(data["ceiling"]),
            ncev=arr(data["ncev"]),
            reliable=np.array(data["reliable"], dtype=bool),
            reliability_threshold=float(data["reliability_threshold"]),
        )
