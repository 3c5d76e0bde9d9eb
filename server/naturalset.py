"""A natural image set made offline from the photographs that scikit-image ships.

Crops at random positions and scales, grayscale, resized to a square: enough variety for the
demo's natural and normalizer sets and for tests, and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PHOTOGRAPHS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "horse",
    "brick",
    "grass",
    "gravel",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
    "page",
    "text",
)


def _photographs() -> list[np.ndarray]:
    import skimage.color
    import skimage.data

    out = []
    for name in PHOTOGRAPHS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3:
            image = skimage.color.rgb2gray(image[..., :3])
        image = image.astype(np.float64)
        if image.max() > 1.0:
            image = image / 255.0
        out.append(image)
    return out


def natural_images(n_images: int, size_px: int, seed: int) -> list[np.ndarray]:
    """``n_images`` grayscale uint8 arrays of shape (size_px, size_px), reproducible for a seed."""
    if n_images < 1:
        raise ValueError(f"n_images must be ≥ 1, got {n_images}")
    if size_px < 8:
        raise ValueError(f"size_px must be ≥ 8, got {size_px}")
    rng = np.random.default_rng(seed)
    photos = _photographs()
    images = []
    for i in range(n_images):
        photo = photos[(i + int(rng.integers(len(photos)))) % len(photos)]
        height, width = photo.shape
        side = int(min(height, width) * rng.uniform(0.25, 0.9))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        pixels = np.clip(crop * 255.0, 0, 255).astype(np.uint8)
        resized = Image.fromarray(pixels).resize((size_px, size_px), Image.Resampling.BILINEAR)
        images.append(np.asarray(resized, dtype=np.uint8))
    return images
