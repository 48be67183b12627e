"""How often each fold model's out-of-domain guard flags held-out synthetic faces, and real photos.

Held-out: each fold's ``test`` split (and ``val``, which set the threshold), aligned from the dataset's
landmarks as the model was trained. Unseen synthetic: the parser's own synthetic faces (no person shared
with the demo). Real photos (shipped inside installed packages, nothing downloaded): scikit-image's
astronaut and camera man, matplotlib's Grace Hopper, and the 100 face crops of scikit-image's LFW subset
(25×25 grey, enlarged to 160 px), each found and aligned by the detector as ``explain`` does.

    .venv/bin/python bench/domain_guard.py                # the demo (fit-domain its fold models first)
    .venv/bin/python bench/domain_guard.py DATASET --markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import skimage.transform
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import DiskCache
from core.dataset import Photo, names_in, open_dataset
from core.errors import UserFacingError
from core.layout import DatasetLayout, demo_dataset
from core.library_warnings import quiet_library_warnings
from core.pipeline import align_photo, domain_scores
from core.train import aligned_faces
from models.checkpoint import Classifier, load_classifier


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def real_photos() -> dict[str, list[np.ndarray]]:
    hopper = np.asarray(
        Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    )
    lfw = skimage.data.lfw_subset()[:100]  # the first 100 of the 200 are faces, the rest are not
    enlarged = [_rgb(skimage.transform.resize(face, (160, 160), order=3)) for face in lfw]
    return {
        "astronaut (skimage)": [skimage.data.astronaut()],
        "camera man (skimage)": [_rgb(skimage.data.camera())],
        "Grace Hopper (matplotlib)": [hopper],
        "LFW subset faces (skimage, 100)": enlarged,
    }


def aligned_photos(photos: list[np.ndarray], size: int, cache: DiskCache) -> tuple[np.ndarray, int]:
    """The photos' faces aligned as ``explain`` does; and how many photos had no face found."""
    faces, missed = [], 0
    for image in photos:
        try:
            faces.append(align_photo(Photo(image), size, cache)[0].image)
        except UserFacingError:
            missed += 1
    return (np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)), missed


def flagged(classifier: Classifier, faces: np.ndarray, cache: DiskCache) -> tuple[float, float]:
    """Fraction of faces past the threshold, and their median score."""
    if not len(faces):
        return float("nan"), float("nan")
    scores = np.concatenate([domain_scores(classifier, faces[i : i + 128], cache) for i in range(0, len(faces), 128)])
    assert classifier.domain is not None
    return float(classifier.domain.flags(scores).mean()), float(np.median(scores))


def main() -> int:
    quiet_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    dataset = open_dataset(args.dataset or demo_dataset())
    cache = DiskCache()
    rows = []
    unseen_root = DatasetLayout(dataset.root).parser_training_faces
    for card in dataset.layout.classifier_cards():
        classifier = load_classifier(card)
        if classifier.domain is None:
            print(f"{card.name} has no guard: run python -m core fit-domain {card} {dataset.root}", file=sys.stderr)
            continue
        fold, size = classifier.card.fold, classifier.card.input_size
        assert fold is not None
        sets = {f"demo {split} split ({fold})": names_in(dataset, fold, split) for split in ("val", "test")}
        for what, names in sets.items():
            rate, median = flagged(classifier, aligned_faces(dataset, names, size), cache)
            rows.append((card.stem, classifier.domain.threshold, what, len(names), 0, rate, median))
        if unseen_root.is_dir():
            unseen = open_dataset(unseen_root)
            names = unseen.table["image_name"].to_list()
            rate, median = flagged(classifier, aligned_faces(unseen, names, size), cache)
            rows.append(
                (
                    card.stem,
                    classifier.domain.threshold,
                    "unseen synthetic (parser's faces)",
                    len(names),
                    0,
                    rate,
                    median,
                )
            )
        for what, photos in real_photos().items():
            faces, missed = aligned_photos(photos, size, cache)
            rate, median = flagged(classifier, faces, cache)
            rows.append((card.stem, classifier.domain.threshold, what, len(photos), missed, rate, median))
    header = ("model", "threshold", "faces", "n", "no face found", "flagged", "median score")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + " --- |" * len(header))
        for model, threshold, what, n, missed, rate, median in rows:
            print(f"| {model} | {threshold:.1f} | {what} | {n} | {missed} | {rate:.1%} | {median:.1f} |")
    else:
        for row in rows:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
