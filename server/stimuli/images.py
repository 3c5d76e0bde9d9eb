"""Decoding uploads and making the canonical PNG whose sha256 is a stimulus id."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from server.errors import Invalid

ACCEPTED_FORMATS = {"PNG", "JPEG"}
ACCEPTED_CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/pjpeg"}


@dataclass(frozen=True)
class CanonicalImage:
    sha256: str
    png: bytes
    width_px: int
    height_px: int
    mode: str


def canonical_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def canonicalize(
    data: bytes, *, max_px: int = 4096, max_bytes: int = 20 * 1024 * 1024
) -> CanonicalImage:
    """Validate an uploaded PNG/JPEG and return its canonical PNG (grayscale or RGB, 8 bit)."""
    if not data:
        raise Invalid(
            "the uploaded file is empty; send a PNG or JPEG image in the form field `file`"
        )
    if len(data) > max_bytes:
        raise Invalid(f"the file is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise Invalid(f"images must be PNG or JPEG, not {image.format}")
            width, height = image.size
            if width > max_px or height > max_px:
                raise Invalid(
                    f"the image is {width}×{height} px; the limit is {max_px}×{max_px} px"
                )
            if width < 1 or height < 1:
                raise Invalid("the image has no pixels")
            image.load()
    except Invalid:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Invalid(
            f"the image would decompress to too many pixels ({exc}); the limit is "
            f"{max_px}×{max_px} px (decompression bomb guard)"
        ) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise Invalid(
            f"the file is not a readable PNG or JPEG image ({exc.__class__.__name__}: {exc})"
        ) from None
    converted: Image.Image
    if image.mode in ("L", "RGB"):
        converted = image
    elif image.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F") or image.mode in ("LA", "La"):
        converted = image.convert("L")
    else:
        converted = image.convert("RGB")
    png = canonical_png(converted)
    return CanonicalImage(
        sha256=hashlib.sha256(png).hexdigest(),
        png=png,
        width_px=converted.width,
        height_px=converted.height,
        mode=converted.mode,
    )
