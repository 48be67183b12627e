"""Contact sheet of the real-face parser on public photos and rendered faces (issue 14), in docs/.

One row per photo, each prepared as ``explain`` prepares an upload (``core.pipeline.prepare_face`` on the
bare photo: MTCNN finds the face, dlib's 68 points parse it and check the alignment). Columns:

1. the photo around the face, with MTCNN's five points (cyan rings), dlib's 68 points (yellow dots) and
   the five points derived from them (magenta crosses); grey where the crop runs past the photo;
2. the parts (LaPa label map) drawn from dlib's 68 points, on the aligned face;
3. the paper's region masks (eye, nose, mouth) cut from those parts.

Under each row: the alignment check's disagreement in inter-ocular distances (IOD), whether dlib's own
detector found the face, and the warning when there is one.

Photos: only images that ship inside installed packages (nothing downloaded; sources and licences in
docs/README.md) and faces rendered by ``core.synth``. No patient data.

    .venv/bin/python bench/contact_sheet.py [OUT] [--lfw]   # default docs/real_faces_contact_sheet.jpg

``--lfw`` also prints the alignment check's numbers on the 100 faces of scikit-image's LFW subset.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import skimage.transform
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.dataset import Photo
from core.errors import UserFacingError
from core.landmark_parts import five_points
from core.library_warnings import quiet_library_warnings
from core.pipeline import ExplainSettings, found_landmarks68, prepare_face
from core.synth.dataset import plan_images
from core.synth.faces import render_face
from dashboard.render import parts_rgb, regions_rgb

PANEL = 240  # pixels per panel
ALIGNED = 224  # the aligned face's side (the paper's input size)
CUT_AT = 215  # the astronaut's columns left of this are dropped: the cut runs through the image-left eye
FONT_SIZE = 13
MTCNN_COLOUR, DLIB_COLOUR, DLIB_FIVE_COLOUR = (0, 229, 255), (255, 230, 0), (255, 0, 200)


def photos() -> list[tuple[str, np.ndarray]]:
    """(caption, RGB uint8 photo): the bundled real portraits, the astronaut cut through one eye, and two
    rendered synthetic faces (two classes, as the demo's generator draws them; at this seed MTCNN finds no
    face in its Angelman and WS faces at 256 px, so those two are not shown)."""
    astronaut = skimage.data.astronaut()
    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    camera = np.repeat(skimage.data.camera()[..., None], 3, axis=2)
    rendered = {image.label: image for image in plan_images(1, seed=3, size=256, photos_per_person=1)}
    chosen = [rendered["Unaffected"], rendered["Down"]]
    return [
        ("astronaut (scikit-image)", astronaut),
        ("astronaut cut through one eye", np.ascontiguousarray(astronaut[:, CUT_AT:])),
        ("Grace Hopper (matplotlib)", np.asarray(hopper)),
        ("camera man (scikit-image)", camera),
        *[(f"rendered face ({image.label}, core.synth)", render_face(image.params).image) for image in chosen],
    ]


def face_crop(image: np.ndarray, points: np.ndarray) -> tuple[Image.Image, float, np.ndarray]:
    """A square crop around ``points`` (grey past the photo's edge), scaled to PANEL; and the scale and
    top-left corner that map photo pixels into it."""
    low, high = points.min(axis=0), points.max(axis=0)
    centre, side = (low + high) / 2, 1.5 * float((high - low).max())
    corner = centre - side / 2
    box = tuple(int(round(v)) for v in (*corner, *(corner + side)))
    canvas = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (128, 128, 128))
    canvas.paste(Image.fromarray(image), (-box[0], -box[1]))
    scale = PANEL / canvas.width
    return canvas.resize((PANEL, PANEL), Image.Resampling.LANCZOS), scale, np.array(box[:2], dtype=float)


def landmark_panel(image: np.ndarray, mtcnn: np.ndarray, dense: np.ndarray) -> Image.Image:
    derived = five_points(dense)
    panel, scale, corner = face_crop(image, np.vstack([mtcnn, dense]))
    draw = ImageDraw.Draw(panel)
    for x, y in (dense - corner) * scale:
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=DLIB_COLOUR)
    for x, y in (mtcnn - corner) * scale:
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=MTCNN_COLOUR, width=2)
    for x, y in (derived - corner) * scale:
        draw.line((x - 4, y - 4, x + 4, y + 4), fill=DLIB_FIVE_COLOUR, width=2)
        draw.line((x - 4, y + 4, x + 4, y - 4), fill=DLIB_FIVE_COLOUR, width=2)
    return panel


def caption(name: str, check) -> str:
    if check is None or check.disagreement_iod is None:
        return f"{name}: no alignment check (dlib not installed)"
    found = "dlib found the face" if check.dlib_detected else "dlib found no face (68 points from MTCNN's box)"
    text = f"{name}: MTCNN vs dlib {check.disagreement_iod:.2f} IOD; {found}"
    return text + (f". WARNING: {check.warning}" if check.warning else "; no warning")


def contact_sheet() -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height, legend, header = FONT_SIZE + 3, 2 * (FONT_SIZE + 4) + 8, FONT_SIZE + 10
    width = int(3 * PANEL / (FONT_SIZE * 0.55))  # characters a caption line holds
    settings = ExplainSettings()
    rows = []
    for name, image in photos():
        face = prepare_face(Photo(image), ALIGNED, settings)
        dense = found_landmarks68(image, face.landmarks).points
        panels = [
            landmark_panel(image, face.landmarks, dense),
            *(
                Image.fromarray(panel).resize((PANEL, PANEL), Image.Resampling.LANCZOS)
                for panel in (parts_rgb(face.aligned, face.label_map), regions_rgb(face.aligned, face.masks))
            ),
        ]
        warned = face.alignment_check is not None and face.alignment_check.warning is not None
        rows.append((panels, textwrap.wrap(caption(name, face.alignment_check), width), warned))
        print(f"{name}: source {face.parse_source}, {face.alignment_check}", file=sys.stderr)
    heights = [PANEL + len(lines) * line_height + 10 for _, lines, _ in rows]
    sheet = Image.new("RGB", (3 * PANEL, legend + header + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(
        (
            "MTCNN's 5 points (cyan rings), dlib's 68 (yellow dots), the 5 from dlib's 68 (magenta crosses)",
            "IOD: inter-ocular distances; the check warns past 0.2 or when the face is cut by the border",
        )
    ):
        draw.text((6, 4 + k * (FONT_SIZE + 4)), text, fill="black", font=font)
    for column, title in enumerate(("photo, both detectors' points", "parts from dlib's 68 points", "paper's regions")):
        draw.text((column * PANEL + PANEL // 2, legend + header // 2), title, fill="black", font=font, anchor="mm")
    top = legend + header
    for (panels, lines, warned), height in zip(rows, heights, strict=True):
        for column, panel in enumerate(panels):
            sheet.paste(panel, (column * PANEL, top))
        for k, line in enumerate(lines):
            draw.text((6, top + PANEL + 4 + k * line_height), line, fill="firebrick" if warned else "black", font=font)
        top += height
    return sheet


def lfw_disagreement() -> str:
    """The alignment check on the 100 faces of scikit-image's LFW subset (25×25 grey crops, enlarged to 160 px
    as bench/domain_guard.py enlarges them), each prepared as an upload."""
    faces = [
        np.repeat((skimage.transform.resize(face, (160, 160), order=3) * 255).round().astype(np.uint8)[..., None], 3, 2)
        for face in skimage.data.lfw_subset()[:100]
    ]
    checks, missed = [], 0
    for image in faces:
        try:
            checks.append(prepare_face(Photo(image), ALIGNED, ExplainSettings()).alignment_check)
        except UserFacingError:
            missed += 1
    gaps = np.array([c.disagreement_iod for c in checks if c is not None and c.disagreement_iod is not None])
    return (
        f"LFW subset (100 faces, 160 px): no face found {missed}; dlib's detector found "
        f"{sum(bool(c and c.dlib_detected) for c in checks)}; disagreement median {np.median(gaps):.2f} IOD, "
        f"90th percentile {np.percentile(gaps, 90):.2f}, max {gaps.max():.2f}; past 0.2: {int((gaps > 0.2).sum())}; "
        f"cut by the border: {sum(bool(c and c.cut_by_border) for c in checks)}; warned: "
        f"{sum(bool(c and c.warning) for c in checks)}"
    )


if __name__ == "__main__":
    quiet_library_warnings()
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("out", nargs="?", type=Path, default=Path("docs/real_faces_contact_sheet.jpg"))
    arguments.add_argument("--lfw", action="store_true", help="also print the check on the LFW subset's 100 faces")
    args = arguments.parse_args()
    contact_sheet().save(args.out, quality=88)
    print(f"written to {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    if args.lfw:
        print(lfw_disagreement())
