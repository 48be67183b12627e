"""Face parsers against exact label maps: per-part IoU of the three parsers on held-out synthetic faces.

The demo's synthetic faces come with the exact label maps they were drawn with (``features/segmaps/``).
The demo's U-Net parser never saw them: it trains on its own synthetic set (``core/demo.py``: a separate
seed, no person shared). Each face of the chosen split is prepared by the pipeline
(``core.pipeline.prepare_face``, aligned from the dataset's five landmarks) four times: with its stored
map (the truth, source ``stored``), and without it under each parser:

- ``landmarks68``: parts drawn from dlib's 68 landmarks found on the photo (``core.landmark_parts``);
- ``U-Net``: the demo's parser card (``layout.parser_card``), trained on synthetic faces;
- ``template``: the five-point landmark template (``core.parse.landmark_template``).

Per-part IoU is ``core.train_parser.intersection_over_union`` over all faces' maps together (the measure
the parser's training reports); region IoU is each region mask's intersection over union summed over the
faces, for the paper's regions and the extended spec's. Also counted: faces dlib's own detector finds (the
shape predictor starts from a box built from the five points on the others), and how far dlib's five
points lie from the exact ones (in inter-ocular distances).

    .venv/bin/python bench/parser_iou.py                          # demo, fold-1 test split, docs/parser_iou.md
    .venv/bin/python bench/parser_iou.py DATASET --split test --fold fold-1 --size 112 --out FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.dataset import names_in, open_dataset, read_photo
from core.layout import demo_dataset
from core.library_warnings import quiet_library_warnings
from core.parse import LAPA_LABELS
from core.pipeline import ExplainSettings, PreparedFace, prepare_face
from core.regions import PAPER_REGIONS, RegionSpec, bundled_region_specs, region_masks
from core.train_parser import intersection_over_union
from models.parser import load_face_parser

HAIR = LAPA_LABELS.index("hair")
FACE_PARTS = [i for i, name in enumerate(LAPA_LABELS) if name not in ("background", "hair")]


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-region IoU of N×R×H×W boolean masks, intersections and unions summed over the N faces (NaN
    for a region empty in both)."""
    intersection = (predicted & truth).sum(axis=(0, 2, 3)).astype(float)
    union = (predicted | truth).sum(axis=(0, 2, 3))
    return np.divide(intersection, union, out=np.full(len(union), np.nan), where=union > 0)


def masks_of(maps: np.ndarray, spec: RegionSpec) -> np.ndarray:
    with warnings.catch_warnings():  # a parser without hair leaves the hair region empty: expected here
        warnings.simplefilter("ignore")
        return region_masks(maps, spec).masks


def main() -> int:
    quiet_library_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=None, help="default: the demo (data/demo)")
    parser.add_argument("--fold", default="fold-1")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=None, help="aligned face side (default: the parser's input)")
    parser.add_argument("--out", type=Path, default=Path("docs/parser_iou.md"), help="where the table is written")
    args = parser.parse_args()
    started = time.perf_counter()
    dataset = open_dataset(args.dataset or demo_dataset())
    unet = load_face_parser(dataset.layout.parser_card)
    size = args.size or unet.card.input_size
    names = names_in(dataset, args.fold, args.split)
    parsers = {
        "dense landmarks (dlib 68)": ExplainSettings(landmark_parser="landmarks68"),
        "U-Net (synthetic-trained)": ExplainSettings(parser=unet),
        "landmark template (5 points)": ExplainSettings(landmark_parser="template"),
    }
    truth: list[np.ndarray] = []
    maps: dict[str, list[np.ndarray]] = {name: [] for name in parsers}
    sources: dict[str, set[str]] = {name: set() for name in parsers}
    detected, disagreement = 0, []
    for image_name in names:
        photo = read_photo(dataset, image_name)
        stored = prepare_face(photo, size, ExplainSettings())
        assert stored.parse_source == "stored"
        truth.append(stored.label_map)
        bare = dataclasses.replace(photo, label_map=None)
        for what, settings in parsers.items():
            face: PreparedFace = prepare_face(bare, size, settings)
            sources[what].add(face.parse_source)
            maps[what].append(face.label_map)
            check = face.alignment_check
            if check is not None and check.disagreement_iod is not None:
                detected += bool(check.dlib_detected)
                disagreement.append(check.disagreement_iod)
    truth_maps = np.stack(truth)
    parsed = {what: np.stack(found) for what, found in maps.items()}
    part_iou = {what: intersection_over_union(m.astype(np.int64), truth_maps) for what, m in parsed.items()}
    specs = {"paper": PAPER_REGIONS, "extended": bundled_region_specs()["extended"]}
    region_iou = {}
    for spec_name, spec in specs.items():
        truth_masks = masks_of(truth_maps, spec)
        for what, m in parsed.items():
            region_iou[spec_name, what] = mask_iou(masks_of(m, spec), truth_masks)
    seconds = time.perf_counter() - started
    gap = np.array(disagreement)  # one per face: only the dlib parser's prepare_face runs the check here

    lines = [
        f"Held-out synthetic faces: {dataset.root.name}'s {args.fold} {args.split} split, {len(names)} faces "
        f"aligned at {size} px from their exact five landmarks (none of them in the U-Net's training set).",
        "Parse sources: " + "; ".join(f"{what}: {', '.join(sorted(s))}" for what, s in sources.items()) + ".",
        f"dlib's own detector found {detected} of {len(names)} faces; on the other {len(names) - detected} the "
        "shape predictor started from the box built from the five points.",
        f"dlib's five points vs the exact ones: median {np.median(gap):.3f} IOD, 95th percentile "
        f"{np.percentile(gap, 95):.3f}, max {gap.max():.3f}; {int((gap > 0.2).sum())} faces past the 0.2 warning.",
        "",
        "| part | " + " | ".join(parsers) + " |",
        "| --- |" + " ---: |" * len(parsers),
    ]
    for label in [*FACE_PARTS, HAIR]:
        cells = []
        for what in parsers:
            value = part_iou[what][label]
            drawn = (parsed[what] == label).any()
            cells.append("not drawn" if not drawn else f"{value:.3f}")
        lines.append(f"| {LAPA_LABELS[label]} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean of the 9 face parts** | "
        + " | ".join(f"**{np.nanmean(part_iou[what][FACE_PARTS]):.3f}**" for what in parsers)
        + " |"
    )
    lines += ["", "| region (spec) | " + " | ".join(parsers) + " |", "| --- |" + " ---: |" * len(parsers)]
    paper_rules = set(PAPER_REGIONS.regions)
    for spec_name, spec in specs.items():
        for r, rule in enumerate(spec.regions):
            if spec_name != "paper" and rule in paper_rules:
                continue  # the extended spec's eye, nose and mouth are the paper's: same masks, same row
            cells = [f"{region_iou[spec_name, what][r]:.3f}" for what in parsers]
            lines.append(f"| {rule.name} ({spec_name}) | " + " | ".join(cells) + " |")
    lines += ["", f"({seconds:.0f} s wall; `.venv/bin/python bench/parser_iou.py`)"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
