"""Backbone registry: frozen image networks whose intermediate layers feed the readouts.

Specs accepted by :func:`load_backbone`:

* ``"alexnet"``: built in (5 conv + 3 dense, the network of Bashivan et al. 2019). Its state-dict
  keys equal torchvision's AlexNet (``features.0.weight`` ... ``classifier.6.bias``), so an
  ImageNet checkpoint saved by torchvision loads with ``weights=PATH``. Layers: ``conv1`` ..
  ``conv5`` (after ReLU), ``pool1``, ``pool2``, ``pool5``, ``fc6``, ``fc7`` (after ReLU), ``fc8``.
* ``"v1"``: built in and fixed (nothing learned, so nothing to download): a V1-like front end of
  quadrature Gabor pairs (8 orientations, 4 octave-spaced scales on an image pyramid). Layers:
  ``simple`` (half-wave rectified even/odd responses) and ``complex`` (phase-invariant energy),
  both on a grid of ``input_size / 4``. A classic baseline for early and mid-level visual
  cortex, and the one backbone whose features mean something without a weights file.
* ``"torchvision:NAME"`` / ``"timm:NAME"``: only when that package is importable; layer names are
  the network's module names (``dict(net.named_modules())``).

Weights only ever come from a local file (a ``torch.save`` state dict or a ``.safetensors``
file); nothing is downloaded. Without weights the network is initialised from a fixed seed and a
:class:`RandomWeightsWarning` says that predictions will be poor.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS_PREFIX = "random-seed-"
FIXED_WEIGHTS_PREFIX = "fixed-"


class RandomWeightsWarning(UserWarning):
    """The backbone was randomly initialised because no weights file was given."""


class AlexNet(nn.Module):
    """AlexNet with torchvision's module layout (so torchvision checkpoints load as-is)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0 conv1
            nn.ReLU(),  # 1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2 pool1
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3 conv2
            nn.ReLU(),  # 4
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5 pool2
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6 conv3
            nn.ReLU(),  # 7
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8 conv4
            nn.ReLU(),  # 9
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10 conv5
            nn.ReLU(),  # 11
            nn.MaxPool2d(kernel_size=3, stride=2),  # 12 pool5
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),  # 0
            nn.Linear(256 * 6 * 6, 4096),  # 1 fc6
            nn.ReLU(),  # 2
            nn.Dropout(p=dropout),  # 3
            nn.Linear(4096, 4096),  # 4 fc7
            nn.ReLU(),  # 5
            nn.Linear(4096, num_classes),  # 6 fc8
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class V1FilterBank(nn.Module):
    """Fixed quadrature Gabor filters on an image pyramid (see the module docstring).

    Each scale halves the image (binomial blur, then 2x2 average) and applies the same bank:
    wavelength ``wavelength_px`` at scale 0, Gaussian envelope of sd 0.56 wavelengths (about one
    octave of bandwidth). Outputs of every scale are resampled to a grid of 1 / ``grid_stride``
    of the input and stacked: ``complex`` has n_scales x n_orientations channels (scale-major),
    ``simple`` four times as many (+even, -even, +odd, -odd).
    """

    layers: tuple[str, ...] = ("simple", "complex")
    kernels: Tensor
    blur: Tensor

    def __init__(
        self,
        n_orientations: int = 8,
        n_scales: int = 4,
        wavelength_px: float = 4.0,
        kernel_px: int = 11,
        grid_stride: int = 4,
    ) -> None:
        super().__init__()
        self.n_orientations = n_orientations
        self.n_scales = n_scales
        self.grid_stride = grid_stride
        half = kernel_px // 2
        coords = torch.arange(-half, half + 1, dtype=torch.float64)
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        sigma = 0.56 * wavelength_px
        even, odd = [], []
        for k in range(n_orientations):
            theta = torch.pi * k / n_orientations
            along = x * math.cos(theta) + y * math.sin(theta)
            envelope = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
            carrier = 2 * torch.pi * along / wavelength_px
            e = envelope * torch.cos(carrier)
            e = e - envelope * (e.sum() / envelope.sum())  # zero mean: blind to luminance
            o = envelope * torch.sin(carrier)
            even.append(e / e.norm())
            odd.append(o / o.norm())
        bank = torch.stack(even + odd)[:, None]  # (2 * orientations, 1, k, k)
        self.register_buffer("kernels", bank.float())
        binomial = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", (torch.outer(binomial, binomial) / 16)[None, None])

    def features(self, x: Tensor, layer: str) -> Tensor:
        """(batch, C, S, S) normalised images -> (batch, channels, S / stride, S / stride)."""
        image = x.mean(dim=1, keepdim=True)
        size = (max(1, x.shape[-2] // self.grid_stride), max(1, x.shape[-1] // self.grid_stride))
        pad = self.kernels.shape[-1] // 2
        n = self.n_orientations
        out = []
        for scale in range(self.n_scales):
            if scale > 0:
                image = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), self.blur)
                image = F.avg_pool2d(image, 2)
            r = F.conv2d(F.pad(image, (pad,) * 4, mode="replicate"), self.kernels)
            even, odd = r[:, :n], r[:, n:]
            if layer == "complex":
                maps = torch.sqrt(even**2 + odd**2 + 1e-6)
            else:
                maps = torch.cat([F.relu(even), F.relu(-even), F.relu(odd), F.relu(-odd)], dim=1)
            if maps.shape[-2:] != size:
                if maps.shape[-2] >= size[0]:
                    maps = F.adaptive_avg_pool2d(maps, size)
                else:
                    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            out.append(maps)
        return torch.cat(out, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x, "complex")


