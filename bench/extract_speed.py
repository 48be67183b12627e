"""Extraction throughput against explaining one photo at a time, measured side by side in one run.

The same work both ways: every image of a synthetic dataset through one classifier and a few
cheap methods. "one at a time" is ``core.explain.explain`` per photo (no cache), as a script around
the single-image API would do; "extract" is ``extract_scores`` with its batches (no cache, no
store), then with the relevance store written too, then a rerun answered from the cache. Last, the
ceiling: what batching gains inside each attribution method alone (``core.attribute.attribute`` on
the same aligned faces, batch 1 against the extraction's batch size).

    .venv/bin/python bench/extract_speed.py          # ResNet-18 at 112 px, random weights: a few minutes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import DiskCache
from core.attribute import attribute
from core.dataset import open_dataset, read_photo
from core.explain import explain
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.library_warnings import quiet_library_warnings
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.synth.classes import DEFAULT_CLASSES
from core.synth.dataset import SyntheticSpec, generate_dataset
from core.train import aligned_faces
from models.checkpoint import ModelCard, preprocess, save_checkpoint
from models.resnet import build_resnet


def one_at_a_time(dataset, classifier, names, methods) -> None:
    for name in names:
        photo = read_photo(dataset, name)
        explain(photo, classifier, ExplainSettings(methods=methods))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=8, help="images per class (7 synthetic classes)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--methods", default="Gradient,GuidedBackprop,LayerGradCam")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    quiet_library_warnings()
    methods = args.methods.split(",")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        generate_dataset(
            root, SyntheticSpec(n_per_class=args.per_class, seed=0, size=224, photos_per_person=1), workers=1
        )
        dataset = open_dataset(root)
        classes = tuple(c.label for c in DEFAULT_CLASSES)
        card = ModelCard(
            kind="classifier",
            architecture=args.arch,
            classes=classes,
            input_size=args.size,
            channel_order="RGB",
            input_scale=1.0,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            weights="w",
            fold="fold-1",
        )
        network = build_resnet(args.arch, len(classes)).eval()
        classifiers = load_classifiers([save_checkpoint(network, card, root / "models", "classifier-fold-1")])
        classifier = classifiers["classifier-fold-1"]
        names = dataset.table["image_name"].to_list()
        n = len(names)
        print(
            f"{n} photos of 224², {args.arch} at {args.size} px (random weights), methods {', '.join(methods)}, "
            f"batch size {args.batch_size}\n"
        )

        # Warm both paths (library imports, first-call allocations) on two photos.
        one_at_a_time(dataset, classifier, names[:2], methods)
        extract_scores(
            ExtractionPlan(dataset, classifiers, "all"), ExplainSettings(methods=methods, batch_size=args.batch_size)
        )

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        loop = timed(lambda: one_at_a_time(dataset, classifier, names, methods))
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
            ("explain, one photo at a time", loop),
            ("extract (no cache, no store)", batched),
            ("extract + cache + relevance store", stored),
            ("extract rerun (all from the cache)", rerun),
        ]
        print(f"{'way':<36} {'seconds':>8} {'images/s':>9} {'× one at a time':>16}")
        for label, seconds in rows:
            print(f"{label:<36} {seconds:>8.1f} {n / seconds:>9.1f} {loop / seconds:>15.1f}×")
        print(f"\nratio extract / one at a time: {loop / batched:.1f}× (target ≥ 3×)")

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
