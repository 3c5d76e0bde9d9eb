"""Backbone features at one layer: preprocessing, the truncated trunk, batched cached extraction.

Images everywhere in ``models`` are float tensors in [0, 1], (batch, 1, H, W) or (batch, 3, H, W).
:class:`Trunk` does the paper's preprocessing (grayscale copied to 3 channels, bilinear resize to
``input_size``, backbone normalisation) and runs the frozen backbone up to ``layer``.

:class:`FeatureExtractor` runs a trunk over many images in batches and keeps one ``.npy`` per
(image, key) in a :class:`FeatureCache`, the key being (backbone id, weights sha256, layer,
input size) and the image's stimulus sha256; a refit never recomputes features it has seen.
Cached arrays are float16 when every value fits float16's range, else float32; float16 keeps
a relative error under 1e-3, far below response noise.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import Backbone

MIN_IMAGE_SIZE_PX = 32
_FLOAT16_MAX = 60000.0

Progress = Callable[[int, int], None]


def check_images(images: Tensor, *, min_size: int = MIN_IMAGE_SIZE_PX, check_range: bool) -> None:
    """Raise ValueError unless ``images`` is (batch, 1|3, H, W) float, H/W >= min_size, in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape (batch, 1, H, W) or (batch, 3, H, W); got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1]; got dtype {images.dtype}")
    if min(images.shape[2], images.shape[3]) < min_size:
        raise ValueError(
            f"images are {images.shape[2]}x{images.shape[3]} px; the smallest accepted size is "
            f"{min_size} px"
        )
    if check_range and images.numel() > 0:
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise ValueError(
                f"image values must be finite and in [0, 1]; got range [{low}, {high}] "
                f"(divide 8-bit images by 255)"
            )


