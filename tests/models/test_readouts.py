from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.metrics import pearson_r
from models.readouts import (
    FactorizedConfig,
    FactorizedReadout,
    ReadoutConfig,
    RidgeReadout,
    fit_factorized,
    fit_readout,
    fit_ridge,
    laplacian_matrix,
    predict_features,
)

from .conftest import gaussian_masks


def planted_data(
    n: int = 500, channels: int = 32, size: int = 9, seed: int = 0, noise: float = 0.3
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Features, targets, true masks, true channel weights, noiseless responses."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(n, channels, size, size, generator=gen))
    masks = gaussian_masks([(2.0, 2.0), (6.0, 3.0), (4.0, 6.5), (3.0, 5.0)], size, 1.2)
    weights = torch.randn(4, channels, generator=gen) * (
        torch.rand(4, channels, generator=gen) < 0.4
    )
    clean = torch.einsum("nchw,shw,sc->ns", features, masks, weights) + 5.0
    targets = clean + noise * clean.std(0) * torch.randn(n, 4, generator=gen)
    return features, targets, masks, weights, clean


def test_factorized_recovers_planted_mask_and_channels() -> None:
    features, targets, masks, weights, clean = planted_data()
    fit = fit_factorized(features[:400], targets[:400], FactorizedConfig(max_epochs=30), seed=0)
    readout = fit.readout
    assert isinstance(readout, FactorizedReadout)
    got_masks = readout.spatial_masks().reshape(4, -1)
    mask_r = pearson_r(got_masks.T, masks.reshape(4, -1).T)
    channel_r = pearson_r(readout.channel_weights[0].T, weights.T)
    assert bool((mask_r > 0.9).all()), mask_r
    assert bool((channel_r > 0.9).all()), channel_r
    # predictions come back in response units (not z-scores) and generalise
    pred = predict_features(readout, features[400:])
    assert bool((pearson_r(pred, clean[400:]) > 0.9).all())
    assert (pred.mean(0) - clean[400:].mean(0)).abs().max() < 0.5 * clean.std(0).min()
    assert fit.lambda_s.tolist() == pytest.approx([0.05] * 4)
    assert fit.lambda_d.tolist() == pytest.approx([0.1] * 4)


def test_lambda_grid_is_chosen_per_site_in_one_fit() -> None:
    features, targets, *_ = planted_data(n=300)
    grid = ((0.05, 0.1), (0.0, 100.0))  # the second point shrinks everything to zero
    fit = fit_factorized(
        features, targets, FactorizedConfig(max_epochs=15, lambda_grid=grid), seed=1
    )
    assert fit.lambda_d.tolist() == pytest.approx([0.1] * 4)
    assert fit.readout.lambda_s.shape == (4,)


def test_poisson_readout_predicts_non_negative_rates() -> None:
    features, _, _, _, clean = planted_data(n=500)
    gen = torch.Generator().manual_seed(3)
    rates = (clean - clean.min(0).values) / clean.std(0) * 4.0 + 1.0
    counts = torch.poisson(rates, generator=gen)
    fit = fit_factorized(
        features[:400], counts[:400], FactorizedConfig(loss="poisson", max_epochs=30), seed=0
    )
    assert fit.readout.output == "softplus"
    pred = predict_features(fit.readout, features[400:])
    assert bool((pred >= 0).all())
    assert bool((pearson_r(pred, rates[400:]) > 0.7).all())


def test_ridge_recovers_linear_responses() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(300, 8, 4, 4, generator=gen)
    true_w = torch.randn(128, 3, generator=gen)
    clean = features.reshape(300, -1) @ true_w + 10.0
    targets = clean + 0.2 * clean.std(0) * torch.randn(300, 3, generator=gen)
    readout = fit_ridge(features[:250], targets[:250])
    assert isinstance(readout, RidgeReadout) and readout.spatial_masks() is None
    pred = predict_features(readout, features[250:])
    assert bool((pearson_r(pred, clean[250:]) > 0.95).all())
    assert (pred.mean(0) - clean[250:].mean(0)).abs().max() < 0.3 * clean.std(0).min()


def test_fitting_on_rows_equals_fitting_on_a_copy() -> None:
    features, targets, *_ = planted_data(n=120)
    rows = torch.arange(0, 120, 2)
    on_rows = fit_ridge(features, targets[rows], rows=rows)
    on_copy = fit_ridge(features[rows].clone(), targets[rows])
    torch.testing.assert_close(on_rows.weight, on_copy.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["factorized", "ridge"])
def test_ensemble_members_mean_and_spread(kind: str) -> None:
    features, targets, *_ = planted_data(n=200)
    config = ReadoutConfig(
        kind=kind,  # type: ignore[arg-type]
        n_members=3,
        factorized=FactorizedConfig(max_epochs=20),
    )
    readout = fit_readout(features, targets, config, seed=0)
    assert readout.n_members == 3
    members = readout.forward_members(features)
    assert members.shape == (3, 200, 4)
    torch.testing.assert_close(readout(features), members.mean(0))
    assert float(members.std(0).mean()) > 0  # different seeds/splits differ
    # members agree far more than they differ
    assert bool((pearson_r(members[0], members[1]) > 0.7).all())


def test_laplacian_matrix_matches_stencil() -> None:
    lap = laplacian_matrix(3, 3)
    flat = torch.zeros(9)
    flat[4] = 1.0  # centre pixel
    assert (flat @ lap.T).reshape(3, 3).tolist() == [[0, 1, 0], [1, -4, 1], [0, 1, 0]]


def test_zero_variance_targets_are_refused() -> None:
    features, targets, *_ = planted_data(n=50)
    targets[:, 2] = 4.0
    with pytest.raises(ValueError, match=r"target columns \[2\] have zero variance"):
        fit_factorized(features, targets, FactorizedConfig(max_epochs=1))
