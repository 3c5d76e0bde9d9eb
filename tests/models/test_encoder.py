from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from models.artifact import load_encoder, read_metadata, save_encoder
from models.backbones import AlexNet, Backbone, RandomWeightsWarning, load_backbone
from models.encoder import Encoder
from models.features import FeatureExtractor, Trunk
from models.readouts import FactorizedConfig, ReadoutConfig, fit_readout

from .conftest import SMALL_INPUT_PX, smooth_images


def fitted_encoder(
    backbone: Backbone, kind: str = "factorized", members: int = 2, layer: str = "conv3"
) -> Encoder:
    trunk = Trunk(backbone, layer, SMALL_INPUT_PX)
    images = smooth_images(40, 64, seed=5)
    features = FeatureExtractor(trunk).extract(images)
    gen = torch.Generator().manual_seed(0)
    targets = features.mean((2, 3))[:, :3] * 10 + torch.rand(40, 3, generator=gen)
    config = ReadoutConfig(
        kind=kind,  # type: ignore[arg-type]
        n_members=members,
        factorized=FactorizedConfig(max_epochs=3),
    )
    readout = fit_readout(features, targets, config, seed=0)
    encoder = Encoder(trunk, readout, site_ids=[11, 12, 13])
    encoder.set_natural_stats(images)
    return encoder


def test_encoder_contract(alexnet: Backbone) -> None:
    encoder = fitted_encoder(alexnet)
    images = smooth_images(4, 80, seed=1).requires_grad_(True)
    members = encoder.forward_members(images)
    assert members.shape == (2, 4, 3) and encoder.n_members == 2
    out = encoder(images)
    torch.testing.assert_close(out, members.mean(0))
    out[:, 0].sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert all(p.grad is None for p in encoder.parameters())
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.trunk.training  # the backbone stays in eval mode
    masks = encoder.spatial_masks()
    assert masks is not None and masks.shape == (3, 5, 5)
    assert encoder.natural_mean is not None and encoder.natural_std is not None
    assert encoder.natural_mean.shape == (3,) and bool((encoder.natural_std > 0).all())
    assert encoder.site_ids == [11, 12, 13] and encoder.input_size == SMALL_INPUT_PX
    assert encoder.device == torch.device("cpu")
    mean, spread = encoder.predict_with_spread(images.detach())
    assert mean.shape == spread.shape == (4, 3) and float(spread.mean()) > 0
    rgb = encoder(images.detach().expand(-1, 3, -1, -1))
    torch.testing.assert_close(rgb, out.detach())
    with pytest.raises(ValueError, match="smallest accepted size"):
        encoder(torch.rand(1, 1, 8, 8))


def test_encoder_satisfies_the_synthesis_protocol(alexnet: Backbone) -> None:
    from models.synthesis.protocol import EncoderLike

    assert isinstance(fitted_encoder(alexnet, members=1), EncoderLike)


@pytest.mark.parametrize("kind", ["factorized", "ridge"])
def test_save_load_round_trip(alexnet: Backbone, tmp_path: Path, kind: str) -> None:
    encoder = fitted_encoder(alexnet, kind=kind)
    path = save_encoder(encoder, tmp_path / "model.safetensors", metrics={"cv_r": [0.1, 0.2, 0.3]})
    meta = read_metadata(path)
    assert meta["site_ids"] == [11, 12, 13]
    assert meta["backbone_id"] == "alexnet" and meta["weights_sha256"] == "random-seed-0"
    assert meta["layer"] == "conv3" and meta["input_size"] == SMALL_INPUT_PX
    assert meta["readout_kind"] == kind and meta["n_members"] == 2
    assert meta["metrics"] == {"cv_r": [0.1, 0.2, 0.3]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        loaded = load_encoder(path)  # rebuilds the random backbone from the recorded seed
    images = smooth_images(3, 64, seed=9)
    assert torch.equal(loaded(images), encoder(images))
    assert loaded.natural_mean is not None and encoder.natural_mean is not None
    assert torch.equal(loaded.natural_mean, encoder.natural_mean)
    if kind == "factorized":
        assert meta["lambda_s"] == pytest.approx([0.05] * 3)
        assert torch.equal(loaded.spatial_masks(), encoder.spatial_masks())  # type: ignore[arg-type]
    else:
        assert loaded.spatial_masks() is None


def test_fixed_backbone_round_trip_needs_no_weights_file(tmp_path: Path) -> None:
    encoder = fitted_encoder(load_backbone("v1"), kind="ridge", members=1, layer="complex")
    path = save_encoder(encoder, tmp_path / "v1.safetensors")
    assert read_metadata(path)["weights_sha256"].startswith("fixed-")
    loaded = load_encoder(path)  # the filters are rebuilt, identical
    images = smooth_images(3, 64, seed=2)
    assert torch.equal(loaded(images), encoder(images))
    with pytest.raises(ValueError, match="takes no weights"):
        load_encoder(path, weights=tmp_path / "any.pth")


def test_load_refuses_other_weights_or_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "lab_alexnet.pth"
    torch.save(AlexNet().state_dict(), weights)
    backbone = load_backbone("alexnet", weights)
    path = save_encoder(fitted_encoder(backbone, members=1), tmp_path / "m.safetensors")
    assert load_encoder(path, weights=weights).weights_sha256 == backbone.weights_sha256

    other = tmp_path / "other.pth"
    torch.save(AlexNet().state_dict(), other)
    with pytest.raises(ValueError, match="fitted with backbone weights"):
        load_encoder(path, weights=other)
    with pytest.raises(ValueError, match="pass weights=PATH"):
        load_encoder(path)  # the recorded hash is a file's: the file is required
    meta = read_metadata(path)
    renamed = Backbone(
        "torchvision:alexnet", meta["weights_sha256"], backbone.network,
        backbone.layer_names, "conv3",
    )  # fmt: skip
    with pytest.raises(ValueError, match="fitted on backbone 'alexnet'"):
        load_encoder(path, backbone=renamed)