def preprocess(images: Tensor, input_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """(batch, 1|3, H, W) in [0, 1] -> normalised (batch, 3, input_size, input_size)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[2] != input_size or images.shape[3] != input_size:
        images = F.interpolate(
            images, size=(input_size, input_size), mode="bilinear", align_corners=False
        )
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class Trunk(nn.Module):
    """Preprocessing + frozen backbone truncated at ``layer``: images -> (batch, C, h, w)."""

    mean: Tensor
    std: Tensor

    def __init__(self, backbone: Backbone, layer: str, input_size: int = 224) -> None:
        super().__init__()
        if input_size < MIN_IMAGE_SIZE_PX:
            raise ValueError(f"input_size must be >= {MIN_IMAGE_SIZE_PX} px; got {input_size}")
        self.net = backbone.truncated(layer)
        self.backbone_id = backbone.backbone_id
        self.weights_sha256 = backbone.weights_sha256
        self.layer = layer
        self.input_size = input_size
        self.min_image_size = MIN_IMAGE_SIZE_PX
        self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32))
        self.eval()

    def train(self, mode: bool = True) -> Trunk:
        # The backbone is frozen: it stays in eval mode (no dropout, fixed batch-norm statistics).
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, min_size=self.min_image_size, check_range=False)
        out = self.net(preprocess(images, self.input_size, self.mean, self.std))
        if out.ndim == 2:  # dense layers: (batch, C) -> (batch, C, 1, 1)
            out = out[:, :, None, None]
        return out  # (batch, C, h, w)

    @property
    def cache_key(self) -> str:
        """Folder name for this (backbone id, weights sha256, layer, input size)."""
        backbone = re.sub(r"[^A-Za-z0-9_.-]", "_", self.backbone_id)
        return f"{backbone}/{self.weights_sha256}/{self.layer}_{self.input_size}px"


def image_sha256(image: Tensor) -> str:
    """Content id of one image tensor (C, H, W): sha256 of its shape and float32 bytes."""
    array = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


class FeatureCache:
    """One ``.npy`` per (trunk key, stimulus sha256) under ``root``; writes are atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, trunk_key: str, stimulus_sha256: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stimulus_sha256):
            raise ValueError(f"stimulus id {stimulus_sha256!r} is not a hex digest")
        return self.root / trunk_key / stimulus_sha256[:2] / f"{stimulus_sha256}.npy"

    def load(self, trunk_key: str, stimulus_sha256: str) -> np.ndarray | None:
        path = self.path(trunk_key, stimulus_sha256)
        if not path.is_file():
            return None
        return np.load(path)

    def store(self, trunk_key: str, stimulus_sha256: str, features: np.ndarray) -> None:
        path = self.path(trunk_key, stimulus_sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fits_half = bool(np.all(np.abs(features) < _FLOAT16_MAX))
        array = features.astype(np.float16 if fits_half else np.float32)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as tmp:
                np.save(tmp, array)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class ImageLoader:
    """Images known by stimulus id (sha256) and loaded on demand, e.g. from the blob store.

    ``load(ids)`` returns (len(ids), 1|3, H, W) float in [0, 1]. Only ids missing from the
    feature cache are loaded.
    """

    stimulus_ids: tuple[str, ...]
    load: Callable[[Sequence[str]], Tensor]

    def __len__(self) -> int:
        return len(self.stimulus_ids)


class FeatureExtractor:
    """Batched features of a :class:`Trunk` on ``device`` with an optional disk cache.

    ``backbone_calls`` counts trunk forward passes (batches), ``images_computed`` the images
    that went through the backbone; cache hits add to neither.
    """

    def __init__(
        self,
        trunk: Trunk,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        cache: FeatureCache | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.device = torch.device(device)
        self.trunk = trunk.to(self.device)
        self.batch_size = batch_size
        self.cache = cache
        self.backbone_calls = 0
        self.images_computed = 0
        self.cache_hits = 0

    @torch.no_grad()
    def feature_shape(self) -> tuple[int, int, int]:
        size = self.trunk.input_size
        probe = torch.zeros(1, 3, size, size, device=self.device)
        c, h, w = self.trunk(probe).shape[1:]
        return int(c), int(h), int(w)

    @torch.no_grad()
    def extract(
        self,
        images: Tensor | ImageLoader,
        stimulus_ids: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Features (n, C, h, w) float32 on the CPU for ``images`` (a tensor or an ImageLoader).

        ``stimulus_ids`` (e.g. the sha256 of the PNG bytes) key the cache; for a tensor without
        ids each image's content hash is used.
        """
        if isinstance(images, ImageLoader):
            ids = list(images.stimulus_ids)
        else:
            check_images(images, min_size=self.trunk.min_image_size, check_range=True)
            if stimulus_ids is not None and len(stimulus_ids) != images.shape[0]:
                raise ValueError(
                    f"got {len(stimulus_ids)} stimulus ids for {images.shape[0]} images"
                )
            if stimulus_ids is not None:
                ids = list(stimulus_ids)
            elif self.cache is not None:
                ids = [image_sha256(image) for image in images]
            else:
                ids = [""] * images.shape[0]
        n = len(ids)
        c, h, w = self.feature_shape()
        out = torch.empty((n, c, h, w), dtype=torch.float32)  # (n, C, h, w)
        key = self.trunk.cache_key
        missing: list[int] = []
        for i, stimulus_id in enumerate(ids):
            cached = self.cache.load(key, stimulus_id) if self.cache is not None else None
            if cached is None or cached.shape != (c, h, w):
                missing.append(i)
            else:
                out[i] = torch.from_numpy(cached.astype(np.float32))
                self.cache_hits += 1
        total = len(missing)
        for start in range(0, total, self.batch_size):
            chunk = missing[start : start + self.batch_size]
            if isinstance(images, ImageLoader):
                batch = images.load([ids[i] for i in chunk])
                check_images(batch, min_size=self.trunk.min_image_size, check_range=True)
            else:
                batch = images[chunk]
            feats = self.trunk(batch.to(self.device, torch.float32)).float().cpu()
            self.backbone_calls += 1
            self.images_computed += len(chunk)
            out[chunk] = feats
            if self.cache is not None:
                for j, i in enumerate(chunk):
                    self.cache.store(key, ids[i], feats[j].numpy())
            if progress is not None:
                progress(min(start + self.batch_size, total), total)
        return out
