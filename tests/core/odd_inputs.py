"""A corpus of odd photos a user might upload, generated in memory (never stored in the repository).

Each ``OddInput`` builds its bytes (or, for file-system oddities, a path inside a scratch folder)
on demand and says what must happen to it: a result, a ``UserFacingError`` whose message matches
``match``, or either (a flipped byte may or may not leave a decodable image). Faces come from
``core.synth.render_face`` and skimage's astronaut photo, so detection has something real to find.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from skimage import data as skimage_data

from core.synth import FaceParams, render_face, sample_face_shape, sample_photo

RESULT, MESSAGE, EITHER = "result", "message", "either"
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class OddInput:
    name: str
    build: Callable[[Path], bytes | Path]  # scratch folder -> file bytes, or a path to load
    expect: str  # RESULT, MESSAGE or EITHER
    match: str = ""  # regex the message must contain when expect == MESSAGE
    bomb: bool = False  # declares (or holds) far more pixels than its file size suggests
    upright: Callable[[], np.ndarray] | None = None  # the pixels a RESULT must decode to (up to JPEG loss)
    faces: int = 1  # at least this many faces must be found in a RESULT


# ---------------------------------------------------------------- base pictures


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.cache
def synthetic_face(seed: int, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_face(FaceParams(sample_face_shape(rng), sample_photo(rng), (), size)).image


@functools.cache
def astronaut_face() -> np.ndarray:
    """A real photo MTCNN finds one face in: the astronaut's head and shoulders, 200×200."""
    return np.ascontiguousarray(skimage_data.astronaut()[30:230, 120:320])


def _metadata_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    exif[0x010E] = "odd-input corpus"  # ImageDescription
    return exif


@functools.cache
def base_jpeg() -> bytes:
    """A face JPEG with EXIF, a comment and progressive scans: many segments to cut through."""
    return encode(
        Image.fromarray(synthetic_face(0)),
        "JPEG",
        quality=90,
        exif=_metadata_exif(),
        comment=b"corpus",
        progressive=True,
    )


