"""Evaluation math on planted responses, against values computed by hand (in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.loop.evaluate import (
    onehot_results,
    onehot_scores,
    prediction_agreement,
    stimulus_means,
    stretch_ratios,
    zscore_by_natural,
)

# 3 sites; stimuli 0, 1 natural; 2, 3 stretch images of site 0; 4 a one-hot image of site 1.
# Two presentations each (rows), spike counts per site (columns).
COUNTS = np.array(
    [
        [4, 2, 1], [6, 2, 3],  # natural 0: mean [5, 2, 2]
        [8, 4, 2], [8, 6, 2],  # natural 1: mean [8, 5, 2]
        [10, 1, 1], [14, 1, 1],  # stretch 2: mean [12, 1, 1]
        [9, 0, 2], [11, 2, 2],  # stretch 3: mean [10, 1, 2]
        [2, 9, 0], [2, 7, 0],  # one-hot 4: mean [2, 8, 0]
    ],
    dtype=np.uint16,
)  # fmt: skip
STIM = np.repeat(np.arange(5), 2)


def test_stimulus_means_and_repetitions() -> None:
    means, reps = stimulus_means(COUNTS, STIM, 6)
    np.testing.assert_allclose(means[:5], [[5, 2, 2], [8, 5, 2], [12, 1, 1], [10, 1, 2], [2, 8, 0]])
    assert np.isnan(means[5]).all()  # stimulus 5 was never shown
    assert reps.tolist() == [2, 2, 2, 2, 2, 0]


def test_stretch_ratio_and_its_bootstrap_interval() -> None:
    summary = stretch_ratios(COUNTS, STIM, {0: [2, 3]}, [0, 1], n_boot=2000, seed=7)
    (result,) = summary.per_target
    # max synthetic mean 12 (stimulus 2) / max natural mean 8 (stimulus 1) = 1.5
    assert result.ratio == pytest.approx(1.5)
    assert (result.best_synthetic, result.best_natural) == (2, 1)
    assert (result.max_synthetic, result.max_natural) == (12.0, 8.0)
    # every replicate: synthetic max in [10, 14] (resampled means of {10, 14} and {9, 11}),
    # natural max exactly 8 (stimulus 1 always gives 8; stimulus 0 at most 6) -> ratio in [1.25, 1.75]
    assert 1.25 <= result.ci_low <= 1.5 <= result.ci_high <= 1.75
    assert result.ci_low < result.ci_high
    # every replicate stretches -> success 1 with a degenerate interval
    assert summary.success_fraction == 1.0 and summary.success_ci == (1.0, 1.0)
    assert summary.median_ratio == pytest.approx(1.5)
    again = stretch_ratios(COUNTS, STIM, {0: [2, 3]}, [0, 1], n_boot=2000, seed=7)
    assert again == summary  # seeded


def test_stretch_failure_and_median_over_targets() -> None:
    # site 1 "stretched" with stimulus 4 (mean 8) over natural max 5 -> 1.6;
    # site 2 with stimulus 3 (mean 2) over natural max 2 -> 1.0 (not a success: ratio must exceed 1)
    summary = stretch_ratios(COUNTS, STIM, {1: [4], 2: [3]}, [0, 1], n_boot=500, seed=0)
    ratios = {r.target_column: r.ratio for r in summary.per_target}
    assert ratios == pytest.approx({1: 1.6, 2: 1.0})
    assert summary.success_fraction == 0.5
    assert summary.median_ratio == pytest.approx(1.3)


def test_zero_natural_maximum_gives_no_ratio() -> None:
    counts = np.array([[0], [0], [3], [5]], dtype=np.uint16)
    summary = stretch_ratios(counts, np.array([0, 0, 1, 1]), {0: [1]}, [0], n_boot=100)
    assert math.isnan(summary.per_target[0].ratio)
    assert summary.success_fraction is None and summary.median_ratio is None


def test_onehot_scores_by_hand() -> None:
    means, _ = stimulus_means(COUNTS, STIM, 5)
    z = zscore_by_natural(means, [0, 1])
    # natural per-site mean [6.5, 3.5, 2], std (ddof 0) [1.5, 1.5, 0 -> 1]
    np.testing.assert_allclose(z[4], [-3.0, 3.0, -2.0])
    np.testing.assert_allclose(z[1], [1.0, 1.0, 0.0])
    scores = onehot_scores(z, 1, [0, 1, 2])
    e = math.e
    assert scores[4] == pytest.approx(e**3 / (e**-3 + e**3 + e**-2))  # 20.0855 / 20.2707 = 0.99087
    assert scores[1] == pytest.approx(e / (2 * e + 1))  # 0.42232
    assert scores[0] == pytest.approx(e**-1 / (2 * e**-1 + 1))  # 0.21194
    (result,) = onehot_results(means, {1: [4]}, [0, 1], [0, 1, 2])
    assert result.best_synthetic == 4 and result.best_natural == 1
    assert result.best_synthetic_score == pytest.approx(0.990867, abs=1e-6)
    assert result.best_natural_score == pytest.approx(0.422319, abs=1e-6)
    assert result.improved
    # temperature 2 halves the logits
    hot = onehot_scores(z, 1, [0, 1, 2], temperature=2.0)
    assert hot[4] == pytest.approx(e**1.5 / (e**-1.5 + e**1.5 + e**-1))
    with pytest.raises(ValueError, match="not in the population"):
        onehot_scores(z, 1, [0, 2])


def test_onehot_not_improved_when_a_natural_image_wins() -> None:
    means, _ = stimulus_means(COUNTS, STIM, 5)
    # stimulus 3 (mean [10, 1, 2]) as a one-hot image of site 2: z [7/3, -5/3, 0]
    # -> 1 / (e^(7/3) + e^(-5/3) + 1) = 1 / 11.5012 = 0.08695
    (result,) = onehot_results(means, {2: [3]}, [0, 1], [0, 1, 2])
    assert result.best_synthetic_score == pytest.approx(0.086948, abs=1e-6)
    # natural 0: z [-1, -1, 0] -> 1 / (2/e + 1) = 0.57612 beats it
    assert result.best_natural == 0
    assert result.best_natural_score == pytest.approx(1 / (2 / math.e + 1))
    assert not result.improved


def test_prediction_agreement_by_hand() -> None:
    perfect = prediction_agreement(np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 8]))
    assert perfect.r == pytest.approx(1.0) and perfect.overprediction == pytest.approx(0.5)
    # deviations p [1, -1, 0], m [-1, 0, 1]: cov -1, var 2 and 2 -> r = -0.5; sums 6 / 6
    mixed = prediction_agreement(np.array([3.0, 1, 2]), np.array([1.0, 2, 3]))
    assert mixed.r == pytest.approx(-0.5) and mixed.overprediction == pytest.approx(1.0)
    over = prediction_agreement(np.array([10.0, 20.0]), np.array([4.0, 1.0]))
    assert over.r is None and over.overprediction == pytest.approx(6.0)  # too few for r
    assert prediction_agreement(np.array([]), np.array([])).n_images == 0
