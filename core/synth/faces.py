"""Procedural frontal face photos with their exact LaPa label map and 5 landmarks.

``render_face`` is the pure core: the same ``FaceParams`` always give the same pixels.
Each part is drawn from its own fields of ``FaceShape`` only (the nose never reads the eye
positions, the philtrum starts where the person's nose ends, not where a short nose ends),
so a phenotype, which edits one part's fields, changes pixels only in that part's region.
The photo nuisance (pose, background, lighting, blur, noise) comes from ``Photo``; JPEG is
left to whoever writes the file.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image
from scipy import ndimage
from scipy.special import ndtri

from core.synth.canvas import Canvas, band, ellipse
from core.synth.params import FaceParams, FaceShape, Photo
from core.synth.phenotypes import apply_phenotypes

SUPERSAMPLE = 2  # colour is drawn at 2x and averaged down: anti-aliased edges
REFERENCE_SIZE = 224  # photo size the canonical units are laid out for
FACE_SCALE = 1.1  # pixels of a 224 px photo per canonical unit, at pose scale 1
EYES_AT = 0.45  # fraction of the image height where the eye line sits before the shift
HEAD_CENTRE_Y = 8.0  # the face outline is star-shaped around (0, HEAD_CENTRE_Y)
_TEXTURE_REACH = 128  # textures cover canonical x, y in [-128, 128)
_GAUSSIAN_QUANTILES = ndtri((np.arange(256) + 0.5) / 256).astype(np.float32)

# LaPa label indices; "right" is the person's right, i.e. the image-left side.
SKIN, RIGHT_BROW, LEFT_BROW, RIGHT_EYE, LEFT_EYE, NOSE, UPPER_LIP, INNER_MOUTH, LOWER_LIP, HAIR = range(1, 11)


class RenderedFace(NamedTuple):
    image: np.ndarray  # size x size x 3 uint8, before JPEG
    label_map: np.ndarray  # size x size uint8, LaPa indices
    landmarks: np.ndarray  # 5 x 2 float (x, y): image-left eye, image-right eye, nose tip, mouth corners


def pose_matrix(photo: Photo, size: int) -> np.ndarray:
    """2x3 map from canonical units to pixel coordinates of this photo."""
    k = FACE_SCALE * size / REFERENCE_SIZE
    a = np.deg2rad(photo.rotation_deg)
    rotation = photo.scale * k * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    shift = size / REFERENCE_SIZE
    origin = [size / 2 + photo.shift_x * shift, size * EYES_AT + photo.shift_y * shift]
    return np.column_stack([rotation, origin])


def render_face(params: FaceParams) -> RenderedFace:
    """Draw one face photo; the label map and landmarks come from the same geometry."""
    shape = apply_phenotypes(params.shape, params.phenotypes)
    canvas = Canvas(params.size, pose_matrix(params.photo, params.size), SUPERSAMPLE)
    textures = np.random.default_rng([params.photo.texture_seed, 0])
    hair = canvas.per_pixel(_hair_colour(shape, textures))

    canvas.rgb[:] = _background(params.photo, textures, params.size).repeat(SUPERSAMPLE, 0).repeat(SUPERSAMPLE, 1)
    _draw_body(canvas, shape)
    if shape.hair_style == "long":
        canvas.fill(_long_hair_back(shape), hair, HAIR)
    for side in (-1, 1):
        _draw_ear(canvas, shape, side)
    _draw_head(canvas, shape, params.shape)
    canvas.fill(_hair_cap(shape), hair, HAIR)
    eye_centres = [_draw_eye(canvas, shape, side) for side in (-1, 1)]
    for side in (-1, 1):
        _draw_brow(canvas, shape, side)
    nose_tip = _draw_nose(canvas, shape)
    mouth_corners = _draw_mouth(canvas, shape)
    landmarks = canvas.to_pixels(np.array([*eye_centres, nose_tip, *mouth_corners]))
    image = _photograph(canvas.finish(), params.photo)
    return RenderedFace(image, canvas.labels, landmarks)


# ---------------------------------------------------------------- helpers


def _smooth(points: ArrayLike, closed: bool, iterations: int = 3) -> np.ndarray:
    """Chaikin corner cutting: a few control points become a smooth outline."""
    points = np.asarray(points, dtype=float)
    for _ in range(iterations):
        following = np.roll(points, -1, axis=0) if closed else points[1:]
        current = points if closed else points[:-1]
        cut = np.empty((2 * len(current), 2))
        cut[0::2] = 0.75 * current + 0.25 * following
        cut[1::2] = 0.25 * current + 0.75 * following
        points = cut if closed else np.vstack([points[:1], cut, points[-1:]])
    return points


def _smooth_noise(rng: np.random.Generator, grid: tuple[int, int], size: int) -> np.ndarray:
    """size x size low-frequency noise in about [-1, 1]: a small random grid upsampled bicubically."""
    small = Image.fromarray(rng.standard_normal(grid).astype(np.float32), mode="F")
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC)) / 1.5


def _times(colour: tuple[float, float, float], factor) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) * np.asarray(factor, dtype=np.float32), 0, 255)


# ---------------------------------------------------------------- scene


def _background(photo: Photo, rng: np.random.Generator, size: int) -> np.ndarray:
    """At 1x: it is smooth, and the face covers its only sharp edges."""
    y, x = np.ogrid[0:size, 0:size]
    angle = rng.uniform(0, 2 * np.pi)
    along = ((x / size - 0.5) * np.cos(angle) + (y / size - 0.5) * np.sin(angle)).astype(np.float32)
    if photo.background_texture == "gradient":
        mix = np.clip(along + 0.5, 0, 1)
    elif photo.background_texture == "blotches":
        mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, (5, 5), size), 0, 1)
    else:
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * np.float32(rng.uniform(3, 9)) * along)
    first = np.asarray(photo.background_rgb, np.float32)
    second = np.asarray(photo.background_rgb2, np.float32)
    return first + mix[..., None] * (second - first)


def _hair_colour(shape: FaceShape, rng: np.random.Generator):
    """Strands that turn with the head: noise that varies fast across and slowly along the hair."""
    grid = (28, 28) if shape.hair_style == "curly" else (5, 48)
    texels = _TEXTURE_REACH  # one texel per 2 canonical units
    lightness = np.clip(1 + 0.25 * _smooth_noise(rng, grid, texels), 0.4, 1.6)
    colour = np.asarray(shape.hair_rgb, np.float32) * lightness[..., None]

    def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        column = ((x + _TEXTURE_REACH) / 2).clip(0, texels - 1).astype(int)
        row = ((y + _TEXTURE_REACH) / 2).clip(0, texels - 1).astype(int)
        return colour[row, column]

    return field


def _draw_body(canvas: Canvas, shape: FaceShape) -> None:
    a, chin = shape.face_half_width, shape.chin_y
    shoulders = np.array(
        [
            (-0.45 * a, chin + 24),
            (-1.5 * a, chin + 36),
            (-2.3 * a, chin + 62),
            (-2.6 * a, 400),
            (2.6 * a, 400),
            (2.3 * a, chin + 62),
            (1.5 * a, chin + 36),
            (0.45 * a, chin + 24),
        ]
    )
    canvas.fill(_smooth(shoulders, closed=True, iterations=2), shape.clothes_rgb)
    neck = np.array(
        [
            (-0.5 * a, HEAD_CENTRE_Y + 20),
            (-0.5 * a, chin + 26),
            (-0.25 * a, chin + 38),
            (0, chin + 41),
            (0.25 * a, chin + 38),
            (0.5 * a, chin + 26),
            (0.5 * a, HEAD_CENTRE_Y + 20),
        ]
    )
    canvas.fill(neck, _times(shape.skin_rgb, 0.86))
    canvas.shade((0, chin - 4), 0.62 * a, 16, (0.66, 0.64, 0.64))  # the jaw's shadow on the neck


def _head_radius(shape: FaceShape, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Distance from (0, HEAD_CENTRE_Y) to the face outline in direction (cos, sin)."""
    below = np.clip(sin, 0, None)
    narrowing = 0.12 * shape.face_narrowing * np.clip(2 * below, 0, 1)  # cheeks and jaw, not temples
    half_width = shape.face_half_width * (1 - shape.jaw_taper * below**2) * (1 - narrowing)
    half_height = np.where(sin < 0, HEAD_CENTRE_Y - shape.crown_y, shape.chin_y - HEAD_CENTRE_Y)
    power = np.where(sin < 0, 2.6, 2.3)  # a rounder skull above, a rounded jaw below
    return (np.abs(cos / half_width) ** power + np.abs(sin / half_height) ** power) ** (-1 / power)