@functools.cache
def base_png() -> bytes:
    """A face PNG with text, compressed text and EXIF chunks before the pixel data."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "corpus")
    info.add_text("Software", "odd inputs " * 20, zip=True)
    return encode(Image.fromarray(synthetic_face(1)), "PNG", pnginfo=info, exif=_metadata_exif())


def _face_in(fmt: str, **options) -> Callable[[Path], bytes]:
    return lambda _: encode(Image.fromarray(synthetic_face(2)), fmt, **options)


def cut(data: Callable[[], bytes], fraction: float) -> Callable[[Path], bytes]:
    def build(_: Path) -> bytes:
        whole = data()
        return whole[: int(len(whole) * fraction)]

    return build


def flipped(data: Callable[[], bytes], seed: int, within: float = 1.0) -> Callable[[Path], bytes]:
    """1-8 bytes XOR-ed with random values, at positions in the first `within` of the file."""

    def build(_: Path) -> bytes:
        original = bytearray(data())
        rng = np.random.default_rng(seed)
        for position in rng.integers(0, max(1, int(len(original) * within)), rng.integers(1, 9)):
            original[position] ^= int(rng.integers(1, 256))
        return bytes(original)

    return build


# ---------------------------------------------------------------- hand-built files


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def streamed_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, value: int = 90) -> bytes:
    """A real, valid PNG of one colour, compressed row by row: a huge image in a small file, built
    without ever holding the pixels (the honest decompression bomb)."""
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes([value]) * -(-width * samples * bit_depth // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 64) for _ in range(height // 64)]
    parts += [compressor.compress(row * (height % 64)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def png_declaring(width: int, height: int) -> bytes:
    """A real 8×8 PNG whose header claims another size (CRC fixed): only the header is believable."""
    original = encode(Image.new("RGB", (8, 8)), "PNG")
    header = b"IHDR" + struct.pack(">II", width, height) + original[24:29]
    return original[:12] + header + struct.pack(">I", zlib.crc32(header)) + original[33:]


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose frame header (SOF) claims another size."""
    original = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = original.find(marker)
        if at >= 0:
            original[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(original)
    raise AssertionError("no SOF marker")


def gif_declaring(width: int, height: int) -> bytes:
    """A 4×4 GIF frame on a logical screen of another size."""
    original = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    original[6:10] = struct.pack("<HH", width, height)
    return bytes(original)


def bmp_declaring(width: int, height: int) -> bytes:
    original = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    original[18:26] = struct.pack("<ii", width, height)
    return bytes(original)


def tiff_declaring(width: int, height: int) -> bytes:
    """A greyscale TIFF header for width×height pixels whose only strip holds 16 bytes."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 16),
    ]
    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
        + b"\x00" * 4
    )
    return b"II*\x00" + struct.pack("<I", 24) + bytes(range(16)) + ifd


def jpeg_with_app1(payload: bytes) -> bytes:
    """A face JPEG whose EXIF segment (APP1) holds `payload` after the Exif header."""
    original = encode(Image.fromarray(synthetic_face(3)), "JPEG", quality=85)
    segment = b"Exif\x00\x00" + payload
    return original[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + original[2:]


def exif_orientation_value(value: int) -> bytes:
    """A little-endian TIFF header with one IFD entry: Orientation = value."""
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", 1)
        + struct.pack("<HHII", EXIF_ORIENTATION, 3, 1, value)
        + b"\x00" * 4
    )


def animated_gif() -> bytes:
    frames = [Image.fromarray(synthetic_face(5)).quantize(64)] + [Image.new("P", (160, 160), i) for i in (1, 2)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def apng() -> bytes:
    frames = [Image.fromarray(synthetic_face(5)), Image.new("RGB", (160, 160), (0, 0, 255))]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=80)


def multipage_tiff() -> bytes:
    frames = [Image.fromarray(synthetic_face(5)), Image.new("RGB", (160, 160), (0, 255, 0))]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")


def sixteen_bit_face() -> bytes:
    grey = synthetic_face(6).astype(np.float64).mean(axis=2)
    return encode(Image.fromarray(np.round(grey * 257).astype(np.uint16)), "PNG")


def sixteen_bit_rgb_png() -> bytes:
    """48-bit RGB PNG, written by hand (Pillow cannot save it); Pillow reads it as 8-bit RGB."""
    face = synthetic_face(7).astype(np.uint16) * 257
    rows = b"".join(b"\x00" + face[y].astype(">u2").tobytes() for y in range(face.shape[0]))
    header = struct.pack(">IIBBBBB", face.shape[1], face.shape[0], 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def float_face_with_nan() -> bytes:
    values = synthetic_face(8).mean(axis=2).astype(np.float32) / 255
    values[:5, :5] = np.nan
    values[-5:, -5:] = np.inf
    return encode(Image.fromarray(values), "TIFF")


# ---------------------------------------------------------------- scenes with faces


def canvas(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A plain textured background: no face-like structure."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack(
        [90 + 60 * np.sin(cols / 37.0), 120 + 50 * np.cos(rows / 53.0), np.full((height, width), 150.0)], axis=2
    )
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def pasted(background: np.ndarray, face: np.ndarray, top: int, left: int) -> np.ndarray:
    """`face` pasted with its top-left corner at (top, left), cropped where it leaves the picture."""
    out = background.copy()
    height, width = face.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, out.shape[0]), min(left + width, out.shape[1])
    out[y0:y1, x0:x1] = face[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def tiled_faces(count: int, size: int = 112) -> np.ndarray:
    side = int(np.ceil(np.sqrt(count)))
    out = canvas(side * size, side * size, seed=count)
    for i in range(count):
        face = synthetic_face(15 + i, size)
        out = pasted(out, face, (i // side) * size, (i % side) * size)
    return out


def png_of(array_builder: Callable[[], np.ndarray]) -> Callable[[Path], bytes]:
    return lambda _: encode(Image.fromarray(array_builder()), "PNG")


def rotated(orientation: int, fmt: str, face: Callable[[], np.ndarray]) -> Callable[[Path], bytes]:
    """`face` stored so that applying EXIF `orientation` makes it upright again."""
    inverse = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]

    def build(_: Path) -> bytes:
        stored = Image.fromarray(face())
        if inverse is not None:
            stored = stored.transpose(inverse)
        return encode(stored, fmt, exif=_metadata_exif(orientation), **({"quality": 92} if fmt == "JPEG" else {}))

    return build


# ---------------------------------------------------------------- file-system oddities


def text_named_jpg(folder: Path) -> Path:
    path = folder / "notes.jpg"
    path.write_text("patient notes, not a photo\n" * 20)
    return path


def fifo(folder: Path) -> Path:
    path = folder / "pipe.jpg"
    os.mkfifo(path)
    return path


def directory(folder: Path) -> Path:
    path = folder / "folder.jpg"
    path.mkdir()
    return path


def device(_: Path) -> Path:
    return Path("/dev/zero")


def missing(folder: Path) -> Path:
    return folder / "absent.jpg"


# ---------------------------------------------------------------- the corpus


def _corpus() -> list[OddInput]:
    cases: list[OddInput] = []
    add = cases.append
    not_image = "not an image"
    truncated_or_unreadable = "truncated|not an image|corrupt"

    # Truncation at many offsets, through headers, metadata and pixel data.
    for k in range(40):
        fraction = k / 40
        add(OddInput(f"jpeg-cut-{k:02d}of40", cut(base_jpeg, fraction), MESSAGE, "empty|" + truncated_or_unreadable))
    for k in range(30):
        fraction = k / 30
        add(OddInput(f"png-cut-{k:02d}of30", cut(base_png, fraction), MESSAGE, "empty|" + truncated_or_unreadable))
    for fmt, options in (
        ("GIF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("WEBP", {"quality": 80}),
        ("BMP", {}),
        ("TIFF", {"compression": "jpeg"}),
    ):
        label = fmt.lower() + ("-jpeg" if options.get("compression") == "jpeg" else "")
        for k, fraction in enumerate((0.02, 0.2, 0.5, 0.8, 0.97)):
            add(
                OddInput(f"{label}-cut-{k}", cut(functools.partial(_face_in(fmt, **options), Path()), fraction), EITHER)
            )
    # Random byte flips: anywhere, and concentrated in the headers.
    for seed in range(30):
        within = 1.0 if seed < 15 else 0.1
        add(OddInput(f"jpeg-flip-{seed:02d}", flipped(base_jpeg, seed, within), EITHER))
        add(OddInput(f"png-flip-{seed:02d}", flipped(base_png, seed, within), EITHER))

    # Not images at all.
    for name, content in (
        ("zero-bytes", b""),
        ("one-byte", b"\xff"),
        ("jpeg-magic-only", b"\xff\xd8\xff"),
        ("png-magic-only", b"\x89PNG\r\n\x1a\n"),
        ("html", b"<!doctype html><p>photo</p>"),
        ("pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
        ("zip", b"PK\x03\x04" + b"\x00" * 60),
        ("elf", b"\x7fELF" + b"\x02\x01\x01" + b"\x00" * 57),
        ("random-4k", np.random.default_rng(0).bytes(4096)),
    ):
        add(OddInput(name, functools.partial(lambda c, _: c, content), MESSAGE, "empty|" + not_image))
    add(OddInput("text-renamed-jpg", text_named_jpg, MESSAGE, not_image))
    add(OddInput("fifo", fifo, MESSAGE, "not a regular file"))
    add(OddInput("directory", directory, MESSAGE, "not a regular file"))
    add(OddInput("dev-zero", device, MESSAGE, "not a regular file"))
    add(OddInput("missing-path", missing, MESSAGE, "cannot read"))

    # Decompression bombs: declared sizes, and real one-colour images that compress to almost nothing.
    limit = "exceeds the limit"
    add(OddInput("png-declares-30000x30000", lambda _: png_declaring(30000, 30000), MESSAGE, limit, bomb=True))
    add(OddInput("png-declares-8000x8000", lambda _: png_declaring(8000, 8000), MESSAGE, limit, bomb=True))
    add(
        OddInput(
            "png-declares-2^31x1", lambda _: png_declaring(2**31 - 1, 1), MESSAGE, limit + "|" + not_image, bomb=True
        )
    )
    add(OddInput("jpeg-declares-65500x65500", lambda _: jpeg_declaring(65500, 65500), MESSAGE, limit, bomb=True))
    add(OddInput("gif-declares-65535x65535", lambda _: gif_declaring(65535, 65535), MESSAGE, limit, bomb=True))
    add(OddInput("bmp-declares-50000x50000", lambda _: bmp_declaring(50000, 50000), MESSAGE, limit, bomb=True))
    add(OddInput("tiff-declares-100000x100000", lambda _: tiff_declaring(100000, 100000), MESSAGE, limit, bomb=True))
    add(
        OddInput(
            "png-real-20000x20000-1bit", lambda _: streamed_png(20000, 20000, 1, 0, 255), MESSAGE, limit, bomb=True
        )
    )
    add(OddInput("png-real-8000x8000-grey", lambda _: streamed_png(8000, 8000, 8, 0), MESSAGE, limit, bomb=True))
    add(OddInput("png-ztxt-bomb", lambda _: _ztxt_bomb(), EITHER, bomb=True))

    # Sizes.
    add(OddInput("1x1", png_of(lambda: np.full((1, 1, 3), 128, np.uint8)), MESSAGE, "No face"))
    add(OddInput("2x2", png_of(lambda: np.full((2, 2, 3), 128, np.uint8)), MESSAGE, "No face"))
    add(OddInput("19x19", png_of(lambda: synthetic_face(20, 160)[::8, ::8][:19, :19].copy()), MESSAGE, "No face"))
    add(OddInput("1x4096-strip", png_of(lambda: canvas(1, 4096)), MESSAGE, "No face"))
    add(OddInput("4096x1-strip", png_of(lambda: canvas(4096, 1)), MESSAGE, "No face"))
    add(OddInput("30x2000-strip", png_of(lambda: canvas(30, 2000)), MESSAGE, "No face"))
    add(
        OddInput(
            "4400x1200-jpeg-face",
            lambda _: encode(
                Image.fromarray(
                    pasted(
                        np.full((1200, 4400, 3), 140, np.uint8),
                        np.asarray(Image.fromarray(astronaut_face()).resize((800, 800))),
                        200,
                        1800,
                    )
                ),
                "JPEG",
                quality=80,
            ),
            RESULT,
        )
    )

    # Colour modes and formats, each holding a face.
    face2 = Image.fromarray(synthetic_face(2))
    add(OddInput("16-bit-grey-png", lambda _: sixteen_bit_face(), RESULT))
    add(OddInput("16-bit-rgb-png", lambda _: sixteen_bit_rgb_png(), RESULT))
    add(OddInput("cmyk-jpeg", lambda _: encode(face2.convert("CMYK"), "JPEG", quality=90), RESULT))
    add(OddInput("cmyk-tiff", lambda _: encode(face2.convert("CMYK"), "TIFF"), RESULT))
    add(OddInput("palette-png", lambda _: encode(face2.quantize(64), "PNG"), RESULT))
    add(OddInput("palette-png-transparent", lambda _: encode(face2.quantize(64), "PNG", transparency=0), RESULT))
    add(OddInput("la-png", lambda _: encode(face2.convert("LA"), "PNG"), RESULT))
    add(OddInput("rgba-png-half-transparent", lambda _: encode(_half_transparent(face2), "PNG"), RESULT))
    add(OddInput("grey-jpeg", lambda _: encode(face2.convert("L"), "JPEG"), RESULT))
    add(OddInput("bilevel-png", lambda _: encode(face2.convert("1"), "PNG"), EITHER))
    # 8-bit values in a 32-bit integer TIFF are read on the 16-bit scale: a nearly black photo.
    add(OddInput("int32-tiff", lambda _: encode(face2.convert("I"), "TIFF"), EITHER))
    add(OddInput("float-tiff-nan-inf", lambda _: float_face_with_nan(), RESULT))
    add(OddInput("ycbcr-tiff", lambda _: encode(face2.convert("YCbCr"), "TIFF"), RESULT))
    add(OddInput("lab-tiff", lambda _: encode(face2.convert("LAB"), "TIFF"), EITHER))
    add(OddInput("animated-gif", lambda _: animated_gif(), RESULT))
    add(OddInput("apng", lambda _: apng(), RESULT))
    add(OddInput("multipage-tiff", lambda _: multipage_tiff(), RESULT))
    add(OddInput("webp-lossless", _face_in("WEBP", lossless=True), RESULT))
    add(OddInput("webp-rgba", lambda _: encode(_half_transparent(face2), "WEBP"), RESULT))
    add(OddInput("bmp", _face_in("BMP"), RESULT))
    add(OddInput("ppm", _face_in("PPM"), RESULT))
    add(OddInput("tga", _face_in("TGA"), RESULT))
    add(OddInput("ico", _face_in("ICO"), RESULT))
    add(OddInput("jpeg-420-low-quality", _face_in("JPEG", quality=15, subsampling=2), RESULT))
    add(OddInput("png-with-icc-profile", lambda _: encode(face2, "PNG", icc_profile=b"\x00" * 128), RESULT))

    # EXIF: every orientation, and broken orientation data.
    for orientation in range(1, 9):
        add(
            OddInput(
                f"exif-orientation-{orientation}",
                rotated(orientation, "JPEG", astronaut_face),
                RESULT,
                upright=astronaut_face,
            )
        )
        add(
            OddInput(
                f"exif-orientation-{orientation}-png",
                rotated(orientation, "PNG", lambda: synthetic_face(6)),
                RESULT,
                upright=lambda: synthetic_face(6),
            )
        )
    for value in (0, 9, 65535):
        add(
            OddInput(
                f"exif-orientation-value-{value}",
                functools.partial(lambda v, _: jpeg_with_app1(exif_orientation_value(v)), value),
                RESULT,
            )
        )
    add(OddInput("exif-garbage", lambda _: jpeg_with_app1(np.random.default_rng(1).bytes(300)), RESULT))
    add(OddInput("exif-truncated-ifd", lambda _: jpeg_with_app1(exif_orientation_value(6)[:14]), RESULT))
    add(
        OddInput(
            "exif-ifd-loop",
            lambda _: jpeg_with_app1(
                b"II*\x00"
                + struct.pack("<I", 8)
                + struct.pack("<H", 1)
                + struct.pack("<HHII", 0x8769, 4, 1, 8)
                + struct.pack("<I", 8)
            ),
            RESULT,
        )
    )

    # Where the faces are.
    add(OddInput("no-face-grey", png_of(lambda: np.full((200, 200, 3), 128, np.uint8)), MESSAGE, "No face"))
    add(
        OddInput(
            "no-face-noise",
            png_of(lambda: np.random.default_rng(3).integers(0, 256, (200, 200, 3), np.uint8)),
            MESSAGE,
            "No face",
        )
    )
    add(OddInput("no-face-texture", png_of(lambda: canvas(300, 400)), MESSAGE, "No face"))
    add(OddInput("one-synthetic-face", png_of(lambda: synthetic_face(0)), RESULT))
    add(OddInput("one-real-face", png_of(astronaut_face), RESULT))
    for place, (top, left) in {
        "left": (60, -70),
        "right": (60, 250),
        "top": (-70, 100),
        "bottom": (200, 100),
        "corner": (-60, -60),
    }.items():
        add(
            OddInput(
                f"face-at-{place}-border",
                png_of(functools.partial(lambda t, x: pasted(canvas(320, 360), synthetic_face(0), t, x), top, left)),
                EITHER,
            )
        )
    add(
        OddInput(
            "face-filling-the-frame",
            png_of(lambda: np.asarray(Image.fromarray(astronaut_face()[30:170, 40:160]).resize((400, 460)))),
            EITHER,
        )
    )
    add(
        OddInput(
            "tiny-face-in-big-photo",
            png_of(lambda: pasted(canvas(1000, 1000), synthetic_face(0, 60), 470, 470)),
            EITHER,
        )
    )
    for count in (2, 4, 9, 16):  # MTCNN misses a few of the small synthetic faces; it finds at least half
        add(OddInput(f"{count}-faces", png_of(functools.partial(tiled_faces, count)), RESULT, faces=count // 2))
    add(
        OddInput(
            "2-faces-different-sizes",
            png_of(
                lambda: pasted(
                    pasted(canvas(300, 520), synthetic_face(0, 240), 30, 10), synthetic_face(1, 120), 90, 330
                )
            ),
            RESULT,
            faces=2,
        )
    )
    return cases


def _half_transparent(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.full(image.size[::-1], 255, np.uint8)
    alpha[:, : image.size[0] // 3] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _ztxt_bomb() -> bytes:
    """A 16×16 PNG carrying a compressed text chunk that inflates to 64 MB."""
    original = encode(Image.new("RGB", (16, 16), (80, 90, 100)), "PNG")
    compressor = zlib.compressobj(9)
    text = b"".join(compressor.compress(b"\x00" * 2**20) for _ in range(64)) + compressor.flush()
    chunk = png_chunk(b"zTXt", b"Comment\x00\x00" + text)
    return original[:33] + chunk + original[33:]


CORPUS: tuple[OddInput, ...] = tuple(_corpus())
BY_NAME = {case.name: case for case in CORPUS}
assert len(BY_NAME) == len(CORPUS), "corpus names must be unique"
