"""load_image on every odd input a user can upload, each built in memory with Pillow."""

import struct
import time
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import GifImagePlugin, Image

from core.errors import ImageError
from core.imageio import load_image

GREY = (128, 128, 128)
EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A real 8×8 PNG whose IHDR claims another size (CRC fixed), so only the header is believable."""
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    assert data[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_rgb_png_round_trips_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    loaded = load_image(encode(Image.fromarray(pixels), "PNG"))
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, pixels)


def test_path_source(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    path = tmp_path / "face.png"
    path.write_bytes(encode(Image.fromarray(pixels), "PNG"))
    np.testing.assert_array_equal(load_image(path), pixels)
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_missing_path_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "absent.jpg")


def test_grey_becomes_three_equal_channels():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    loaded = load_image(encode(Image.fromarray(grey), "PNG"))
    assert loaded.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[:, :, channel], grey)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent becomes white
    rgba[0, 2] = (255, 0, 0, 128)  # half: a*c + (1-a)*255 per channel
    loaded = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    np.testing.assert_array_equal(loaded[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(loaded[0, 1], (255, 255, 255))
    expected_half = np.array([255, 255 * (1 - 128 / 255), 255 * (1 - 128 / 255)])
    assert np.abs(loaded[0, 2] - expected_half).max() <= 1


def test_la_transparent_pixel_becomes_white():
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    loaded = load_image(encode(la, "PNG"))
    np.testing.assert_array_equal(loaded[0], [(40, 40, 40), (255, 255, 255)])


def test_palette_image_with_transparent_index():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette_image.putdata([0, 1])
    opaque = load_image(encode(palette_image, "PNG"))
    np.testing.assert_array_equal(opaque[0], [(0, 0, 255), (0, 255, 0)])
    transparent = load_image(encode(palette_image, "PNG", transparency=0))
    np.testing.assert_array_equal(transparent[0], [(255, 255, 255), (0, 255, 0)])


def test_cmyk_primaries():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255)])  # cyan, white (no ink), black
    loaded = load_image(encode(cmyk, "TIFF"))
    np.testing.assert_array_equal(loaded[0], [(0, 255, 255), (255, 255, 255), (0, 0, 0)])


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 40000, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(BytesIO(data)).mode == "I;16"
    loaded = load_image(data)
    np.testing.assert_array_equal(loaded[0, :, 0], [0, round(40000 * 255 / 65535), 255])


def test_16_bit_big_endian_tiff():
    values = np.array([[0, 40000, 65535]], dtype=">u2")
    data = encode(Image.frombytes("I;16B", (3, 1), values.tobytes()), "TIFF")
    assert Image.open(BytesIO(data)).mode == "I;16B"
    np.testing.assert_array_equal(load_image(data)[0, :, 0], [0, 156, 255])


def test_32_bit_integer_in_16_bit_range_scales_like_16_bit():
    data = encode(Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.int32)), "TIFF")
    assert Image.open(BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(load_image(data)[0, :, 0], [0, 156, 255])


def test_32_bit_integer_outside_16_bit_range_is_stretched():
    data = encode(Image.fromarray(np.array([[-100, 0, 1_000_000]], dtype=np.int32)), "TIFF")
    expected = np.round((np.array([-100, 0, 1_000_000]) + 100) * 255 / 1_000_100)
    np.testing.assert_array_equal(load_image(data)[0, :, 0], expected)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # the nominal 0..1 range
        ([-2.0, 0.0, 2.0], [0, 128, 255]),  # outside it: own range
    ],
)
def test_float_tiff(values, expected):
    data = encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    assert Image.open(BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(load_image(data)[0, :, 0], expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    ("orientation", "expected_corner"),
    [
        (6, "top-right"),  # 0th row is the visual right side, 0th column the visual top
        (8, "bottom-left"),  # 0th row is the visual left side, 0th column the visual bottom
    ],
)
def test_exif_orientation(fmt, orientation, expected_corner):
    stored = np.full((40, 60, 3), GREY, dtype=np.uint8)  # stored 60 wide, 40 high
    stored[:8, :8] = (255, 0, 0)  # marker at the stored top-left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    loaded = load_image(
        encode(Image.fromarray(stored), fmt, exif=exif, quality=95)
        if fmt == "JPEG"
        else encode(Image.fromarray(stored), fmt, exif=exif)
    )
    assert loaded.shape == (60, 40, 3)
    rows, cols = np.nonzero(loaded[:, :, 0].astype(int) - loaded[:, :, 1] > 100)
    centre = (rows.mean(), cols.mean())
    expected = {"top-right": (3.5, 36.5), "bottom-left": (56.5, 3.5)}[expected_corner]
    assert np.allclose(centre, expected, atol=1.0)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    gif = Image.open(BytesIO(data))
    assert isinstance(gif, GifImagePlugin.GifImageFile) and gif.n_frames == 2
    loaded = load_image(data)
    assert (loaded == (255, 0, 0)).all()


def test_large_jpeg_is_downscaled_to_max_side():
    rows, cols = np.mgrid[0:1200, 0:2000]
    gradient = np.stack([cols * 255 // 1999, rows * 255 // 1199, np.full_like(rows, 90)], axis=2).astype(np.uint8)
    loaded = load_image(encode(Image.fromarray(gradient), "JPEG", quality=95), max_side=400)
    assert loaded.shape == (240, 400, 3)
    reference = np.asarray(Image.fromarray(gradient).resize((400, 240), Image.Resampling.BOX)).astype(int)
    assert np.abs(loaded.astype(int) - reference).mean() < 3


def test_large_png_is_downscaled_keeping_aspect():
    loaded = load_image(encode(Image.new("RGB", (900, 300), (10, 200, 30)), "PNG"), max_side=300)
    assert loaded.shape == (100, 300, 3)
    assert (loaded == (10, 200, 30)).all()


def test_zero_bytes():
    with pytest.raises(ImageError, match="the file is empty"):
        load_image(b"")


def test_text_renamed_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("patient notes, not a photo\n" * 10)
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        load_image(path)


def test_truncated_jpeg():
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(ImageError, match="the image data is truncated"):
        load_image(data[: len(data) // 2])


def test_declared_size_over_budget_is_refused_from_the_header():
    """8000×8000 passes Pillow's own guard, so this is our limit; decoding would also fail (no data)."""
    with pytest.raises(ImageError, match="declared size 8000×8000 exceeds the limit of 50,000,000 pixels"):
        load_image(png_declaring(8000, 8000))


def test_decompression_bomb_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(png_declaring(30000, 30000))
    assert time.perf_counter() - start < 0.5


def test_pixel_budget_is_a_parameter_and_leaves_pillow_global_alone():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="declared size 100×100 exceeds the limit of 5,000 pixels"):
        load_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)
    assert before == Image.MAX_IMAGE_PIXELS
