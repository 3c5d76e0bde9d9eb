"""Every misuse named in the synthesis issue raises a ValueError that says what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyEncoder, ToyWithoutMasks

from models.synthesis import SynthesisConfig, one_hot, pattern, stretch, synthesize

QUICK = SynthesisConfig(size_px=32, steps=2, match_luminance=False)


def test_unknown_target_site(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match=r"unknown target site id\(s\) \[999\]"):
        synthesize(toy, [100, 999], "stretch", QUICK)


def test_unknown_site_inside_objective(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match=r"site\(s\) \[7\]"):
        synthesize(toy, [100], stretch() - stretch(7), QUICK)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        one_hot(temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SynthesisConfig(temperature=temperature)


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(steps: int) -> None:
    with pytest.raises(ValueError, match="steps must be > 0"):
        SynthesisConfig(steps=steps)


def test_image_smaller_than_the_encoder_minimum(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match="smaller than the encoder's min_image_size=16"):
        synthesize(toy, [100], "stretch", SynthesisConfig(size_px=8, match_luminance=False))


@pytest.mark.parametrize(
    "objective", ["one_hot", pattern(torch.zeros(6)), stretch() + 0.1 * one_hot(101)]
)
def test_zscored_objective_needs_natural_stats(toy: ToyEncoder, objective: object) -> None:
    assert toy.natural_mean is None
    with pytest.raises(ValueError, match=r"set_natural_stats"):
        synthesize(toy, [100], objective, QUICK)  # type: ignore[arg-type]


def test_matching_needs_natural_stats(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match=r"natural_stats=\(mean_luminance, rms_contrast\)"):
        synthesize(toy, [100], "stretch", SynthesisConfig(size_px=32, steps=2))


def test_unknown_objective_kind(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match="unknown objective kind 'stretchy'"):
        synthesize(toy, [100], "stretchy", QUICK)


def test_rf_start_needs_masks() -> None:
    cfg = SynthesisConfig(size_px=32, steps=2, match_luminance=False, start="rf_noise")
    with pytest.raises(ValueError, match="start='noise'"):
        synthesize(ToyWithoutMasks(), [100], "stretch", cfg)


def test_pattern_shape_and_missing_states(toy_with_stats: ToyEncoder) -> None:
    with pytest.raises(ValueError, match=r"must be \(6,\)"):
        synthesize(toy_with_stats, [100], pattern(torch.zeros(5)), QUICK)
    with pytest.raises(ValueError, match=r"no requested state for target site\(s\) \[101\]"):
        synthesize(toy_with_stats, [100, 101], pattern({100: torch.zeros(6)}), QUICK)


def test_ensemble_penalty_needs_an_ensemble(toy: ToyEncoder) -> None:
    cfg = SynthesisConfig(size_px=32, steps=2, match_luminance=False, ensemble_spread_weight=1.0)
    with pytest.raises(ValueError, match="n_members=1"):
        synthesize(toy, [100], "stretch", cfg)


def test_device_mismatch_and_bad_targets(toy: ToyEncoder) -> None:
    with pytest.raises(ValueError, match="move the encoder first"):
        synthesize(toy, [100], "stretch", QUICK, device="cuda")
    with pytest.raises(ValueError, match="targets is empty"):
        synthesize(toy, [], "stretch", QUICK)
    with pytest.raises(ValueError, match="duplicate"):
        synthesize(toy, [100, 100], "stretch", QUICK)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_k": 3, "n_candidates": 2},
        {"response_variation_weight": 1.0},
        {"tv_weight": -1.0},
        {"parameterization": "wavelet"},
        {"shift_frac": 0.6},
    ],
)
def test_config_rejects_inconsistent_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SynthesisConfig(**kwargs)  # type: ignore[arg-type]


def test_unreachable_contrast_is_reported(toy: ToyEncoder) -> None:
    cfg = SynthesisConfig(size_px=32, steps=2)
    with pytest.raises(ValueError, match="could not match"):
        synthesize(toy, [100], "stretch", cfg, natural_stats=(0.05, 0.4))
