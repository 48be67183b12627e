"""Shortcut test of the synthetic data: with eyes, nose and mouth blanked, can a model still tell the classes?

It should not: every class difference was planted inside those regions. On Unaffected and the
single-region classes (eye-only, nose-only, mouth-only), a classifier trained and tested on faces
whose paper regions (from the true label maps) are filled with the face's mean colour must score
near chance. Prints its test accuracy with a 95% Clopper–Pearson interval beside chance.

    .venv/bin/python bench/shortcut_test.py            # the demo dataset, fold-1, demo preset
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.dataset import Dataset, open_dataset
from core.demo import DemoPreset
from core.layout import demo_dataset
from core.regions import PAPER_REGIONS, region_masks
from core.train import train_fold
from core.train_parser import aligned_faces_and_maps


def blanked_faces(dataset: Dataset, names: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Faces with one fixed mask blanked: the union over all faces of their eye, nose and mouth regions.

    A per-face mask would itself leak the phenotype through its shape (a wide mouth makes a wide
    mouth box); one mask for every face, in the aligned frame, leaks nothing.
    """
    faces, maps = aligned_faces_and_maps(dataset, names, size)
    union = np.asarray(region_masks(maps, PAPER_REGIONS).masks.any(axis=(0, 1)))  # H×W
    mean_colour = faces.reshape(len(faces), -1, 3).mean(axis=1).astype(np.uint8)
    return np.where(union[None, ..., None], mean_colour[:, None, None, :], faces), union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, default=demo_dataset())
    parser.add_argument("--fold", default="fold-1")
    parser.add_argument("--classes", default="Unaffected,KS,22q11DS,Angelman")
    args = parser.parse_args()

    full = open_dataset(args.dataset)
    classes = args.classes.split(",")
    dataset = Dataset(root=full.root, table=full.table.filter(pl.col("label").is_in(classes)))
    preset = DemoPreset()
    encoder = full.layout.parser_encoder
    config = dataclasses.replace(preset.classifier, init=str(encoder) if encoder.is_file() else None)
    names = dataset.table["image_name"].to_list()
    faces, blanked = blanked_faces(dataset, names, config.input_size)
    position = {n: i for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as out:
        result = train_fold(
            dataset,
            args.fold,
            config,
            Path(out),
            lambda ns: faces[[position[n] for n in ns]],
            log=lambda line: print(line, file=sys.stderr),
        )
    n_test = int((dataset.table[args.fold] == "test").sum())
    assert result.test_accuracy is not None, "the fold has no test images"
    hits = round(result.test_accuracy * n_test)
    interval = stats.binomtest(hits, n_test).proportion_ci()
    print(f"classes: {', '.join(classes)} (chance {1 / len(classes):.3f})")
    print(f"blanked: {blanked.mean():.0%} of the aligned frame (the union of every face's eyes, nose and mouth)")
    print(
        f"eyes, nose and mouth blanked: test accuracy {result.test_accuracy:.3f} "
        f"[{interval.low:.3f}, {interval.high:.3f}] on {n_test} faces; validation {result.val_accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
