"""Read any photo a user might upload into one predictable shape: RGB uint8, upright, bounded in size.

Everything happens in memory (an upload must never touch the disk) and every way a file can be
unusable ends in an ImageError whose message says what is wrong, never in a Pillow traceback.
"""

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ImageError

# Pillow raises these (besides OSError) from inside its decoders on malformed data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

# Modes whose samples exceed 8 bits, with the largest value of their nominal range.
_HIGH_DEPTH_NOMINAL_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def load_image(source: bytes | str | Path, max_pixels: int = 50_000_000, max_side: int = 4096) -> np.ndarray:
    """Decode `source` (file bytes or a path) to an upright RGB uint8 array whose longest side is <= max_side.

    The pixel budget is checked against the size the header declares, before any decoding, so a
    decompression bomb costs nothing. Pillow's own global guard (2 × Image.MAX_IMAGE_PIXELS) still
    applies above that and is reported the same way; the global is never changed here.
    """
    data = _read_bytes(source)
    if not data:
        raise ImageError("the file is empty; choose the photo again or re-export it")
    try:
        image = Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the declared size exceeds the limit of {max_pixels:,} pixels ({exc}); "
                         "downscale the photo before loading it") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unrecognised file format); "
                         "use a JPEG, PNG, TIFF, BMP, GIF or WebP photo") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"not an image Pillow can read ({exc}); "
                         "use a JPEG, PNG, TIFF, BMP, GIF or WebP photo") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"declared size {width}×{height} exceeds the limit of {max_pixels:,} pixels; "
                             "downscale the photo before loading it")
        if width == 0 or height == 0:
            raise ImageError(f"declared size {width}×{height} has no pixels; re-export the photo")
        if max(width, height) > max_side:
            # JPEG can decode directly at 1/2, 1/4 or 1/8 scale; other formats ignore this.
            scale = max_side / max(width, height)
            image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
        try:
            image.load()  # the first frame of a multi-frame file
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        except _DECODE_ERRORS as exc:
            if "truncated" in str(exc):
                raise ImageError("the image data is truncated; the file was cut short, "
                                 "download or export it again") from None
            raise ImageError(f"the image data is corrupt ({exc}); export the photo again") from None
    return _fit_within(rgb, max_side)


def _read_bytes(source: bytes | str | Path) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {source}: {exc.strerror or exc}; check the path") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8: transparency composited on white, high bit depths rescaled."""
    if image.mode in _HIGH_DEPTH_NOMINAL_MAX:
        grey = _rescale_to_uint8(np.asarray(image), _HIGH_DEPTH_NOMINAL_MAX[image.mode])
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError:  # e.g. LAB, which Pillow cannot convert without a colour profile
        raise ImageError(f"colour mode {image.mode} is not supported; save the photo as RGB") from None


def _rescale_to_uint8(values: np.ndarray, nominal_max: float) -> np.ndarray:
    """Scale samples to 0..255 from their nominal range, or from their own range if they leave it.

    Proportional scaling keeps relative intensities; clipping would turn most of a 16-bit photo white.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (0.0, float(nominal_max))
    if values.min() < low or values.max() > high:
        low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _fit_within(rgb: np.ndarray, max_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
