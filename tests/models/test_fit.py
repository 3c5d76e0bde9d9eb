from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from models.artifact import load_encoder, read_metadata
from models.backbones import Backbone
from models.features import Trunk
from models.fit import FitConfig, fit_model, summarize
from models.readouts import FactorizedConfig, ReadoutConfig

from .conftest import SMALL_INPUT_PX, gaussian_masks

N_IMAGES = 150
REPS = 4


def recorded_day(alexnet: Backbone) -> tuple[Tensor, Tensor, Tensor]:
    """Images, Poisson responses (presentations, 4 sites), stimulus index. Sites 0-2 follow a
    factorized readout of conv3; site 3 is pure noise."""
    images = torch.rand((N_IMAGES, 1, 64, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = Trunk(alexnet, "conv3", SMALL_INPUT_PX)(images)  # (n, 384, 5, 5)
    gen = torch.Generator().manual_seed(0)
    masks = gaussian_masks([(1.0, 1.0), (2.0, 3.0), (3.5, 2.0)], 5, 1.0)
    weights = torch.randn(3, 384, generator=gen) * (torch.rand(3, 384, generator=gen) < 0.02)
    linear = torch.einsum("nchw,shw,sc->ns", features, masks, weights)
    rates = 6.0 + 3.0 * (linear - linear.mean(0)) / linear.std(0)
    rates = torch.cat([rates, torch.full((N_IMAGES, 1), 6.0)], 1).clamp_min(0.1)
    index = torch.arange(N_IMAGES).repeat(REPS)
    return images, torch.poisson(rates[index], generator=gen), index


def small_config(kind: str = "ridge", **changes: object) -> FitConfig:
    readout = ReadoutConfig(kind=kind, factorized=FactorizedConfig(max_epochs=10))  # type: ignore[arg-type]
    return FitConfig(input_size=SMALL_INPUT_PX, cv_folds=3, readout=readout, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ridge", "factorized"])
def test_fit_model_end_to_end(alexnet: Backbone, tmp_path: Path, kind: str) -> None:
    images, responses, index = recorded_day(alexnet)
    calls: list[tuple[int, int]] = []
    result = fit_model(
        images, responses, index, config=small_config(kind, cache_dir=str(tmp_path / "cache")),
        site_ids=[40, 41, 42, 43], seed=0, progress=lambda d, t: calls.append((d, t)),
        backbone=alexnet,
    )  # fmt: skip
    metrics = result.metrics
    assert metrics.site_ids == (40, 41, 42, 43)
    # the noise site is flagged unreliable but kept
    assert metrics.reliable.tolist() == [True, True, True, False]
    assert metrics.ceiling[3] < 0.5 < metrics.ceiling[:3].min()
    assert metrics.cv_r[:3].min() > 0.1 and metrics.cv_r[:3].mean() > 0.25, metrics.cv_r
    np.testing.assert_allclose(
        metrics.ncev[:3], np.maximum(metrics.cv_r[:3], 0) ** 2 / metrics.ceiling[:3]
    )
    assert summarize(metrics)["n_reliable"] == 3
    # progress runs from 1 to the total, in order
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # natural statistics come with the encoder; the artifact reloads to the same predictions
    encoder = result.encoder
    assert encoder.natural_mean is not None and encoder.natural_mean.shape == (4,)
    path = result.save(tmp_path / "model.safetensors")
    meta = read_metadata(path)
    assert meta["metrics"]["reliable"] == [True, True, True, False]
    assert meta["extra"]["cv_folds"] == 3
    loaded = load_encoder(path, backbone=alexnet)
    assert torch.equal(loaded(images[:5]), encoder(images[:5]))
    # targets are mean responses per image, in response units
    torch.testing.assert_close(
        result.mean_responses[0], responses[index == 0].mean(0), rtol=1e-5, atol=1e-5
    )


def test_bad_inputs_raise_value_errors(alexnet: Backbone) -> None:
    images, responses, index = recorded_day(alexnet)
    config = small_config()

    def fit(**changes: object) -> None:
        args: dict[str, object] = {
            "images": images,
            "responses": responses,
            "stimulus_index": index,
        }
        args.update(changes)
        fit_model(config=config, backbone=alexnet, **args)  # type: ignore[arg-type]

    with_nan = responses.clone()
    with_nan[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(presentations \[5\], sites \[2\]\)"):
        fit(responses=with_nan)
    with_inf = responses.clone()
    with_inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fit(responses=with_inf)
    flat = responses.clone()
    flat[:, 1] = 3.0
    with pytest.raises(ValueError, match=r"sites \[1\] have zero variance"):
        fit(responses=flat)
    few = index < 2  # only 2 distinct images for 3 folds
    with pytest.raises(ValueError, match="fewer than the 3 cross-validation folds"):
        fit(responses=responses[few], stimulus_index=index[few])
    with pytest.raises(ValueError, match="one entry per presentation"):
        fit(stimulus_index=index[:-1])
    with pytest.raises(ValueError, match=r"image rows in \[0, 150\)"):
        fit(stimulus_index=index + 1)
    with pytest.raises(ValueError, match=r"images must be \(n, 1\|3, H, W\)"):
        fit(images=images[:, 0])
    with pytest.raises(ValueError, match="3 site ids for 4 response columns"):
        fit(site_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"unknown layer 'v4'.*valid layers: conv1"):
        fit_model(images, responses, index, config=small_config(layer="v4"), backbone=alexnet)
