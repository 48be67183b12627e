"""How long the dashboard makes a reader wait, measured on a real dataset (default: the demo). Nothing asserted.

1. Explain page, warm: one held-out face with all fifteen methods already in the result cache.
   The core calls the page makes (``explain`` from the cache, the reading, the heatmap overlays),
   timed alone; then a whole AppTest rerun of the page (Streamlit, charts and images included).
   Target: ≤ 0.3 s for the core calls. The first, cold run fills the cache and is reported too.
2. Regions page: what one slider move costs. A new spec each time (the mouth box grown by
   another 5 %): ``rescore`` of split "val" from the relevance store plus the Table 3 rebuild
   (``compare_groups`` + ``significance_counts``); then the same spec again (masks memoised).
   The val store is extracted first (cheap methods) when the dataset has none.

    .venv/bin/python bench/dashboard_speed.py                 # the demo (python -m core demo)
    .venv/bin/python bench/dashboard_speed.py --dataset DIR --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache import DiskCache
from core.attribute import (
    METHOD_NAMES,
    QUICK_METHODS,
)
from core.dataset import Photo, image_file, landmarks_of, names_in, open_dataset
from core.explain import explain
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.hpo import ontology_priors
from core.imageio import load_image
from core.layout import DatasetLayout, demo_dataset
from core.library_warnings import quiet_library_warnings
from core.pipeline import ExplainSettings
from core.reading import reading
from core.regions import PAPER_REGIONS, BoxRule
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import write_score_table
from core.stats import compare_groups, significance_counts
from dashboard import render
from models.checkpoint import load_classifier
from models.parser import load_face_parser

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


T = TypeVar("T")


def timed(run: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def explain_page(root: Path, repeats: int) -> None:
    dataset = open_dataset(root)
    card = dataset.layout.classifier_cards()[0]
    classifier = load_classifier(card)
    parser_card = dataset.layout.parser_card
    parser = load_face_parser(parser_card) if parser_card.is_file() else None
    name = names_in(dataset, classifier.card.fold or dataset.folds[0], "test")[0]
    image, stored = load_image(image_file(dataset, name)), landmarks_of(dataset, [name])
    landmarks = None if stored is None else stored[0]  # None: explain detects the face
    cache = DiskCache()

    def page_compute():
        result = explain(
            Photo(image, landmarks),
            classifier,
            ExplainSettings(methods=METHOD_NAMES, spec=PAPER_REGIONS, parser=parser),
            cache,
        )
        text = reading(result, ontology_priors(result.classes[result.target]))
        overlays = [render.heatmap_rgb(result.face.aligned, m) for m in result.maps.values()]
        return text, overlays

    cold, (text, _) = timed(page_compute)
    warm = [timed(page_compute)[0] for _ in range(repeats)]
    print(
        f"Explain page, {name} with {classifier.card.architecture} at {classifier.card.input_size} px, "
        f"{len(METHOD_NAMES)} methods"
    )
    print(f"  first run (fills the cache where empty): {cold:.2f} s")
    print(
        f"  warm core calls (explain + reading + overlays): median {statistics.median(warm):.3f} s, "
        f"min {min(warm):.3f} s over {repeats} (target 0.3 s: ratio {statistics.median(warm) / 0.3:.2f})"
    )
    print(f"  reading: {text}")

    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(APP), default_timeout=600)
    app.query_params.update(
        {"dataset": str(root), "model": card.stem, "methods": list(METHOD_NAMES), "split": "test", "image": name}
    )
    first, _ = timed(app.run)
    if app.exception:
        print(f"  AppTest failed: {[e.value for e in app.exception]}")
        return
    reruns = [timed(app.run)[0] for _ in range(repeats)]
    print(
        f"  AppTest: first run {first:.2f} s (loads models), warm rerun median {statistics.median(reruns):.3f} s, "
        f"min {min(reruns):.3f} s"
    )


def regions_page(root: Path, repeats: int) -> None:
    folder = DatasetLayout(root).relevance_store("val")
    store = RelevanceStore(folder)
    if not store.complete:
        methods = list(QUICK_METHODS)
        print(f"extracting split val ({', '.join(methods)}) into {folder} first …")
        cards = DatasetLayout(root).classifier_cards()
        seconds, table = timed(
            lambda: extract_scores(
                ExtractionPlan(open_dataset(root), load_classifiers(cards), "val"),
                ExplainSettings(methods=tuple(methods)),
                cache=DiskCache(),
                store=RelevanceStore(folder),
            )
        )
        write_score_table(table, DatasetLayout(root).score_table("val"))
        print(f"  {seconds:.0f} s")
        store = RelevanceStore(folder)
    methods = list(store.contents.methods)
    images = sum(len(m.images) for m in store.contents.models)
    print(
        f"Regions page, split val: {images} maps of {store.contents.size}² × {len(methods)} methods "
        f"({', '.join(methods)})"
    )
    mouth = PAPER_REGIONS.regions[2]
    new_spec, same_spec, tables = [], [], []
    for step in range(repeats):
        grown = dataclasses.replace(
            PAPER_REGIONS,
            regions=(
                *PAPER_REGIONS.regions[:2],
                dataclasses.replace(mouth, boxes=(BoxRule((7, 9), grow_left=0.25 + 0.05 * step, grow_right=0.2),)),
            ),
        )
        seconds, scores = timed(lambda: rescore(store, grown, methods))
        new_spec.append(seconds)
        same_spec.append(timed(lambda: rescore(store, grown, methods))[0])
        tables.append(timed(lambda: significance_counts(compare_groups(scores)))[0])
    print(
        f"  rescore, new spec (masks of every label map computed): median {statistics.median(new_spec) * 1000:.0f} ms"
    )
    print(
        f"  rescore, same spec again (masks memoised): median {statistics.median(same_spec) * 1000:.0f} ms "
        f"({statistics.median(same_spec) * 1000 / len(methods):.0f} ms per method)"
    )
    print(f"  Table 3 rebuild (compare_groups + significance_counts): median {statistics.median(tables) * 1000:.0f} ms")
    print(
        f"  one slider move (new spec + Table 3): median "
        f"{(statistics.median(new_spec) + statistics.median(tables)) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="dataset folder (default: the demo)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-explain", action="store_true")
    parser.add_argument("--skip-regions", action="store_true")
    args = parser.parse_args()
    quiet_library_warnings()
    warnings.simplefilter("ignore")  # empty-region notes on odd faces; the timings are the point here
    root = Path(args.dataset or os.environ.get("XAI_DATASET") or demo_dataset())
    if not DatasetLayout(root).classifier_cards():
        sys.exit(f"error: {root / 'models'} has no classifier-fold-*.json; build the demo first (python -m core demo)")
    if not args.skip_explain:
        explain_page(root, args.repeats)
    if not args.skip_regions:
        regions_page(root, args.repeats)


if __name__ == "__main__":
    main()
