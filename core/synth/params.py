"""The numbers that fully determine one synthetic photo, and the one distribution they come from.

A photo is three independent draws, each from its own random stream, so that the class can
act on the pixels only through the planted phenotypes:

- ``FaceShape``: the person (feature geometry, colours, hair). One distribution for every
  class; the planted phenotypes then edit it (``core.synth.phenotypes``).
- ``Photo``: the nuisance of one picture (pose, background, lighting, blur, noise, JPEG).
- the planted phenotypes: ``PlantedTerm`` (HPO id, severity in (0, 1]).

Geometry is in canonical units (about a pixel of a 224 px photo), origin midway
between the eye centres, x to the image right, y down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import cast

import numpy as np

RGB = tuple[float, float, float]

# Skin from very light to very dark; a draw interpolates between neighbours.
SKIN_PALETTE = np.array(
    [(243, 216, 197), (228, 186, 160), (205, 152, 117), (170, 118, 84), (126, 84, 58), (86, 56, 40)],
    dtype=float,
)
HAIR_PALETTE = np.array(
    [(22, 19, 18), (48, 33, 25), (88, 58, 38), (135, 96, 60), (196, 160, 104), (140, 66, 34), (150, 148, 142)],
    dtype=float,
)
IRIS_PALETTE = np.array(
    [(62, 38, 24), (98, 62, 34), (118, 96, 52), (84, 112, 78), (82, 118, 160), (112, 124, 132)], dtype=float
)
HAIR_STYLES = ("short", "long", "curly")
BACKGROUND_TEXTURES = ("gradient", "blotches", "stripes")


@dataclass(frozen=True)
class FaceShape:
    """One person's face. Phenotype fields (last group) are 0 unless a term is planted."""

    # eyes (per eye, in its own frame: u lateral, v down)
    eye_half_distance: float
    eye_width: float
    eye_upper: float
    eye_lower: float
    eye_tilt_deg: float
    iris_radius: float
    # brows
    brow_gap: float
    brow_arch: float
    brow_thickness: float
    brow_length: float
    brow_tilt_deg: float
    # nose
    nose_length: float
    bridge_half_width: float
    alar_half_width: float
    tip_radius: float
    # mouth; philtrum_top is fixed by the person so that nose terms never move it
    philtrum_top: float
    mouth_y: float
    mouth_half_width: float
    upper_lip: float
    lower_lip: float
    # head
    face_half_width: float
    jaw_taper: float
    chin_y: float
    crown_y: float
    hairline_y: float
    hair_parting: float
    hair_volume: float
    hair_style: str
    ear_top: float
    ear_bottom: float
    # colours
    skin_rgb: RGB
    lip_rgb: RGB
    hair_rgb: RGB
    iris_rgb: RGB
    clothes_rgb: RGB
    # phenotype dials, 0 = typical
    lid_droop: float = 0.0
    epicanthus: float = 0.0
    lash_length: float = 0.0
    brow_sparse: float = 0.0
    bridge_relief: float = 0.0
    nostril_show: float = 0.0
    tongue: float = 0.0
    open_bite: float = 0.0
    face_narrowing: float = 0.0


@dataclass(frozen=True)
class Photo:
    """Nuisance of one photo; identical distribution in every class."""

    rotation_deg: float
    scale: float
    shift_x: float
    shift_y: float
    background_rgb: RGB
    background_rgb2: RGB
    background_texture: str
    light_angle: float
    light_strength: float
    white_balance: RGB
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int
    texture_seed: int


@dataclass(frozen=True)
class PlantedTerm:
    hpo_id: str
    severity: float


@dataclass(frozen=True)
class FaceParams:
    """Everything ``render_face`` needs; rendering is a pure function of it."""

    shape: FaceShape
    photo: Photo
    phenotypes: tuple[PlantedTerm, ...] = ()
    size: int = 224

    def clean(self) -> FaceParams:
        """The same face without blur and noise: the exact effect of a phenotype is then visible."""
        return replace(self, photo=replace(self.photo, blur_sigma=0.0, noise_sigma=0.0))


def _rgb(values: Iterable[float]) -> RGB:
    """Three channel values as Python floats (typed as the three they are)."""
    return cast(RGB, tuple(float(c) for c in values))


