from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    SiteMetrics,
    kfold_indices,
    noise_corrected_ev,
    pearson_r,
    spearman_brown,
    split_half_reliability,
)


def test_pearson_by_hand() -> None:
    pred = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    target = torch.tensor([[1.0, 4.0], [3.0, 3.0], [2.0, 2.0], [4.0, 1.0]])
    r = pearson_r(pred, target)
    # column 0: deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): 4 / 5
    assert r[0].item() == pytest.approx(0.8)
    assert r[1].item() == pytest.approx(-1.0)
    assert math.isnan(pearson_r(pred, torch.ones(4, 2))[0].item())


def test_spearman_brown_by_hand() -> None:
    assert spearman_brown(torch.tensor(0.8)).item() == pytest.approx(1.6 / 1.8)
    assert spearman_brown(torch.tensor(0.5), factor=3.0).item() == pytest.approx(1.5 / 2.0)


def test_split_half_reliability_by_hand() -> None:
    # 4 stimuli x 2 repetitions, presented in order: rep 1 of all, then rep 2 of all.
    first = [1.0, 2.0, 3.0, 4.0]
    second = [1.0, 3.0, 2.0, 4.0]
    responses = torch.tensor(first + second)[:, None]  # (8, 1)
    index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    rel = split_half_reliability(responses, index, randomize=False)
    # r(first, second) = 0.8; Spearman-Brown: 2 * 0.8 / 1.8
    assert rel[0].item() == pytest.approx(1.6 / 1.8)
    ev = noise_corrected_ev(torch.tensor([0.6]), rel)
    assert ev[0].item() == pytest.approx(0.36 / (1.6 / 1.8))


def test_noise_corrected_ev_edge_cases() -> None:
    ev = noise_corrected_ev(torch.tensor([0.5, -0.5, 0.5]), torch.tensor([0.25, 0.5, 0.0]))
    assert ev[0].item() == pytest.approx(1.0)
    assert ev[1].item() == 0.0  # anti-correlated prediction explains nothing
    assert math.isnan(ev[2].item())


def test_random_split_reliability_matches_theory() -> None:
    gen = torch.Generator().manual_seed(0)
    n_stim, reps = 400, 10
    signal = torch.randn(n_stim, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.0])
    noise_sd = torch.tensor([1.0, 3.0, 1.0])
    index = torch.arange(n_stim).repeat(reps)
    responses = signal[index] + noise_sd * torch.randn(n_stim * reps, 3, generator=gen)
    rel = split_half_reliability(responses, index, n_splits=10, seed=1)
    expected = 1.0 / (1.0 + noise_sd**2 / reps)  # var(signal) / var(mean of reps)
    assert rel[0].item() == pytest.approx(expected[0].item(), abs=0.03)
    assert rel[1].item() == pytest.approx(expected[1].item(), abs=0.06)
    assert abs(rel[2].item()) < 0.15  # pure noise


def test_reliability_needs_repetitions() -> None:
    responses = torch.randn(5, 2)
    assert torch.isnan(split_half_reliability(responses, torch.arange(5))).all()


def test_kfold_indices_partition() -> None:
    folds = kfold_indices(10, 3, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(10))
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    with pytest.raises(ValueError, match="fewer than the 5"):
        kfold_indices(4, 5)


def test_site_metrics_flags_not_drops() -> None:
    metrics = SiteMetrics.compute(
        [7, 8, 9],
        torch.tensor([0.5, 0.5, 0.5]),
        torch.tensor([0.9, 0.2, float("nan")]),
        reliability_threshold=0.5,
    )
    assert metrics.site_ids == (7, 8, 9)
    assert metrics.reliable.tolist() == [True, False, False]
    np.testing.assert_allclose(metrics.ncev[:2], [0.25 / 0.9, 0.25 / 0.2])
    again = SiteMetrics.from_dict(metrics.to_dict())
    np.testing.assert_allclose(again.ncev, metrics.ncev)
    assert again.reliable.tolist() == metrics.reliable.tolist()