def _head_outline(shape: FaceShape, angles: np.ndarray, grow: float | np.ndarray = 0.0) -> np.ndarray:
    cos, sin = np.cos(angles), np.sin(angles)
    radius = _head_radius(shape, cos, sin) + grow
    return np.column_stack([radius * cos, HEAD_CENTRE_Y + radius * sin])


def _draw_head(canvas: Canvas, shape: FaceShape, person: FaceShape) -> None:
    """The face outline is ``shape``'s; its shading follows the ``person``'s own outline.

    So an overall phenotype (long or narrow face) repaints only the pixels between the two
    outlines and never the cheek next to the mouth or eyes.
    """
    skin = np.asarray(shape.skin_rgb, np.float32)

    def shaded_skin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # darker towards the outline, within 9 units of it, so the face looks round
        y = y - HEAD_CENTRE_Y
        distance = np.hypot(x, y) + 1e-6
        inside = _head_radius(person, x / distance, y / distance) - distance
        rim = np.clip(1 - inside / 9, 0, 1) ** 2
        return skin * (1 - 0.2 * rim)[..., None]

    canvas.fill(
        _head_outline(shape, np.linspace(0, 2 * np.pi, 120, endpoint=False)), canvas.per_pixel(shaded_skin), SKIN
    )
    for side in (-1, 1):  # cheek highlights, placed by the person's fixed proportions only
        canvas.shade((side * 0.58 * person.face_half_width, 24), 13, 11, 1.03)
    canvas.shade((0, -40), 26, 12, 1.04)


