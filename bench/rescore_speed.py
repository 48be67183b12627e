"""Re-scoring a paper-sized dataset from the relevance store: the one-off masks, then ms per method.

3,547 random relevance maps of 224² (the NIH-Faces size; the content does not change the cost)
over realistic label maps (synthetic faces from ``core.synth``, aligned like the dataset's own,
tiled), stored as five fold models like a ``val`` extraction. Reported for the paper's spec and the
extended one: the mask computation (``region_masks`` on every map plus run-length encoding), its
reload from the store's memo, the store's scoring per method, and side by side the same scores by
``core.score.region_scores`` on precomputed boolean masks (the straightforward way), with the
largest difference between the two. The store's scoring runs both ways in the same run: with the compiled
kernel (``core.score_kernel``, numba) and with the numpy path it replaces (``compiled=False``), interleaved.

    .venv/bin/python bench/rescore_speed.py          # about a minute; needs ~2 GB of RAM and /tmp
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core.rescore
from core.align import align_face, warp_to_aligned
from core.regions import bundled_region_specs, region_masks
from core.relevance_store import RelevanceStore, StoreContents, StoredModel
from core.rescore import region_segments, rescore
from core.score import region_scores, segment_sums
from core.score_kernel import available as kernel_available
from core.synth.classes import DEFAULT_CLASSES
from core.synth.dataset import plan_images
from core.synth.faces import render_face

METHODS = ("Gradient", "Occlusion")


def synthetic_label_maps(distinct: int, size: int) -> np.ndarray:
    """``distinct`` rendered faces' label maps, carried into the aligned frame as the dataset's are."""
    maps = []
    for image in plan_images(-(-distinct // len(DEFAULT_CLASSES)), seed=0, size=size)[:distinct]:
        _, label_map, landmarks = render_face(image.params)
        maps.append(
            warp_to_aligned(
                label_map, align_face(np.zeros((size, size, 3), np.uint8), landmarks, size=size).matrix, size, order=0
            )
        )
    return np.stack(maps)


def build_store(root: Path, label_maps: np.ndarray, folds: int, seed: int) -> RelevanceStore:
    n, size = len(label_maps), label_maps.shape[1]
    bounds = np.linspace(0, n, folds + 1).astype(int)
    models = tuple(
        StoredModel(
            f"classifier-fold-{k + 1}",
            f"fold-{k + 1}",
            ("A", "B"),
            f"random-{k}",
            tuple(range(bounds[k], bounds[k + 1])),
        )
        for k in range(folds)
    )
    contents = StoreContents(
        size=size,
        mode="abs",
        target="predicted",
        image_names=tuple(f"face{i:05d}.jpg" for i in range(n)),
        labels=("A",) * n,
        faces_key="bench",
        label_maps_key="bench",
        code_version="bench",
        models=models,
        methods=METHODS,
    )
    rng = np.random.default_rng(seed)
    with RelevanceStore(root) as store:
        store.begin(contents)
        for model in models:
            rows = list(range(len(model.images)))
            store.write_predictions(model.name, rows, [0] * len(rows), [0] * len(rows), [1.0] * len(rows))
            store.write_label_maps(list(model.images), label_maps[list(model.images)])
            for method in METHODS:
                for start in range(0, len(rows), 256):
                    chunk = rows[start : start + 256]
                    store.write_maps(
                        model.name,
                        method,
                        chunk,
                        rng.random((len(chunk), size, size), dtype=np.float32).astype(np.float16),
                    )
    return RelevanceStore(root)


T = TypeVar("T")


def timed(run: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def best_of(repeats: int, run: Callable[[], object]) -> float:
    return min(timed(run)[0] for _ in range(repeats))


def direct_scores(store: RelevanceStore, method: str, masks: np.ndarray) -> np.ndarray:
    """``region_scores`` per model on float32 maps, 256 at a time; image i has the masks of face i mod F."""
    out = []
    for model in store.contents.models:
        maps = store.maps(model.name, method)
        images = np.asarray(model.images)
        for start in range(0, len(images), 256):
            out.append(
                region_scores(
                    np.asarray(maps[start : start + 256], dtype=np.float32),
                    masks[images[start : start + 256] % len(masks)],
                )
            )
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3547)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--faces", type=int, default=48, help="distinct synthetic faces tiled into the label maps")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # empty-region notes; the cost is what is measured here

    seconds, faces = timed(lambda: synthetic_label_maps(args.faces, args.size))
    label_maps = faces[np.arange(args.images) % len(faces)]
    print(f"{args.images} label maps of {args.size}² tiled from {len(faces)} rendered faces ({seconds:.1f} s)")
    with tempfile.TemporaryDirectory() as folder:
        seconds, store = timed(lambda: build_store(Path(folder), label_maps, folds=5, seed=0))
        per_method_mb = args.images * args.size**2 * 2 / 1e6
        print(
            f"store of 5 fold models × {len(METHODS)} methods written in {seconds:.1f} s "
            f"({per_method_mb:.0f} MB of float16 maps per method)\n"
        )
        if not kernel_available():
            print("numba is not installed: both columns run the numpy path\n")
        header = (
            f"{'spec':<9} {'regions':>7} {'masks, one-off':>15} {'memo reload':>12} {'numpy: ms/method':>17} "
            f"{'compiled: ms/method':>20} {'gain':>5} {'region_scores: ms/method':>25} {'max |diff|':>11}"
        )
        print(header)
        print("-" * len(header))
        for name in ("paper", "extended"):
            spec = bundled_region_specs()[name]
            fresh = RelevanceStore(folder)
            mask_seconds, _ = timed(lambda: region_segments(fresh, spec))
            reload_seconds, _ = timed(lambda: region_segments(RelevanceStore(folder), spec))
            rescore(fresh, spec, [METHODS[0]])  # warm: chunk plans built, kernel compiled, maps in the page cache
            with numpy_path():
                rescore(fresh, spec, [METHODS[0]])
            compiled: list[float] = []
            numpy: list[float] = []
            for _ in range(args.repeats):  # interleaved, so both see the same load
                for method in METHODS:
                    compiled.append(timed(lambda: rescore(fresh, spec, [method]))[0])
                    with numpy_path():
                        numpy.append(timed(lambda: rescore(fresh, spec, [method]))[0])
            masks = region_masks(faces, spec).masks  # of the distinct faces only: independent of the store's
            direct_scores(store, METHODS[0], masks)  # warm
            direct = best_of(max(1, args.repeats // 2), lambda: direct_scores(store, METHODS[0], masks))
            expected = direct_scores(store, METHODS[0], masks).reshape(-1)
            got = rescore(fresh, spec, [METHODS[0]])["score"].to_numpy()
            with numpy_path():
                got_numpy = rescore(fresh, spec, [METHODS[0]])["score"].to_numpy()
            diff = max(np.nanmax(np.abs(got - expected)), np.nanmax(np.abs(got_numpy - expected)))
            print(
                f"{name:<9} {len(spec.regions):>7} {mask_seconds:>13.1f} s {reload_seconds * 1e3:>9.0f} ms "
                f"{min(numpy) * 1e3:>14.0f} ms {min(compiled) * 1e3:>17.0f} ms {min(numpy) / min(compiled):>4.1f}× "
                f"{direct * 1e3:>22.0f} ms {diff:>11.1e}"
            )
            print(f"{'':<9} compiled − numpy scores: max |diff| {np.nanmax(np.abs(got - got_numpy)):.1e}")
        print(
            f"\nnumpy / compiled: best of {args.repeats} calls each of rescore(store, spec, [method]) over all "
            f"{args.images} maps, the two interleaved, masks memoised (target ≤ 100 ms); region_scores: "
            "core.score.region_scores on float32 maps and precomputed bool masks, 256 maps per call; "
            "max |diff|: largest difference of either path to region_scores."
        )


def numpy_path() -> mock._patch:
    """Within: ``rescore`` sums with the numpy path (``segment_sums(compiled=False)``)."""
    return mock.patch.object(core.rescore, "segment_sums", functools.partial(segment_sums, compiled=False))


if __name__ == "__main__":
    main()
