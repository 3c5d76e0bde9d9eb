from __future__ import annotations

import hashlib
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from models.backbones import (
    AlexNet,
    Backbone,
    RandomWeightsWarning,
    V1FilterBank,
    file_sha256,
    load_backbone,
    weights_sha256,
)
from models.features import Trunk

# torchvision.models.AlexNet().state_dict() keys, in order
TORCHVISION_ALEXNET_KEYS = [
    "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
    "features.6.weight", "features.6.bias", "features.8.weight", "features.8.bias",
    "features.10.weight", "features.10.bias", "classifier.1.weight", "classifier.1.bias",
    "classifier.4.weight", "classifier.4.bias", "classifier.6.weight", "classifier.6.bias",
]  # fmt: skip


def test_state_dict_keys_match_torchvision() -> None:
    state = AlexNet().state_dict()
    assert list(state) == TORCHVISION_ALEXNET_KEYS
    assert state["features.6.weight"].shape == (384, 192, 3, 3)
    assert state["classifier.1.weight"].shape == (4096, 9216)


def test_random_init_warns_with_how_to_fix_and_is_seeded() -> None:
    with pytest.warns(RandomWeightsWarning, match="weights=PATH"):
        first = load_backbone("alexnet", None, seed=3)
    with pytest.warns(RandomWeightsWarning, match="predictions will be poor"):
        again = load_backbone("alexnet", None, seed=3)
    with pytest.warns(RandomWeightsWarning, match="fixed backbone 'v1'"):
        other = load_backbone("alexnet", None, seed=4)
    assert first.weights_sha256 == "random-seed-3"
    a, b, c = (bb.network.state_dict()["features.0.weight"] for bb in (first, again, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_weights_file_loads_and_is_hashed(tmp_path: Path) -> None:
    torch.manual_seed(11)
    source = AlexNet()
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # no warning with weights
        backbone = load_backbone("alexnet", path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.weights_sha256 == expected == file_sha256(path) == weights_sha256(path)
    loaded = backbone.network.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit backbone 'alexnet'"):
        load_backbone("alexnet", path)
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone("alexnet", tmp_path / "missing.pth")


def test_unknown_layer_lists_valid_names(alexnet: Backbone) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*conv1.*conv3.*fc7"):
        Trunk(alexnet, "conv9")


def test_unknown_backbone_spec() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        load_backbone("vgg")


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_optional_packages(package: str) -> None:
    spec = f"{package}:alexnet" if package == "torchvision" else f"{package}:resnet18"
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ValueError, match=f"needs the package '{package}'"):
            load_backbone(spec)
    else:  # the package is installed: the backbone builds and truncates by module name
        with pytest.warns(RandomWeightsWarning):
            backbone = load_backbone(spec)
        layer = backbone.layer_names[2]
        out = Trunk(backbone, layer, 64)(torch.rand(1, 3, 64, 64))
        assert out.ndim == 4


def test_layer_shapes_and_truncation(alexnet: Backbone) -> None:
    images = torch.rand(2, 1, 224, 224)
    ran_after: list[str] = []
    network = alexnet.network
    assert isinstance(network, AlexNet)
    hook = network.features[8].register_forward_hook(lambda *_: ran_after.append("conv4"))
    try:
        out = Trunk(alexnet, "conv3", 224)(images)
    finally:
        hook.remove()
    assert out.shape == (2, 384, 13, 13)
    assert ran_after == []  # conv4 was never run
    assert bool((out >= 0).all())  # after ReLU
    assert Trunk(alexnet, "fc7", 224)(images).shape == (2, 4096, 1, 1)
    assert Trunk(alexnet, "pool2", 224)(images).shape == (2, 192, 13, 13)


def test_grayscale_equals_replicated_rgb(alexnet: Backbone) -> None:
    trunk = Trunk(alexnet, "conv2", 96)
    gray = torch.rand(2, 1, 120, 120)
    torch.testing.assert_close(trunk(gray), trunk(gray.expand(-1, 3, -1, -1).clone()))
    with pytest.raises(ValueError, match="smallest accepted size"):
        trunk(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(batch, 1, H, W\)"):
        trunk(torch.rand(1, 2, 64, 64))


def _grating(
    orientation: float, wavelength_px: float, phase: float, size: int = 128
) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    along = x * math.cos(orientation) + y * math.sin(orientation)
    return (0.5 + 0.4 * torch.cos(2 * math.pi * along / wavelength_px + phase))[None, None]


def test_v1_bank_is_fixed_and_takes_no_weights(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is random, so no RandomWeightsWarning
        first, second = load_backbone("v1"), load_backbone("v1", seed=7)
    assert first.weights_sha256 == second.weights_sha256
    assert first.weights_sha256.startswith("fixed-") and len(first.weights_sha256) == 6 + 64
    assert first.layer_names == ("simple", "complex") and first.default_layer == "complex"
    with pytest.raises(ValueError, match=r"fixed .*takes no weights"):
        load_backbone("v1", tmp_path / "lab.pth")
    with pytest.raises(ValueError, match=r"unknown layer 'conv3'.*simple, complex"):
        Trunk(first, "conv3")


def test_v1_layer_shapes() -> None:
    backbone = load_backbone("v1")
    images = torch.rand(2, 1, 96, 96)
    complex_ = Trunk(backbone, "complex", 128)(images)
    simple = Trunk(backbone, "simple", 128)(images)
    bank = V1FilterBank()
    assert complex_.shape == (2, bank.n_scales * bank.n_orientations, 32, 32)
    assert simple.shape == (2, 4 * bank.n_scales * bank.n_orientations, 32, 32)
    assert bool((complex_ > 0).all()) and bool((simple >= 0).all())


@pytest.mark.parametrize("k", range(8))
def test_v1_complex_cells_prefer_their_orientation_at_any_phase(k: int) -> None:
    trunk = Trunk(load_backbone("v1"), "complex", 128)
    n = V1FilterBank().n_orientations
    responses = []
    for phase in (0.0, 1.0, 2.5):
        out = trunk(_grating(math.pi * k / n, wavelength_px=4.0, phase=phase))
        center = out[0, :n, 8:24, 8:24].mean((1, 2))  # scale 0 (wavelength 4 px), away from edges
        assert int(center.argmax()) == k
        assert float(center[k]) > 3 * float(center[(k + n // 2) % n])  # orthogonal: weak
        responses.append(float(center[k]))
    assert max(responses) / min(responses) < 1.05  # energy: the phase does not matter
