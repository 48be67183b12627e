"""Extraction throughput against the released code's own per-image path, side by side in one run.

The same work both ways: every photo of a synthetic dataset (NIH-Faces layout: photos, LaPa label
maps, five landmarks) through one classifier and the same methods. "released path" is the authors'
``evaluate_xai_maps`` transcribed in ``bench/released_path.py`` (for every method, for every photo,
batch 1: read and align photo and label map with a bilinear warp, classify, connected components,
the eye/nose/mouth boxes with their per-pixel overlap loop, attribute, Σ|a|, one pandas row; OpenCV
replaced by skimage, see that file). "extract" is ``extract_scores`` with its batches (no cache, no
store), then with the relevance store written too, then a rerun answered from the cache. Last, the
ceiling: what batching gains inside each attribution method alone (``core.attribute.attribute`` on
the same aligned faces, batch 1 against the extraction's batch size).

    .venv/bin/python bench/extract_speed.py          # ResNet-18 at 224 px, random weights: a few minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import released_path
from bench_setup import CLASSES, random_classifier_card, synthetic_photos

from cache import DiskCache
from core.attribute import attribute
from core.dataset import open_dataset
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.library_warnings import quiet_library_warnings
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.train import aligned_faces
from models.checkpoint import preprocess, save_checkpoint
from models.resnet import build_resnet

MEAN_BGR = np.array([91.4953, 103.8827, 131.0912])  # the released code's VGGFace2 mean (its dataset's comment)


def released(dataset, classifier, names, methods) -> None:
    """The released path: method by method, photo by photo."""
    rows = [row for row in dataset.table.to_dicts() if row["image_name"] in set(names)]
    for method in methods:
        released_path.evaluate_xai_maps(
            classifier.network, dataset.root, rows, method, list(classifier.card.classes), MEAN_BGR
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=8, help="images per class (7 synthetic classes)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224, help="the released path works at 224 px only")
    parser.add_argument("--methods", default="Gradient,GuidedBackprop,LayerGradCam")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    quiet_library_warnings()
    methods = args.methods.split(",")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        synthetic_photos(root, args.per_class)
        dataset = open_dataset(root)
        card = random_classifier_card(args.arch, args.size)
        network = build_resnet(args.arch, len(CLASSES)).eval()
        classifiers = load_classifiers([save_checkpoint(network, card, root / "models", "classifier-fold-1")])
        classifier = classifiers["classifier-fold-1"]
        names = dataset.table["image_name"].to_list()
        n = len(names)
        print(
            f"{n} photos of 224², {args.arch} at {args.size} px (random weights), methods {', '.join(methods)}, "
            f"batch size {args.batch_size}\n"
        )

        # Warm both paths (library imports, first-call allocations) on two photos.
        released(dataset, classifier, names[:2], methods)
        extract_scores(
            ExtractionPlan(dataset, classifiers, "all"), ExplainSettings(methods=methods, batch_size=args.batch_size)
        )

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        loop = timed(lambda: released(dataset, classifier, names, methods))
        batched = timed(
            lambda: extract_scores(
                ExtractionPlan(dataset, classifiers, "all"),
                ExplainSettings(methods=methods, batch_size=args.batch_size),
            )
        )
        cache = DiskCache(Path(folder) / "cache")
        stored = timed(
            lambda: extract_scores(
                ExtractionPlan(dataset, classifiers, "all"),
                ExplainSettings(methods=methods, batch_size=args.batch_size),
                cache=cache,
                store=RelevanceStore(Path(folder) / "store"),
            )
        )
        rerun = timed(
            lambda: extract_scores(
                ExtractionPlan(dataset, classifiers, "all"),
                ExplainSettings(methods=methods, batch_size=args.batch_size),
                cache=cache,
                store=RelevanceStore(Path(folder) / "store"),
            )
        )
        rows = [
            ("released path (batch 1)", loop),
            ("extract (no cache, no store)", batched),
            ("extract + cache + relevance store", stored),
            ("extract rerun (all from the cache)", rerun),
        ]
        print(f"{'way':<36} {'seconds':>8} {'images/s':>9} {'× released':>11}")
        for label, seconds in rows:
            print(f"{label:<36} {seconds:>8.1f} {n / seconds:>9.1f} {loop / seconds:>10.1f}×")
        print(f"\nratio extract / released path: {loop / batched:.1f}× (target ≥ 3×)")

        faces = preprocess(aligned_faces(dataset, names, args.size), classifier.card)
        print(f"\nceiling, the attribution alone: ms per image at batch 1 and at batch {args.batch_size}")
        one_total = batch_total = 0.0
        for method in methods:
            one = timed(lambda: [attribute(classifier.network, faces[i : i + 1], [0], method) for i in range(n)]) / n
            many = (
                timed(
                    lambda: [
                        attribute(
                            classifier.network,
                            faces[i : i + args.batch_size],
                            [0] * len(faces[i : i + args.batch_size]),
                            method,
                        )
                        for i in range(0, n, args.batch_size)
                    ]
                )
                / n
            )
            one_total, batch_total = one_total + one, batch_total + many
            print(f"{method:<22} {one * 1e3:>7.1f} {many * 1e3:>7.1f}  {one / many:>4.1f}×")
        print(
            f"{'all methods':<22} {one_total * 1e3:>7.1f} {batch_total * 1e3:>7.1f}  {one_total / batch_total:>4.1f}×"
        )


if __name__ == "__main__":
    main()