def _draw_ear(canvas: Canvas, shape: FaceShape, side: int) -> None:
    centre = (side * (shape.face_half_width + 1.5), (shape.ear_top + shape.ear_bottom) / 2)
    half_height = (shape.ear_bottom - shape.ear_top) / 2
    canvas.fill(ellipse(centre, 7.0, half_height, side * 10), _times(shape.skin_rgb, 0.94), SKIN)
    rim = ellipse(centre, 5.0, half_height * 0.78, side * 10, 40)[[*range(28, 40), *range(6)]]
    canvas.fill(band(rim, 0.7), _times(shape.skin_rgb, 0.72), opacity=0.7)
    canvas.shade((centre[0] - side * 1.0, centre[1] + 2), 3.5, half_height * 0.45, 0.78)


def _hair_cap(shape: FaceShape) -> np.ndarray:
    """Hair on top of the head down to a hairline that stays well above the brows."""
    a, volume = shape.face_half_width, shape.hair_volume
    angles = np.linspace(np.pi, 2 * np.pi, 48)
    grow = volume + (3.0 * np.abs(np.sin(7 * angles)) if shape.hair_style == "curly" else 0.0)
    outer = _head_outline(shape, angles, grow)  # left side, over the top, to the right side
    side_bottom = shape.ear_bottom + 10 if shape.hair_style == "long" else shape.ear_top + 4  # over the ear tops
    tilt = 4 * shape.hair_parting
    hairline = _smooth(
        [
            (a - 1.5, side_bottom),
            (a - 2.5, -14),
            (a - 5, -22),
            (0.62 * a, shape.hairline_y + 9 - tilt),
            (12 * shape.hair_parting, shape.hairline_y),
            (-0.62 * a, shape.hairline_y + 9 + tilt),
            (-(a - 5), -22),
            (-(a - 2.5), -14),
            (-(a - 1.5), side_bottom),
        ],
        closed=False,
    )
    right_side = [(a + volume * 0.8, HEAD_CENTRE_Y), (a + volume * 0.6, side_bottom)]
    left_side = [(-(a + volume * 0.6), side_bottom), (-(a + volume * 0.8), HEAD_CENTRE_Y)]
    return np.vstack([outer, right_side, hairline, left_side])