class _V1Layer(nn.Module):
    def __init__(self, bank: V1FilterBank, layer: str) -> None:
        super().__init__()
        self.bank = bank
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.bank.features(x, self.layer)


# layer name -> (section, number of leading modules of that section to run)
_ALEXNET_LAYERS: dict[str, tuple[str, int]] = {
    "conv1": ("features", 2),
    "pool1": ("features", 3),
    "conv2": ("features", 5),
    "pool2": ("features", 6),
    "conv3": ("features", 8),
    "conv4": ("features", 10),
    "conv5": ("features", 12),
    "pool5": ("features", 13),
    "fc6": ("classifier", 3),
    "fc7": ("classifier", 6),
    "fc8": ("classifier", 7),
}


class _StopForward(Exception):
    """Raised by a forward hook to stop a network right after the requested layer."""


class _HookTruncated(nn.Module):
    """Runs ``network`` only up to the module ``layer`` (a hook stops the forward pass there)."""

    def __init__(self, network: nn.Module, layer: str) -> None:
        super().__init__()
        self.network = network
        self.layer = layer
        self._output: Tensor | None = None
        self._module = dict(network.named_modules())[layer]

    def _capture(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise ValueError(f"layer {self.layer!r} does not output a single tensor")
        self._output = output
        raise _StopForward

    def forward(self, x: Tensor) -> Tensor:
        self._output = None
        handle = self._module.register_forward_hook(self._capture)
        try:
            self.network(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        out = self._output
        self._output = None
        if out is None:
            raise RuntimeError(f"layer {self.layer!r} was not reached in the forward pass")
        return out


class Backbone:
    """A frozen network plus its identity (id and weights hash) and input normalisation.

    ``truncated(layer)`` returns a module mapping normalised images (batch, 3, S, S) to that
    layer's output (batch, C, h, w) or (batch, C); layers after it are never run.
    """

    def __init__(
        self,
        backbone_id: str,
        weights_sha256: str,
        network: nn.Module,
        layer_names: tuple[str, ...],
        default_layer: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.backbone_id = backbone_id
        self.weights_sha256 = weights_sha256
        self.network = network.eval().requires_grad_(False)
        self.layer_names = layer_names
        self.default_layer = default_layer
        self.mean = mean
        self.std = std

    def check_layer(self, layer: str) -> None:
        if layer not in self.layer_names:
            shown = ", ".join(self.layer_names[:60])
            more = " ..." if len(self.layer_names) > 60 else ""
            raise ValueError(
                f"unknown layer {layer!r} for backbone {self.backbone_id!r}; "
                f"valid layers: {shown}{more}"
            )

    def truncated(self, layer: str) -> nn.Module:
        self.check_layer(layer)
        net = self.network
        if isinstance(net, V1FilterBank):
            return _V1Layer(net, layer).eval().requires_grad_(False)
        if isinstance(net, AlexNet):
            section, count = _ALEXNET_LAYERS[layer]
            if section == "features":
                trunk: nn.Module = nn.Sequential(*list(net.features)[:count])
            else:
                trunk = nn.Sequential(
                    net.features, net.avgpool, nn.Flatten(1), *list(net.classifier)[:count]
                )
        else:
            trunk = _HookTruncated(net, layer)
        return trunk.eval().requires_grad_(False)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(weights: str | Path | None, seed: int = 0) -> str:
    """Identity of a backbone's weights: the file's sha256, or ``random-seed-N`` without a file."""
    if weights is None:
        return f"{RANDOM_WEIGHTS_PREFIX}{seed}"
    return file_sha256(weights)


def fixed_weights_id(network: nn.Module) -> str:
    """Identity of a fixed backbone: ``fixed-`` + sha256 of its buffers (the filters)."""
    digest = hashlib.sha256()
    for name, buffer in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().float().contiguous().numpy().tobytes())
    return f"{FIXED_WEIGHTS_PREFIX}{digest.hexdigest()}"


def seed_from_weights_id(weights_id: str) -> int | None:
    """The seed encoded in a ``random-seed-N`` weights id, or None for a file hash."""
    if weights_id.startswith(RANDOM_WEIGHTS_PREFIX):
        return int(weights_id[len(RANDOM_WEIGHTS_PREFIX) :])
    return None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist; pass a local file path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict")
    state = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)}
    # Checkpoints saved from DataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(network: nn.Module, backbone_id: str, weights: str | Path) -> None:
    state = load_state_dict_file(weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"weights file {str(weights)!r} does not fit backbone {backbone_id!r} "
            f"(expected keys like {next(iter(network.state_dict()))!r}): {error}"
        ) from error