def _palette_colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> RGB:
    position = rng.uniform(0, len(palette) - 1)
    low = int(position)
    high = min(low + 1, len(palette) - 1)
    colour = palette[low] + (position - low) * (palette[high] - palette[low])
    colour = colour * rng.uniform(1 - jitter, 1 + jitter, 3)
    return _rgb(np.clip(colour, 0, 255))


def _pick_colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> RGB:
    colour = palette[rng.integers(len(palette))] * rng.uniform(1 - jitter, 1 + jitter, 3)
    return _rgb(np.clip(colour, 0, 255))


def sample_face_shape(rng: np.random.Generator) -> FaceShape:
    """A random person; the identity jitter every class shares."""

    def normal(mean: float, sd: float) -> float:
        return float(mean + sd * np.clip(rng.standard_normal(), -2.5, 2.5))

    skin = np.array(_palette_colour(rng, SKIN_PALETTE, 0.03))
    lip = np.clip(skin * np.array([0.86, 0.62, 0.62]) + np.array([22, 4, 8]) * rng.uniform(0.6, 1.4), 0, 255)
    nose_length = normal(31.0, 1.5)
    # Head size relative to the features varies a lot between people. It also keeps the face
    # outline from betraying, after 5-point alignment, phenotypes that move landmarks.
    head = normal(1.0, 0.06)
    return FaceShape(
        eye_half_distance=normal(23.0, 1.0),
        eye_width=normal(19.0, 1.0),
        eye_upper=normal(4.8, 0.4),
        eye_lower=normal(3.4, 0.3),
        eye_tilt_deg=normal(2.0, 1.5),
        iris_radius=normal(4.5, 0.25),
        brow_gap=normal(10.0, 1.0),
        brow_arch=normal(2.5, 0.6),
        brow_thickness=normal(3.6, 0.35),
        brow_length=normal(25.0, 1.3),
        brow_tilt_deg=normal(0.0, 2.0),
        nose_length=nose_length,
        bridge_half_width=normal(4.0, 0.4),
        alar_half_width=normal(11.5, 0.7),
        tip_radius=normal(4.6, 0.35),
        philtrum_top=nose_length + 5.0,
        mouth_y=normal(52.0, 1.5),
        mouth_half_width=normal(16.5, 1.0),
        upper_lip=normal(3.8, 0.4),
        lower_lip=normal(4.8, 0.5),
        face_half_width=head * normal(54.0, 1.5),
        jaw_taper=normal(0.24, 0.04),
        chin_y=head * normal(86.0, 2.0),
        crown_y=head * normal(-80.0, 2.5),
        hairline_y=head * normal(-54.0, 4.0),
        hair_parting=float(rng.uniform(-1, 1)),
        hair_volume=float(rng.uniform(3, 12)),
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        ear_top=head * normal(-4.0, 2.0),
        ear_bottom=head * normal(27.0, 2.0),
        skin_rgb=_rgb(skin),
        lip_rgb=_rgb(lip),
        hair_rgb=_pick_colour(rng, HAIR_PALETTE, 0.08),
        iris_rgb=_pick_colour(rng, IRIS_PALETTE, 0.1),
        clothes_rgb=_rgb(rng.uniform(30, 225, 3)),
    )


def sample_photo(rng: np.random.Generator) -> Photo:
    """Random nuisance of one photo."""
    base = rng.uniform(40, 230, 3)
    second = np.clip(base * rng.uniform(0.75, 1.25, 3), 0, 255)
    return Photo(
        rotation_deg=float(rng.uniform(-15, 15)),
        scale=float(rng.uniform(0.9, 1.1)),
        shift_x=float(rng.uniform(-8, 8)),
        shift_y=float(rng.uniform(-8, 8)),
        background_rgb=_rgb(base),
        background_rgb2=_rgb(second),
        background_texture=BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))],
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0, 0.25)),
        white_balance=_rgb(rng.uniform(0.96, 1.04, 3)),
        blur_sigma=float(rng.uniform(0, 1.0)),
        noise_sigma=float(rng.uniform(0, 5.0)),
        jpeg_quality=int(rng.integers(60, 96)),
        texture_seed=int(rng.integers(2**31)),
    )
