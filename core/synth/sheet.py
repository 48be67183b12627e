"""A contact sheet of the synthetic classes: one row per class, planted terms under each face.

``python -m core.synth.sheet docs/synthetic_faces.jpg`` regenerates the picture in docs/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from core.synth.classes import DEFAULT_CLASSES, SyndromeClass
from core.synth.dataset import plan_images
from core.synth.faces import render_face
from core.synth.phenotypes import drawable_phenotypes


def contact_sheet(
    seed: int = 0, per_row: int = 6, size: int = 224, classes: tuple[SyndromeClass, ...] = DEFAULT_CLASSES
) -> Image.Image:
    """Faces of ``per_row`` different persons per class, as the dataset generator draws them."""
    font_size, title_size = max(10, size // 18), max(12, size // 10)
    font = ImageFont.load_default(size=font_size)
    title_font = ImageFont.load_default(size=title_size)
    caption_height, label_width = 5 * (font_size + 2) + 6, int(size * 0.75)
    row_height = size + caption_height
    sheet = Image.new("RGB", (label_width + per_row * size, len(classes) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    terms = drawable_phenotypes()
    images = plan_images(per_row, seed, size, classes, photos_per_person=1)
    for row, syndrome in enumerate(classes):
        top = row * row_height
        draw.text((8, top + size // 2), syndrome.label, fill="black", font=title_font, anchor="lm")
        regions = "+".join(syndrome.regions) or "no term"
        draw.text((8, top + size // 2 + title_size), regions, fill="dimgray", font=font, anchor="lm")
        for column, image in enumerate(i for i in images if i.label == syndrome.label):
            left = label_width + column * size
            sheet.paste(Image.fromarray(render_face(image.params).image), (left, top))
            for line, term in enumerate(image.params.phenotypes):
                caption = f"{terms[term.hpo_id].term.name} {term.severity:.2f}"
                draw.text((left + 4, top + size + 3 + line * (font_size + 2)), caption, fill="black", font=font)
    return sheet


if __name__ == "__main__":
    # JPEG: the photo noise makes a PNG of the sheet 3.4 MB; quality 88 keeps it legible at a tenth.
    contact_sheet().save(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/synthetic_faces.jpg"), quality=88)