def _import_optional(package: str, spec: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ValueError(
            f"backbone {spec!r} needs the package {package!r}, which is not installed here; "
            f"install it into the environment or use the built-in 'alexnet'"
        ) from error


def _build(spec: str) -> tuple[nn.Module, tuple[float, float, float], tuple[float, float, float]]:
    if spec == "alexnet":
        return AlexNet(), IMAGENET_MEAN, IMAGENET_STD
    if spec == "v1":
        return V1FilterBank(), IMAGENET_MEAN, IMAGENET_STD
    if spec.startswith("torchvision:"):
        tv_models = _import_optional("torchvision", spec).models
        return tv_models.get_model(spec.split(":", 1)[1], weights=None), IMAGENET_MEAN, IMAGENET_STD
    if spec.startswith("timm:"):
        timm = _import_optional("timm", spec)
        net = timm.create_model(spec.split(":", 1)[1], pretrained=False)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        return net, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
    raise ValueError(
        f"unknown backbone {spec!r}; use 'alexnet', 'v1', 'torchvision:NAME' or 'timm:NAME'"
    )


def load_backbone(
    spec: str = "alexnet", weights: str | Path | None = None, seed: int = 0
) -> Backbone:
    """Build a frozen backbone; load ``weights`` from a local file or initialise from ``seed``.
    A fixed backbone (``v1``) takes no weights and ignores ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network, mean, std = _build(spec)
    if isinstance(network, V1FilterBank):
        if weights is not None:
            raise ValueError(f"backbone {spec!r} is fixed (nothing learned); it takes no weights")
        return Backbone(
            backbone_id=spec,
            weights_sha256=fixed_weights_id(network),
            network=network,
            layer_names=V1FilterBank.layers,
            default_layer="complex",
            mean=mean,
            std=std,
        )
    if weights is not None:
        _load_weights(network, spec, weights)
    else:
        warnings.warn(
            f"backbone {spec!r} has no weights: it is randomly initialised (seed {seed}), so its "
            f"features are not ImageNet features and predictions will be poor. Pass weights=PATH "
            f"(--weights PATH) pointing at a local ImageNet checkpoint, e.g. torchvision's "
            f"alexnet-owt-7be5be79.pth, or use the fixed backbone 'v1' (layer 'complex'), which "
            f"needs no weights.",
            RandomWeightsWarning,
            stacklevel=2,
        )
    if isinstance(network, AlexNet):
        layer_names: tuple[str, ...] = tuple(_ALEXNET_LAYERS)
        default_layer = "conv3"
    else:
        layer_names = tuple(name for name, _ in network.named_modules() if name)
        default_layer = layer_names[-1]
    return Backbone(
        backbone_id=spec,
        weights_sha256=weights_sha256(weights, seed),
        network=network,
        layer_names=layer_names,
        default_layer=default_layer,
        mean=mean,
        std=std,
    )
