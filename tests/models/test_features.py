from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from models.backbones import Backbone, RandomWeightsWarning, load_backbone
from models.features import FeatureCache, FeatureExtractor, ImageLoader, Trunk, image_sha256

from .conftest import SMALL_INPUT_PX, smooth_images


def test_second_extraction_hits_the_cache(alexnet: Backbone, tmp_path: Path) -> None:
    images = smooth_images(6, 64, seed=0)
    cache = FeatureCache(tmp_path)
    first = FeatureExtractor(Trunk(alexnet, "conv3", SMALL_INPUT_PX), batch_size=4, cache=cache)
    fresh = first.extract(images)
    assert fresh.shape == (6, 384, 5, 5)
    assert first.backbone_calls == 2 and first.images_computed == 6

    # a refit builds a new extractor on the same cache: no backbone call at all
    again = FeatureExtractor(Trunk(alexnet, "conv3", SMALL_INPUT_PX), batch_size=4, cache=cache)
    cached = again.extract(images)
    assert again.backbone_calls == 0 and again.cache_hits == 6
    torch.testing.assert_close(cached, fresh, rtol=1e-3, atol=1e-3 * float(fresh.abs().max()))

    # two new images among the old ones: only those two go through the backbone
    more = torch.cat([images, smooth_images(2, 64, seed=1)])
    again.extract(more)
    assert again.backbone_calls == 1 and again.images_computed == 2


def test_cache_key_separates_layer_size_and_weights(alexnet: Backbone, tmp_path: Path) -> None:
    images = smooth_images(2, 64, seed=0)
    cache = FeatureCache(tmp_path)
    FeatureExtractor(Trunk(alexnet, "conv3", SMALL_INPUT_PX), cache=cache).extract(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        other_weights = load_backbone("alexnet", None, seed=1)
    for trunk in (
        Trunk(alexnet, "conv2", SMALL_INPUT_PX),
        Trunk(alexnet, "conv3", 128),
        Trunk(other_weights, "conv3", SMALL_INPUT_PX),
    ):
        extractor = FeatureExtractor(trunk, cache=cache)
        extractor.extract(images)
        assert extractor.backbone_calls == 1, trunk.cache_key
    keys = {p.parent.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npy")}
    assert keys == {
        f"alexnet/random-seed-0/conv3_{SMALL_INPUT_PX}px",
        f"alexnet/random-seed-0/conv2_{SMALL_INPUT_PX}px",
        "alexnet/random-seed-0/conv3_128px",
        f"alexnet/random-seed-1/conv3_{SMALL_INPUT_PX}px",
    }


def test_loader_loads_only_missing_images(alexnet: Backbone, tmp_path: Path) -> None:
    images = smooth_images(5, 64, seed=2)
    ids = tuple(image_sha256(image) for image in images)
    by_id = dict(zip(ids, images, strict=True))
    requested: list[str] = []

    def load(wanted: Sequence[str]) -> Tensor:
        requested.extend(wanted)
        return torch.stack([by_id[w] for w in wanted])

    cache = FeatureCache(tmp_path)
    extractor = FeatureExtractor(Trunk(alexnet, "conv3", SMALL_INPUT_PX), cache=cache)
    direct = extractor.extract(images[:3])  # content hashes are the default ids
    requested.clear()
    via_loader = extractor.extract(ImageLoader(ids, load))
    assert requested == list(ids[3:])
    torch.testing.assert_close(via_loader[:3], direct, rtol=1e-3, atol=1e-2)


def test_float16_cache_is_accurate(alexnet: Backbone, tmp_path: Path) -> None:
    images = smooth_images(3, 64, seed=3)
    trunk = Trunk(alexnet, "conv3", SMALL_INPUT_PX)
    fresh = FeatureExtractor(trunk).extract(images)
    FeatureExtractor(trunk, cache=FeatureCache(tmp_path)).extract(images)
    stored = [np.load(p) for p in sorted(tmp_path.rglob("*.npy"))]
    assert {a.dtype for a in stored} == {np.dtype(np.float16)}
    cached = FeatureExtractor(trunk, cache=FeatureCache(tmp_path)).extract(images)
    relative = (cached - fresh).abs().max() / fresh.abs().max()
    assert float(relative) < 1e-3


def test_bad_images_are_refused(alexnet: Backbone) -> None:
    extractor = FeatureExtractor(Trunk(alexnet, "conv3", SMALL_INPUT_PX))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        extractor.extract(torch.full((1, 1, 64, 64), 255.0))
    with pytest.raises(ValueError, match="shape"):
        extractor.extract(torch.rand(64, 64))
    with pytest.raises(ValueError, match="2 stimulus ids for 1 images"):
        extractor.extract(torch.rand(1, 1, 64, 64), stimulus_ids=["a" * 64, "b" * 64])
