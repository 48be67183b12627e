"""Read any photo a user might upload into one predictable shape: RGB uint8, upright, bounded in size.

Everything happens in memory (an upload must never touch the disk) and every way a file can be
unusable ends in an ImageError whose message says what is wrong, never in a Pillow traceback.

Memory is bounded by the pixel budget: the header is checked before decoding, JPEGs decode at a
reduced scale, and a large photo is shrunk in the mode it was decoded in before any conversion, so
no full-size RGB or float copy is ever made: the peak is at most 12 bytes per declared pixel
(measured 2.5 for bilevel, 4.3 for 16-bit grey, 5.8 for RGB, 9.7 for RGBA, whose resize premultiplies
alpha at full size), so at most 600 MB with the default budget (tests/test_hardening_images.py).

Stored label maps (``load_label_map``) are read here too, so every image file the product opens
goes through one module that turns Pillow's failures into ImageErrors.
"""

import logging
import re
import stat
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import ImageError
from core.parse import check_labels

# Pillow raises these (besides OSError) from inside its decoders on malformed data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error, zlib.error)

# Modes whose samples exceed 8 bits, with the largest value of their nominal range.
_HIGH_DEPTH_NOMINAL_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}

EXIF_ORIENTATION = 0x0112
# What Pillow's ImageOps.exif_transpose does for each EXIF orientation; applied here to the
# shrunk image, so a rotated 50-megapixel photo is never copied at full size.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow's TIFF/EXIF and PNG readers log tag values and chunk contents (descriptions, GPS
# positions, camera serial numbers, ICC profile names) at DEBUG. A photo's metadata must not reach
# the logs, whatever level the application logs at; a caller who really wants Pillow's debugging
# output sets these loggers' level back explicitly.
for _name in ("PIL.TiffImagePlugin", "PIL.PngImagePlugin"):
    logging.getLogger(_name).setLevel(logging.INFO)

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

# Pillow modes that hold one index per pixel (a palette PNG reads as its indices, not its colours).
_INDEX_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")


def load_image(source: bytes | str | Path, max_pixels: int = 50_000_000, max_side: int = 4096) -> np.ndarray:
    """Decode `source` (file bytes or a path) to an upright RGB uint8 array whose longest side is <= max_side.

    The pixel budget is checked against the size the header declares, before any decoding, so a
    decompression bomb costs nothing. Pillow's own global guard (2 × Image.MAX_IMAGE_PIXELS) still
    applies above that and is reported the same way; the global is never changed here.
    """
    return load_image_and_scale(source, max_pixels, max_side)[0]


def load_image_and_scale(
    source: bytes | str | Path, max_pixels: int = 50_000_000, max_side: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """``load_image``, and the (x, y) factors from the upright photo's own pixels to the returned ones.

    The factors are 1 unless the photo was shrunk to ``max_side``: coordinates measured on the full
    photo (a dataset's landmarks) times them land on the returned array.
    """
    image = _opened(_read_bytes(source), max_pixels)
    with image:
        width, height = image.size
        rgb, orientation = _decoded(image, max_pixels, max_side)
    upright = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    if upright is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(upright))
    if upright in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    ):
        width, height = height, width
    return rgb, np.array([rgb.shape[1] / width, rgb.shape[0] / height])


