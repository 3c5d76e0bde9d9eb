"""synthesize() end to end on the toy encoder: convergence, control, determinism, matching."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import ToyEncoder, natural_like_images
from PIL import Image

from models.synthesis import (
    SynthesisConfig,
    decode_png,
    pattern,
    stretch,
    suppress,
    synthesize,
)
from models.synthesis.config import Optimizer
from models.synthesis.regularizers import image_stats

NO_JITTER = SynthesisConfig(size_px=32, steps=150, lr=0.02, shift_frac=0.0, match_luminance=False)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def zscore(encoder: ToyEncoder, predicted: np.ndarray) -> np.ndarray:
    assert encoder.natural_mean is not None and encoder.natural_std is not None
    return (predicted - encoder.natural_mean.numpy()) / encoder.natural_std.numpy()


@pytest.mark.parametrize("optimizer", ["normgrad", "adam"])
def test_stretch_converges_to_the_filter_optimum(toy: ToyEncoder, optimizer: Optimizer) -> None:
    # A linear readout is maximised over [0, 1] images by 1 where the filter is > 0, else 0.
    cfg = SynthesisConfig(
        size_px=32, steps=150, lr=0.02, shift_frac=0.0, match_luminance=False, optimizer=optimizer
    )
    results = synthesize(toy, [100, 103], "stretch", cfg)
    assert [r.target_site for r in results] == [100, 103]
    for result in results:
        image = decode_png(result.png)[0]  # (H, W)
        weights = toy.filters[0, toy.site_ids.index(result.target_site)]
        assert corr(image, (weights > 0).float()) > 0.9
        assert result.trace[-1] > result.trace[0] + 3.0  # the response rose by > 3 units
        assert result.objective_value == pytest.approx(
            result.predicted[toy.site_ids.index(result.target_site)]
        )


def test_one_hot_lowers_off_target_responses_relative_to_stretch(
    toy_with_stats: ToyEncoder,
) -> None:
    enc = toy_with_stats
    targets = [100, 103]
    by_stretch = synthesize(enc, targets, "stretch", NO_JITTER)
    by_one_hot = synthesize(enc, targets, "one_hot", NO_JITTER)
    for s, o in zip(by_stretch, by_one_hot, strict=True):
        col = enc.site_ids.index(s.target_site)
        off = [c for c in range(len(enc.site_ids)) if c != col]
        z_stretch, z_one_hot = zscore(enc, s.predicted), zscore(enc, o.predicted)
        assert z_one_hot[off].mean() < z_stretch[off].mean() - 1.0
        assert z_one_hot[col] > z_one_hot[off].max()  # the target stands out
        control_one_hot = float(torch.softmax(torch.from_numpy(z_one_hot), 0)[col])
        control_stretch = float(torch.softmax(torch.from_numpy(z_stretch), 0)[col])
        assert o.score == pytest.approx(control_one_hot, rel=1e-4)
        assert logit(o.score) > logit(control_stretch) + 2.0  # the control score improved


@pytest.mark.parametrize(("optimizer", "lr"), [("normgrad", 0.003), ("adam", 0.01)])
def test_pattern_reaches_a_requested_population_state(
    toy_with_stats: ToyEncoder, optimizer: Optimizer, lr: float
) -> None:
    enc = toy_with_stats
    goal_image = (natural_like_images(1, seed=7) - 0.45) * 2.5 + 0.5  # a reachable state
    with torch.no_grad():
        goal_z = (enc(goal_image.clamp(0, 1))[0] - enc.natural_mean) / enc.natural_std
    assert float(goal_z.abs().max()) > 1.5  # far from where a noise start lands (z near 0)
    cfg = SynthesisConfig(
        size_px=32, steps=200, lr=lr, optimizer=optimizer, shift_frac=0.0, match_luminance=False
    )
    (result,) = synthesize(enc, [100], pattern(goal_z), cfg)
    reached = zscore(enc, result.predicted)
    error = float(np.mean((reached - goal_z.numpy()) ** 2))
    start_error = -float(result.trace[0])
    assert error < 0.01 * start_error
    assert result.provenance["objective"]["kind"] == "pattern"


def test_pattern_per_target_states(toy_with_stats: ToyEncoder) -> None:
    enc = toy_with_stats
    states = {100: torch.full((6,), 1.0), 101: torch.full((6,), -1.0)}
    cfg = SynthesisConfig(size_px=32, steps=120, lr=0.01, shift_frac=0.0, match_luminance=False)
    first, second = synthesize(enc, [100, 101], pattern(states), cfg)
    assert zscore(enc, first.predicted).mean() > 0.5
    assert zscore(enc, second.predicted).mean() < -0.5


def test_fixed_seed_gives_byte_identical_pngs(toy_with_stats: ToyEncoder) -> None:
    cfg = SynthesisConfig(
        size_px=32,
        steps=30,
        n_candidates=2,
        keep_k=2,
        seed=5,
        rotation_deg=5.0,
        scale_frac=0.05,
        tv_weight=0.01,
        grad_blur_sigma_px=1.0,
    )
    run = lambda c: synthesize(toy_with_stats, [100, 102], "one_hot", c, (0.45, 0.12))  # noqa: E731
    first, again = run(cfg), run(cfg)
    assert [r.png for r in first] == [r.png for r in again]
    other_seed = run(SynthesisConfig(**{**cfg.__dict__, "seed": 6}))
    assert [r.png for r in first] != [r.png for r in other_seed]
    assert all(r.png.startswith(b"\x89PNG") for r in first)


def test_results_do_not_depend_on_chunking(toy: ToyEncoder) -> None:
    cfg = SynthesisConfig(size_px=32, steps=30, n_candidates=2, keep_k=2, match_luminance=False)
    whole = synthesize(toy, [100, 101, 102], "stretch", cfg)
    chunked = synthesize(
        toy, [100, 101, 102], "stretch", SynthesisConfig(**{**cfg.__dict__, "chunk_images": 1})
    )
    for a, b in zip(whole, chunked, strict=True):
        assert (a.target_site, a.candidate_index) == (b.target_site, b.candidate_index)
        diff = (decode_png(a.png) - decode_png(b.png)).abs()
        assert float(diff.max()) <= 2 / 255


def test_luminance_and_contrast_match_the_natural_set(toy_with_stats: ToyEncoder) -> None:
    stats = (0.42, 0.11)
    cfg = SynthesisConfig(size_px=40, steps=40)
    results = synthesize(toy_with_stats, [100, 101, 104], "stretch", cfg, natural_stats=stats)
    for result in results:
        mean, rms = image_stats(decode_png(result.png)[None])
        assert abs(float(mean) - stats[0]) <= 0.05 * stats[0]
        assert abs(float(rms) - stats[1]) <= 0.05 * stats[1]
        assert Image.open(io.BytesIO(result.png)).size == (40, 40)


def test_results_carry_predictions_trace_and_provenance(toy_with_stats: ToyEncoder) -> None:
    cfg = SynthesisConfig(size_px=32, steps=25, n_candidates=3, keep_k=2, seed=11)
    calls: list[tuple[int, int]] = []
    results = synthesize(
        toy_with_stats,
        [101, 105],
        "one_hot",
        cfg,
        (0.45, 0.12),
        progress=lambda step, total: calls.append((step, total)),
        model_id="model-7",
    )
    assert [(r.target_site, r.rank) for r in results] == [(101, 0), (101, 1), (105, 0), (105, 1)]
    for best, second in (results[0:2], results[2:4]):
        assert best.objective_value >= second.objective_value
        assert best.candidate_index != second.candidate_index
    first = results[0]
    assert first.predicted.shape == (6,)
    assert first.trace.shape == (25,)
    prov = first.provenance
    assert prov["model_id"] == "model-7"
    assert prov["objective"] == {"kind": "one_hot", "site": None, "temperature": 1.0}
    assert prov["seed"] == 11 and prov["steps"] == 25 and prov["target_site"] == 101
    assert prov["config"]["n_candidates"] == 3
    json.dumps(prov)  # storable as the stimulus's provenance JSON
    assert calls[-1] == (25, 25)
    assert [c[0] for c in calls] == list(range(1, 26))


def test_natural_reference_reports_the_best_natural_score(toy_with_stats: ToyEncoder) -> None:
    enc = toy_with_stats
    naturals = natural_like_images(20, seed=3)
    cfg = SynthesisConfig(size_px=32, steps=80, lr=0.02, match_luminance=False)
    (from_images,) = synthesize(enc, [102], "one_hot", cfg, natural_reference=naturals)
    with torch.no_grad():
        predictions = enc(naturals)
    (from_predictions,) = synthesize(enc, [102], "one_hot", cfg, natural_reference=predictions)
    z = (predictions - enc.natural_mean) / enc.natural_std
    expected = torch.softmax(z, dim=1)[:, 2]
    assert from_images.natural_best_score == pytest.approx(float(expected.max()), rel=1e-5)
    assert from_images.natural_best_index == int(expected.argmax())
    assert from_predictions.natural_best_score == pytest.approx(from_images.natural_best_score)
    assert from_images.natural_best_score is not None
    assert from_images.score > from_images.natural_best_score


def test_ensemble_spread_penalty_lowers_member_disagreement(toy_ensemble: ToyEncoder) -> None:
    enc = toy_ensemble
    plain = SynthesisConfig(size_px=32, steps=100, lr=0.02, shift_frac=0.0, match_luminance=False)
    careful = SynthesisConfig(**{**plain.__dict__, "ensemble_spread_weight": 3.0})

    def spread(result_png: bytes) -> float:
        with torch.no_grad():
            members = enc.forward_members(decode_png(result_png)[None])[:, 0, 0]  # site 100
        return float(members.std())

    (a,) = synthesize(enc, [100], "stretch", plain)
    (b,) = synthesize(enc, [100], "stretch", careful)
    assert spread(b.png) < 0.7 * spread(a.png)
    assert b.provenance["objective"]["kind"] == "ensemble"


def test_composed_objective_and_fourier_param(toy_with_stats: ToyEncoder) -> None:
    enc = toy_with_stats
    objective = stretch() - 0.5 * stretch(101) + 0.0 * suppress(102)
    cfg = SynthesisConfig(
        size_px=32, steps=100, lr=0.05, parameterization="fourier", match_luminance=False
    )
    (result,) = synthesize(enc, [100], objective, cfg)
    assert result.trace[-1] > result.trace[0] + 2.0
    expected = result.predicted[0] - 0.5 * result.predicted[1]
    assert result.objective_value == pytest.approx(expected, rel=1e-4)


def test_rf_noise_start_and_plateau_stop(toy: ToyEncoder) -> None:
    cfg = SynthesisConfig(
        size_px=32,
        steps=400,
        lr=0.05,
        shift_frac=0.0,
        match_luminance=False,
        start="rf_noise",
        plateau_patience_steps=5,
    )
    (result,) = synthesize(toy, [103], "stretch", cfg)
    assert result.provenance["steps"] < 400
    assert result.trace.shape == (result.provenance["steps"],)


def test_response_variation_and_jitter_copies_run(toy_with_stats: ToyEncoder) -> None:
    cfg = SynthesisConfig(
        size_px=32,
        steps=40,
        jitter_copies=3,
        response_variation_weight=1.0,
        contrast_weight=0.1,
        color=True,
        match_luminance=False,
    )
    (result,) = synthesize(toy_with_stats, [104], "stretch", cfg)
    assert decode_png(result.png).shape == (3, 32, 32)
    assert result.trace[-1] > result.trace[0]


def test_image_start_begins_at_the_given_image_and_improves_on_it(toy: ToyEncoder) -> None:
    starts = natural_like_images(2, seed=7)  # (2, 1, 32, 32)
    given = {100: starts[0], 103: starts[1]}
    few = SynthesisConfig(
        size_px=32,
        steps=3,
        lr=0.005,
        shift_frac=0.0,
        match_luminance=False,
        start="image",
        start_noise=0.0,
    )
    results = synthesize(toy, [100, 103], "stretch", few, start_images=given)
    for result in results:
        image = decode_png(result.png)[0]
        assert corr(image, given[result.target_site][0]) > 0.9  # a few steps stay close to it
        assert result.trace[-1] > result.trace[0]  # and they raise the target's prediction
    again = synthesize(toy, [100, 103], "stretch", few, start_images=given)
    assert [r.png for r in again] == [r.png for r in results]


def test_image_start_needs_an_image_per_target(toy: ToyEncoder) -> None:
    cfg = SynthesisConfig(size_px=32, steps=2, match_luminance=False, start="image")
    image = natural_like_images(1, seed=7)[0]
    with pytest.raises(ValueError, match="needs start_images"):
        synthesize(toy, [100], "stretch", cfg)
    with pytest.raises(ValueError, match="no start image for target"):
        synthesize(toy, [100, 103], "stretch", cfg, start_images={100: image})
    with pytest.raises(ValueError, match="expected"):
        synthesize(toy, [100], "stretch", cfg, start_images={100: image[:, :16]})
    with pytest.raises(ValueError, match=r"config\.start is not 'image'"):
        synthesize(toy, [100], "stretch", NO_JITTER, start_images={100: image})
    with pytest.raises(ValueError, match="start_noise"):
        SynthesisConfig(start="image", start_noise=2.0)