def _long_hair_back(shape: FaceShape) -> np.ndarray:
    a, volume = shape.face_half_width, shape.hair_volume
    outer = _head_outline(shape, np.linspace(np.pi, 2 * np.pi, 40), volume + 3)
    bottom = shape.chin_y + 30
    right = [(a + volume + 6, HEAD_CENTRE_Y + 20), (a + volume + 9, bottom), (0.5 * a, bottom + 6)]
    left = [(-0.5 * a, bottom + 6), (-(a + volume + 9), bottom), (-(a + volume + 6), HEAD_CENTRE_Y + 20)]
    return _smooth(np.vstack([outer, right, left]), closed=True, iterations=2)


# ---------------------------------------------------------------- eyes and brows


def _eye_frame(shape: FaceShape, side: int, tilt_deg: float):
    """Map from an eye's own frame (u towards the ear, v down) to canonical units."""
    cx = side * shape.eye_half_distance
    t = np.deg2rad(tilt_deg)

    def to_canonical(u, v) -> np.ndarray:
        u, v = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float))
        return np.column_stack([cx + side * (u * np.cos(t) + v * np.sin(t)), -u * np.sin(t) + v * np.cos(t)]).reshape(
            -1, 2
        )

    return to_canonical


def _draw_eye(canvas: Canvas, shape: FaceShape, side: int) -> np.ndarray:
    frame = _eye_frame(shape, side, shape.eye_tilt_deg)
    skin = shape.skin_rgb
    t = np.linspace(-1, 1, 25)  # -1 at the inner corner
    u = t * shape.eye_width / 2
    open_upper = shape.eye_upper * (1 - t**2) ** 0.7 * (1 - 0.12 * t)
    upper = -open_upper * (1 - 0.75 * shape.lid_droop)
    lower = shape.eye_lower * (1 - t**2) ** 0.8 * (1 + 0.15 * t)
    outline = np.vstack([frame(u, upper), frame(u[::-1], lower[::-1])[1:-1]])
    iris_centre = frame(0.0, 0.3)[0]
    iris = shape.iris_radius

    canvas.shade(tuple(frame(-1.0, -4.0)[0]), 11, 7, (0.9, 0.87, 0.87))  # eye socket
    canvas.fill(band(frame(u[3:-3] * 0.92, -open_upper[3:-3] - 2.6), 0.35), _times(skin, 0.72), opacity=0.6)
    canvas.fill(
        outline, _times((236, 232, 226), np.asarray(skin) / 255 * 0.15 + 0.86), RIGHT_EYE if side < 0 else LEFT_EYE
    )
    canvas.shade(tuple(frame(0.0, upper[len(t) // 2] - 0.5)[0]), shape.eye_width * 0.5, 3.0, 0.8)  # lid shadow
    canvas.fill(ellipse(iris_centre, iris, iris), _times(shape.iris_rgb, 0.5), clip=outline)
    canvas.fill(ellipse(iris_centre, 0.85 * iris, 0.85 * iris), shape.iris_rgb, clip=outline)
    canvas.fill(ellipse(iris_centre, 0.42 * iris, 0.42 * iris, 0, 24), (14, 12, 12), clip=outline)
    glint = (iris_centre[0] - 0.35 * iris, iris_centre[1] - 0.4 * iris)
    canvas.fill(ellipse(glint, 0.24 * iris, 0.24 * iris, 0, 12), (250, 250, 248), opacity=0.85, clip=outline)
    lash = _times(shape.hair_rgb, 0.3) * 0.5 + 12
    canvas.fill(band(frame(u, upper), 0.45 + 0.4 * (t + 1) / 2), lash)
    canvas.fill(band(frame(u[2:-2], lower[2:-2]), 0.3), _times(skin, 0.7), opacity=0.6)
    if shape.lash_length > 0:
        _draw_long_lashes(canvas, frame, u, upper, shape.lash_length, lash)
    if shape.epicanthus > 0:
        _draw_epicanthus(canvas, frame, shape, u, upper, lower)
    return iris_centre


def _draw_long_lashes(canvas: Canvas, frame, u: np.ndarray, upper: np.ndarray, length: float, colour) -> None:
    for k in range(6, 25, 3):  # along the upper lid, longer and leaning out towards the ear
        base = np.array([u[k], upper[k]])
        reach = (2.0 + 3.5 * length) * (0.7 + 0.3 * k / 24)
        lean = -0.2 + 1.1 * k / 24
        tip = base + reach * np.array([np.sin(lean), -np.cos(lean)])
        bend = base + 0.5 * (tip - base) + np.array([-0.15 * reach, -0.1 * reach])
        canvas.fill(band(frame(*np.array([base, bend, tip]).T), np.array([0.45, 0.3, 0.08])), colour)


def _draw_epicanthus(canvas: Canvas, frame, shape: FaceShape, u, upper, lower) -> None:
    """A skin fold over the inner corner: it hides the inner end of the eye."""
    e = shape.epicanthus
    inner = u[0]
    top = np.array([inner + 1.5 + 4.0 * e, np.interp(inner + 1.5 + 4.0 * e, u, upper) - 0.5])
    bottom = np.array([inner + 0.8 + 2.2 * e, np.interp(inner + 0.8 + 2.2 * e, u, lower)])
    control = np.array([inner + 2.0 + 3.5 * e, 0.6])
    s = np.linspace(0, 1, 12)[:, None]
    fold = (1 - s) ** 2 * top + 2 * s * (1 - s) * control + s**2 * bottom
    cover = np.vstack([fold, [(inner - 2.0, 0.4), (inner - 1.5, -2.5)]])
    canvas.fill(frame(*cover.T), _times(shape.skin_rgb, 0.95), SKIN)
    canvas.fill(band(frame(*fold.T), 0.4), _times(shape.skin_rgb, 0.62), opacity=0.8)


def _draw_brow(canvas: Canvas, shape: FaceShape, side: int) -> None:
    frame = _eye_frame(shape, side, shape.brow_tilt_deg)
    t = np.linspace(0, 1, 24)
    sparse = shape.brow_sparse
    u = -shape.eye_width / 2 - 2.5 + t * shape.brow_length * (1 - 0.3 * sparse)
    v = -shape.brow_gap - shape.brow_arch * np.sin(np.pi * t**1.357)  # peak 60% of the way out
    fade = np.clip((t - 0.35) / 0.5, 0, 1)
    half = shape.brow_thickness / 2 * (1.15 - 0.55 * t) * np.clip(8 * t, 0.4, 1) * (1 - 0.85 * sparse * fade)
    colour = (np.asarray(shape.hair_rgb) * 0.7 + np.array([45, 35, 30]) * 0.3) * 0.85
    canvas.fill(band(frame(u, v), half), colour, RIGHT_BROW if side < 0 else LEFT_BROW, opacity=0.92)


# ---------------------------------------------------------------- nose and mouth


def _draw_nose(canvas: Canvas, shape: FaceShape) -> np.ndarray:
    """Frontal noses are shading: ridge light, side shadows, tip, alae and nostrils."""
    top = -3.0 - 2.0 * shape.bridge_relief
    tip, bw, aw, tr = shape.nose_length, shape.bridge_half_width, shape.alar_half_width, shape.tip_radius
    length, relief, show = tip - top, shape.bridge_relief, shape.nostril_show
    right = np.array(
        [
            (0.85 * bw, top),
            (bw, top + 0.35 * length),
            (1.2 * bw, tip - 9),
            (0.8 * aw, tip - 4),
            (aw + 0.8, tip + 0.5),
            (aw + 0.4, tip + 2.5),
            (0.6 * aw, tip + 4.5),
            (0.6 * tr, tip + 0.8 * tr + 0.8),
        ]
    )
    left = right[::-1] * [-1, 1]
    canvas.label(_smooth(np.vstack([right, [(0, tip + 0.8 * tr + 1.0)], left]), closed=True, iterations=2), NOSE)

    for side in (-1, 1):
        canvas.shade(
            (side * (bw + 1.0), top + 0.5 * length),
            1.2 + 0.15 * bw,
            0.5 * length + 1,
            1 - (0.1 + 0.14 * relief) * np.array([1.0, 1.08, 1.1]),
        )
    canvas.shade((0, top + 0.45 * length), 0.55 * bw, 0.42 * length, 1.05 + 0.16 * relief)
    canvas.shade((0, tip - 0.25 * tr), 0.85 * tr, 0.8 * tr, 1.14)
    arc = np.deg2rad(np.linspace(20, 160, 14))
    canvas.fill(
        band(np.column_stack([tr * np.cos(arc), tip + 0.2 + tr * np.sin(arc)]), 0.5),
        _times(shape.skin_rgb, 0.72),
        opacity=0.55,
    )
    nostril = _times(shape.skin_rgb, 0.25) + np.array([10, 4, 4])
    for side in (-1, 1):
        canvas.shade((side * (aw - 2.5), tip + 0.5), 3.2, 3.4, 0.88)
        crease = np.deg2rad(np.linspace(-100, 80, 14))
        ala = np.column_stack([side * (aw - 3 + 3.2 * np.cos(crease)), tip + 0.5 + 3.2 * np.sin(crease)])
        canvas.fill(band(ala, 0.45), _times(shape.skin_rgb, 0.65), opacity=0.55)
        canvas.fill(
            ellipse((side * 0.42 * aw, tip + 2.8 - 0.6 * show), 2.1 + 0.9 * show, 1.0 + 1.1 * show, side * 18, 20),
            nostril,
        )
    canvas.shade((0, tip + 5.8), 0.7 * aw, 2.2, 0.9)
    return np.array([0.0, tip])


def _draw_mouth(canvas: Canvas, shape: FaceShape) -> np.ndarray:
    half, line_y = shape.mouth_half_width, shape.mouth_y
    gap = max(
        2.5 + 3.0 * shape.open_bite if shape.open_bite > 0 else 0.0,
        2.5 + 2.0 * shape.tongue if shape.tongue > 0 else 0.0,
    )
    t = np.linspace(-1, 1, 31)
    x = half * t
    opening = gap * (1 - t**2) ** 0.9
    bow = (1 - t**2) ** 0.55 * (
        1 - 0.22 * np.exp(-((t / 0.12) ** 2)) + 0.1 * np.exp(-(((np.abs(t) - 0.3) / 0.12) ** 2))
    )
    upper_line, lower_line = line_y - 0.1 * opening, line_y + 0.9 * opening  # the jaw opens, the upper lip stays
    upper_top = upper_line - shape.upper_lip * bow
    lower_bottom = lower_line + shape.lower_lip * (1 - t**2) ** 0.65
    lip = np.asarray(shape.lip_rgb)
    centre = len(t) // 2  # t == 0

    # philtrum: drawn on the half of the nose-lip gap next to the lip, i.e. in the mouth region
    lip_top = upper_top[centre]
    length = 0.5 * (lip_top - shape.philtrum_top)
    mid, reach = lip_top - length / 2, length / 2 + 0.5
    canvas.shade((0, mid), 2.0, reach, 0.94)
    for side in (-1, 1):
        canvas.shade((side * 2.6, mid), 0.9, reach, 1.05, angle_deg=-side * 4)
    canvas.shade((0, lower_bottom[centre] + 2.2), 0.55 * half, 2.4, 0.86)
    canvas.fill(np.vstack([np.column_stack([x, lower_line]), np.column_stack([x, lower_bottom])[::-1]]), lip, LOWER_LIP)
    canvas.shade((0, lower_line[centre] + 0.45 * shape.lower_lip), 0.45 * half, 0.35 * shape.lower_lip + 0.5, 1.12)
    if gap > 0:
        inside = np.vstack([np.column_stack([x, upper_line]), np.column_stack([x, lower_line])[::-1]])
        canvas.fill(inside, (70, 24, 28), INNER_MOUTH)
        if shape.open_bite > 0:
            teeth = np.abs(t) < 0.6
            for edge, depth in ((upper_line, 0.25), (lower_line, -0.2)):
                tooth_edge = edge[teeth] + depth * opening[teeth]
                row = np.vstack(
                    [np.column_stack([x[teeth], edge[teeth]]), np.column_stack([x[teeth], tooth_edge])[::-1]]
                )
                canvas.fill(row, (226, 220, 204), clip=inside)
        if shape.tongue > 0:
            tongue_y = lower_line[centre] + 1.0 + 2.5 * shape.tongue
            height = 2.5 + 2.2 * shape.tongue
            tongue_colour = np.clip(lip * [1.1, 0.95, 1.0] + [20, 10, 10], 0, 255)
            canvas.fill(ellipse((0.0, tongue_y), 0.42 * half + 1, height), tongue_colour, INNER_MOUTH)
            canvas.shade((0, tongue_y - 0.3 * height), 0.8, 0.6 * height, 0.85)  # its middle groove
    else:
        canvas.fill(band(np.column_stack([x, upper_line]), 0.45), lip * 0.45, INNER_MOUTH)
    canvas.fill(
        np.vstack([np.column_stack([x, upper_top]), np.column_stack([x, upper_line])[::-1]]), lip * 0.88, UPPER_LIP
    )
    for side in (-1, 1):
        canvas.shade((side * half, line_y), 2.2, 1.8, 0.82)
    return np.array([(-half, line_y), (half, line_y)])


# ---------------------------------------------------------------- the camera


def _photograph(image: np.ndarray, photo: Photo) -> np.ndarray:
    """Lighting gradient and white balance, then lens blur and sensor noise; uint8 out."""
    size = image.shape[0]
    y, x = np.ogrid[0:size, 0:size]
    x, y = (x / size - 0.5).astype(np.float32), (y / size - 0.5).astype(np.float32)
    light = 1 + 2 * photo.light_strength * (x * np.cos(photo.light_angle) + y * np.sin(photo.light_angle))
    image = image * (light[..., None] * np.asarray(photo.white_balance, np.float32))
    if photo.blur_sigma > 0:
        sigma = photo.blur_sigma * size / REFERENCE_SIZE
        image = ndimage.gaussian_filter(image, (sigma, sigma, 0), truncate=3.0)
    if photo.noise_sigma > 0:  # Gaussian through a 256-entry quantile table: 4x cheaper than normal()
        codes = np.random.default_rng([photo.texture_seed, 1]).integers(0, 256, image.shape, dtype=np.uint8)
        image += (photo.noise_sigma * _GAUSSIAN_QUANTILES)[codes]
    return (image + 0.5).clip(0, 255).astype(np.uint8)
