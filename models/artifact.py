"""One-file artifact of a fitted encoder: a ``.safetensors`` file whose header metadata holds the
JSON description (key ``popcontrol``).

Tensors: the readout's buffers (``readout.*``) and the natural statistics. Metadata: format
version, site ids, backbone id, weights sha256, layer, input size, readout kind and its settings
(lambda per site, ensemble size, output), per-site metrics and any caller extras. Backbone weights
are not stored: loading rebuilds the backbone from a local weights file (or the recorded random
seed) and refuses a backbone id or weights hash that differs from the recorded one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.backbones import (
    FIXED_WEIGHTS_PREFIX,
    Backbone,
    load_backbone,
    seed_from_weights_id,
)
from models.encoder import Encoder
from models.features import Trunk
from models.readouts import FactorizedReadout, Readout, RidgeReadout

FORMAT_VERSION = 1
_METADATA_KEY = "popcontrol"


def save_encoder(
    encoder: Encoder,
    path: str | Path,
    *,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` to ``path`` (atomically) and return the path."""
    path = Path(path)
    readout = encoder.readout
    tensors = {
        f"readout.{k}": v.detach().cpu().contiguous() for k, v in readout.state_dict().items()
    }
    if encoder.natural_mean is not None and encoder.natural_std is not None:
        tensors["natural_mean"] = encoder.natural_mean.detach().cpu().contiguous()
        tensors["natural_std"] = encoder.natural_std.detach().cpu().contiguous()
    description: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "site_ids": encoder.site_ids,
        "backbone_id": encoder.backbone_id,
        "weights_sha256": encoder.weights_sha256,
        "layer": encoder.layer,
        "input_size": encoder.input_size,
        "readout_kind": readout.kind,
        "readout_output": readout.output,
        "n_members": readout.n_members,
        "metrics": dict(metrics) if metrics is not None else None,
        "extra": dict(extra) if extra is not None else {},
    }
    if isinstance(readout, FactorizedReadout):
        description["lambda_s"] = readout.lambda_s.tolist()
        description["lambda_d"] = readout.lambda_d.tolist()
    if isinstance(readout, RidgeReadout):
        description["feature_shape"] = list(readout.feature_shape)
        description["ridge_alpha"] = readout.alpha.tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(description)})
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON description of an artifact, without loading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if _METADATA_KEY not in header:
        raise ValueError(f"{str(path)!r} is not a popcontrol model artifact (no metadata)")
    description: dict[str, Any] = json.loads(header[_METADATA_KEY])
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has artifact format {description.get('format_version')}; "
            f"this code reads format {FORMAT_VERSION}"
        )
    return description


def _readout_from(description: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Readout:
    part = {k.removeprefix("readout."): v for k, v in tensors.items() if k.startswith("readout.")}
    kind = description["readout_kind"]
    if kind == "factorized":
        return FactorizedReadout(
            masks=part["masks"],
            channel_weights=part["channel_weights"],
            bias=part["bias"],
            feature_scale=part["feature_scale"],
            feature_mean=part["feature_mean"],
            target_offset=part["target_offset"],
            target_scale=part["target_scale"],
            lambda_s=part["lambda_s"],
            lambda_d=part["lambda_d"],
            output=description["readout_output"],
        )
    if kind == "ridge":
        shape = description["feature_shape"]
        return RidgeReadout(
            weight=part["weight"],
            bias=part["bias"],
            feature_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            target_offset=part["target_offset"],
            target_scale=part["target_scale"],
            alpha=part["alpha"],
        )
    raise ValueError(f"artifact has unknown readout kind {kind!r}")


def load_encoder(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    backbone: Backbone | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Rebuild a saved encoder. Pass the backbone's local ``weights`` file (or a built
    ``backbone``); a backbone id or weights hash different from the recorded one is refused."""
    description = read_metadata(path)
    recorded_id = description["backbone_id"]
    recorded_hash = description["weights_sha256"]
    if backbone is None and weights is None and recorded_hash.startswith(FIXED_WEIGHTS_PREFIX):
        backbone = load_backbone(recorded_id)
    if backbone is None:
        seed = seed_from_weights_id(recorded_hash) if weights is None else 0
        if weights is None and seed is None:
            raise ValueError(
                f"model {str(path)!r} was fitted on backbone {recorded_id!r} with weights "
                f"sha256 {recorded_hash}; pass weights=PATH to that weights file"
            )
        backbone = load_backbone(recorded_id, weights, seed=seed or 0)
    if backbone.backbone_id != recorded_id:
        raise ValueError(
            f"model {str(path)!r} was fitted on backbone {recorded_id!r}, not "
            f"{backbone.backbone_id!r}; load it with the same backbone"
        )
    if backbone.weights_sha256 != recorded_hash:
        raise ValueError(
            f"model {str(path)!r} was fitted with backbone weights {recorded_hash}, but the given "
            f"weights are {backbone.weights_sha256}; pass the weights file the model was fitted "
            f"with"
        )
    tensors = load_file(str(path))
    trunk = Trunk(backbone, description["layer"], int(description["input_size"]))
    encoder = Encoder(trunk, _readout_from(description, tensors), description["site_ids"])
    if "natural_mean" in tensors:
        encoder.natural_mean = tensors["natural_mean"]
        encoder.natural_std = tensors["natural_std"]
    return encoder.to(device)