def _opened(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (nothing decoded yet), or an ImageError that says what to do."""
    if not data:
        raise ImageError("the file is empty; choose the photo again or re-export it")
    try:
        return Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        declared = _BOMB_PIXELS.search(str(exc))
        size = f"({int(declared.group(1)):,} pixels) " if declared else ""
        raise ImageError(
            f"the declared size {size}exceeds the limit of {max_pixels:,} pixels; downscale the photo before loading it"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            "not an image Pillow can read (unrecognised file format); use a JPEG, PNG, TIFF, BMP, GIF or WebP photo"
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"not an image Pillow can read ({exc}); use a JPEG, PNG, TIFF, BMP, GIF or WebP photo"
        ) from None


def _decoded(image: Image.Image, max_pixels: int, max_side: int) -> tuple[np.ndarray, object]:
    """The first frame as RGB uint8 (shrunk to ``max_side``) and its EXIF orientation tag, checked
    against the size limits before any pixel is decoded."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"declared size {width}×{height} exceeds the limit of {max_pixels:,} pixels; "
            "downscale the photo before loading it"
        )
    if width == 0 or height == 0:
        raise ImageError(f"declared size {width}×{height} has no pixels; re-export the photo")
    if max(width, height) > max_side:
        # JPEG can decode directly at 1/2, 1/4 or 1/8 scale; other formats ignore this.
        scale = max_side / max(width, height)
        image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
    try:
        image.load()  # the first frame of a multi-frame file
        orientation = image.getexif().get(EXIF_ORIENTATION)
        rgb = _to_rgb(image, max_side)
    except _DECODE_ERRORS as exc:
        if "truncated" in str(exc):
            raise ImageError(
                "the image data is truncated; the file was cut short, download or export it again"
            ) from None
        raise ImageError(f"the image data is corrupt ({exc}); export the photo again") from None
    return rgb, orientation


def _read_bytes(source: bytes | str | Path) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        mode = Path(source).stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise ImageError(f"cannot read {source}: not a regular file; choose a photo file")
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {source}: {exc.strerror or exc}; check the path") from None


def _to_rgb(image: Image.Image, max_side: int) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 no larger than max_side: transparency composited on white, high
    bit depths rescaled. Shrinking comes first, in the decoded mode, so conversions touch few pixels."""
    if image.mode in _HIGH_DEPTH_NOMINAL_MAX:
        low, high = _value_range(image)
        # BOX keeps every sample within the original range, so the range found above still holds.
        grey = _rescale_to_uint8(np.asarray(_shrunk(image, max_side, Image.Resampling.BOX)), low, high)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "1":
        image = image.convert("L")  # Pillow resizes bilevel and palette images only by nearest neighbour
    elif image.mode in ("P", "PA") or (image.has_transparency_data and image.mode not in ("RGBA", "LA")):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    image = _shrunk(image, max_side, Image.Resampling.LANCZOS)
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError:  # a mode Pillow cannot convert without a colour profile
        raise ImageError(f"colour mode {image.mode} is not supported; save the photo as RGB") from None


def _shrunk(image: Image.Image, max_side: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, resample, reducing_gap=3.0)


def _value_range(image: Image.Image) -> tuple[float, float]:
    """The range mapped onto 0..255: the mode's nominal one, or the samples' own if they leave it.

    Proportional scaling keeps relative intensities; clipping would turn most of a 16-bit photo
    white. Non-finite samples count as 0 (they are drawn black-level). Measured on the full image
    without a float copy.
    """
    nominal = (0.0, float(_HIGH_DEPTH_NOMINAL_MAX[image.mode]))
    if image.mode == "I":
        low, high = cast(tuple[float, float], image.getextrema())  # one band: (min, max), not one pair per band
    elif image.mode == "F":
        values = np.asarray(image)
        finite = np.isfinite(values)
        low = float(np.minimum.reduce(values, axis=None, where=finite, initial=np.inf))
        high = float(np.maximum.reduce(values, axis=None, where=finite, initial=-np.inf))
        if not finite.all():
            low, high = min(low, 0.0), max(high, 0.0)
    else:  # unsigned 16 bit: always within the nominal range
        return nominal
    return nominal if nominal[0] <= low and high <= nominal[1] else (float(low), float(high))


def _rescale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def load_label_map(source: str | Path) -> np.ndarray:
    """Read a stored LaPa label map (an image file whose pixel values are the label ids)."""
    try:
        with Image.open(source) as image:
            if image.mode not in _INDEX_MODES:
                raise ImageError(
                    f"{source}: a label map must be a single-channel image of LaPa ids, "
                    f"got colour mode {image.mode}; save it as a greyscale or palette PNG"
                )
            label_map = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError and truncation are OSErrors
        raise ImageError(f"{source}: cannot read the label map ({exc}); use a lossless PNG of LaPa ids") from None
    try:
        check_labels(label_map, f"the label map {source}")
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    return label_map.astype(np.uint8)
