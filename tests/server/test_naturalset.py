import numpy as np
import pytest

from server.naturalset import natural_images


def test_natural_images_are_reproducible_and_varied() -> None:
    a = natural_images(12, 32, seed=3)
    b = natural_images(12, 32, seed=3)
    c = natural_images(12, 32, seed=4)
    assert all(x.shape == (32, 32) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert len({x.tobytes() for x in a}) == 12
    assert np.std([x.mean() for x in a]) > 5  # not one flat grey


def test_natural_images_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_images"):
        natural_images(0, 32, 0)
    with pytest.raises(ValueError, match="size_px"):
        natural_images(1, 4, 0)
