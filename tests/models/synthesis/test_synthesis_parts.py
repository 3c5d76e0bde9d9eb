"""Objectives, parameterisations, transforms, regularisers and selection on their own."""

from __future__ import annotations

import math

import pytest
import torch

from models.synthesis import objectives as obj
from models.synthesis import regularizers as reg
from models.synthesis.param import FourierParam, PixelParam, rf_masked_start
from models.synthesis.select import best_k
from models.synthesis.transforms import (
    JitterConfig,
    affine_matrices,
    apply_affine,
    apply_jitter,
    draw_jitter,
    shift_views,
)


def responses(mean: torch.Tensor, target_col: list[int], members: torch.Tensor | None = None):
    sites = mean.shape[1]
    return obj.Responses(
        mean=mean,
        members=members,
        target_col=torch.tensor(target_col),
        columns={10 + c: c for c in range(sites)},
        natural_mean=torch.full((sites,), 1.0),
        natural_std=torch.full((sites,), 2.0),
    )


def test_each_row_scores_its_own_target_and_objectives_compose() -> None:
    mean = torch.tensor([[1.0, 5.0, 3.0], [4.0, 0.0, 2.0]])  # (batch, sites)
    r = responses(mean, [1, 2])
    assert obj.stretch()(r).tolist() == [5.0, 2.0]
    assert obj.stretch(10)(r).tolist() == [1.0, 4.0]  # a fixed site for every row
    assert obj.suppress()(r).tolist() == [-5.0, -2.0]
    combined = 2 * obj.stretch() - obj.stretch(10) + obj.suppress(12) * 0.5
    assert combined(r).tolist() == [2 * 5 - 1 - 1.5, 2 * 2 - 4 - 1.0]
    assert (-obj.stretch())(r).tolist() == [-5.0, -2.0]
    assert combined.fixed_sites() == {10, 12}


def test_one_hot_is_the_softmax_of_zscores_at_the_target() -> None:
    mean = torch.tensor([[1.0, 5.0, 3.0]])
    r = responses(mean, [1])
    z = (mean - 1.0) / 2.0
    for temperature in (0.5, 1.0, 4.0):
        expected = torch.softmax(z / temperature, dim=1)[0, 1]
        assert float(obj.one_hot(temperature=temperature)(r)[0]) == pytest.approx(float(expected))


def test_pattern_and_ensemble_scores() -> None:
    mean = torch.tensor([[3.0, 1.0]])  # z = [1, 0]
    r = responses(mean, [0])
    assert float(obj.pattern(torch.tensor([1.0, 2.0]))(r)[0]) == pytest.approx(-2.0)
    members = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])  # (members=2, batch=1, sites=2)
    re = responses(members.mean(0), [0], members)
    score = obj.ensemble(obj.stretch(), spread_weight=0.5)(re)
    assert float(score[0]) == pytest.approx(3.0 - 0.5 * math.sqrt(2.0))
    described = obj.ensemble(obj.one_hot(temperature=2.0), 0.5).describe()
    assert described == {
        "kind": "ensemble",
        "spread_weight": 0.5,
        "inner": {"kind": "one_hot", "site": None, "temperature": 2.0},
    }


def test_fourier_param_reproduces_its_start_and_stays_in_range() -> None:
    start = torch.rand((2, 1, 24, 20), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    fourier = FourierParam(start)
    assert torch.allclose(fourier.images(), start, atol=1e-4)
    with torch.no_grad():
        fourier.tensor.mul_(50.0)
    img = fourier.images().detach()
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    pixels = PixelParam(start * 2)
    pixels.project()
    assert float(pixels.images().detach().max()) <= 1.0


def test_rf_masked_start_is_gray_outside_the_field() -> None:
    noise = torch.rand((1, 32, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((8, 8))
    mask[1:3, 1:3] = 1.0
    start = rf_masked_start(noise, mask)
    assert torch.allclose(start[:, 20:, 20:], torch.full((1, 12, 12), 0.5))
    assert float((start[:, 6:10, 6:10] - 0.5).abs().max()) > 0.2


def test_shift_moves_whole_pixels_within_the_configured_range() -> None:
    gens = [torch.Generator().manual_seed(s) for s in range(16)]
    draw = draw_jitter(gens, copies=2, size_px=40, config=JitterConfig(shift_frac=0.1))
    assert draw.shift_px.shape == (32, 2)
    assert torch.equal(draw.shift_px, draw.shift_px.round())
    assert float(draw.shift_px.abs().max()) == 4.0  # 10 % of 40 px, both signs drawn
    assert float(draw.shift_px.min()) == -4.0
    image = torch.zeros((1, 1, 40, 40))
    image[0, 0, 20, 20] = 1.0
    moved = shift_views(image, torch.tensor([[4.0, -2.0]]))
    assert torch.nonzero(moved[0, 0] > 0.99).tolist() == [[22, 16]]


def test_fast_shift_path_equals_the_affine_resampling() -> None:
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    images = torch.rand((3, 2, 24, 24), generator=torch.Generator().manual_seed(9))
    draw = draw_jitter(gens, copies=2, size_px=24, config=JitterConfig(shift_frac=0.2))
    fast = shift_views(images, draw.shift_px)  # (6, 2, 24, 24)
    resampled = apply_affine(images, affine_matrices(draw, 24))
    assert torch.allclose(fast, resampled, atol=1e-5)


def test_scale_and_rotation_resample() -> None:
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    cfg = JitterConfig(shift_frac=0.0, scale_frac=0.1, rotation_deg=10.0)
    draw = draw_jitter(gens, copies=1, size_px=32, config=cfg)
    assert float((draw.scale - 1).abs().max()) <= 0.1
    assert float(draw.angle_rad.abs().max()) <= math.radians(10.0)
    images = torch.rand((2, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    views = apply_jitter(images, draw, cfg)
    assert views.shape == images.shape
    assert not torch.allclose(views, images)


def test_regularisers() -> None:
    flat = torch.full((1, 1, 8, 8), 0.5)
    stripes = flat.clone()
    stripes[..., ::2] = 0.0
    assert float(reg.total_variation(flat)[0]) == 0.0
    assert float(reg.total_variation(stripes)[0]) > 0.4
    assert float(reg.contrast_energy(flat)[0]) == 0.0
    assert float(reg.response_variation(torch.tensor([[1.0], [3.0]]))[0]) == pytest.approx(1.0)
    blurred = reg.blur(stripes, 1.5)
    assert float(blurred.std()) < 0.1 * float(stripes.std())
    assert float(blurred.mean()) == pytest.approx(float(stripes.mean()), abs=1e-4)


def test_luminance_contrast_matching() -> None:
    images = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(2)) ** 3
    matched = reg.match_luminance_contrast(images, 0.5, 0.2)
    mean, rms = reg.image_stats(matched)
    assert torch.allclose(mean, torch.full((4,), 0.5), rtol=0.05)
    assert torch.allclose(rms, torch.full((4,), 0.2), rtol=0.05)
    assert float(matched.min()) >= 0.0 and float(matched.max()) <= 1.0


def test_best_k_prefers_higher_values_and_breaks_ties_by_index() -> None:
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 4.0]])
    assert best_k(values, 2).tolist() == [[1, 2], [2, 3]]
    with pytest.raises(ValueError, match=r"k must be in 1\.\.4"):
        best_k(values, 5)
