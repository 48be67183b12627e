"""Scale (issue 12), in one run: images/s per method and engine, the per-image cost of every method, and
the projected wall time of the paper's full workload on this machine.

1. Engines: ``extract`` (no cache, no store) over a synthetic dataset in the NIH-Faces layout, one method
   at a time: the local engine, then ``--engine ray`` with 1 and 2 actors on a Ray instance started here
   (``core.extract_ray``; left out, saying so, where Ray or that module is missing or with ``--no-ray``).
2. Methods: each of the fifteen methods (``core.attribute.METHODS``) on ``--images`` aligned faces at
   once, at the paper's model (ResNet-50, 224 px, random weights: the cost does not depend on them),
   beside its pass-count floor (``method_passes`` × the raw forward and forward+backward times, re-measured
   beside each method, so load from elsewhere hits both alike).
3. Projection: the paper's workload, five fold models, each scoring its fold's held-out faces plus the
   171 annotated test faces, counted from the release's ``metadata/partitions.csv`` when it is at
   ``--release`` (else 3,547 + 5 × 171), times (one classification + the fifteen methods) per image.

    .venv/bin/python bench/scale.py                  # CPU: ~5 min on 2 idle cores (Occlusion ~50 s/image)
    .venv/bin/python bench/scale.py --device cuda    # the same on a GPU (use more --images there)
    .venv/bin/python bench/scale.py --methods Gradient,LayerGradCam --no-ray   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_setup import CLASSES, random_classifier_card, synthetic_photos

from core.attribute import METHODS, attribute, method_passes
from core.dataset import open_dataset
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.library_warnings import quiet_library_warnings
from core.pipeline import ExplainSettings
from core.train import aligned_faces
from models.checkpoint import load_classifier, preprocess, save_checkpoint
from models.resnet import build_resnet

RELEASE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "nih-faces-release"
PAPER_PHOTOS, PAPER_TEST, FOLDS = 3547, 171, 5


def paper_workload(release: Path) -> tuple[int, str]:
    """Image × model pairs of the full RQ1 + RQ2 run: each fold's ``val`` faces plus every ``test`` face
    under each of the five folds; from the release's partitions.csv when present."""
    partitions = release / "metadata" / "partitions.csv"
    if partitions.is_file():
        table = pl.read_csv(partitions)
        folds = [c for c in table.columns if c.startswith("fold-")]
        count = sum(int(table[f].is_in(["val", "test"]).sum()) for f in folds)
        parts = ", ".join(
            f"{f}: {int((table[f] == 'val').sum())} val + {int((table[f] == 'test').sum())} test" for f in folds
        )
        return count, f"{len(table)} photos in the release's partitions.csv ({parts})"
    return PAPER_PHOTOS + FOLDS * PAPER_TEST, f"paper: {PAPER_PHOTOS} photos + {FOLDS} × {PAPER_TEST} test faces"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    synchronise(device)
    started = time.perf_counter()
    run()
    synchronise(device)
    return time.perf_counter() - started


def best_of(repeats: int, run: Callable[[], object], device: torch.device) -> float:
    return min(timed(run, device) for _ in range(repeats))


def resolve(name: str) -> torch.device:
    try:
        from core.devices import resolve_device
    except ImportError:  # before the devices work: CPU or an explicit cuda
        return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))
    return resolve_device(name, "--device")


def classifier_on(card_path: Path, device: torch.device):
    """The classifier loaded onto ``device`` (``load_classifier``'s device argument where it has one)."""
    if "device" in inspect.signature(load_classifier).parameters:
        return {card_path.stem: load_classifier(card_path, device=device)}
    if device.type != "cpu":
        raise SystemExit("this checkout's load_classifier has no device argument: only --device cpu works")
    return load_classifiers([card_path])


def ray_engine() -> tuple[Any, Any, str]:
    """``core.extract_ray.extract_scores_ray`` and ``ray``, or the reason they cannot run."""
    try:
        import ray

        from core.extract_ray import extract_scores_ray
    except ImportError as error:
        return None, None, f"Ray engine not available ({error})"
    return ray, extract_scores_ray, ""


def engine_table(args, dataset, classifiers, device: torch.device) -> None:
    methods = args.engine_methods.split(",")
    n = len(dataset.table)
    plan = ExtractionPlan(dataset, classifiers, "all")

    def local(method: str) -> None:
        extract_scores(plan, ExplainSettings(methods=(method,), batch_size=args.batch_size))

    local(methods[0])  # warm: imports, first-call allocations, the parser's model
    engines: list[tuple[str, Callable[[str], None]]] = [("local", local)]
    ray, extract_scores_ray, why = ray_engine() if not args.no_ray else (None, None, "--no-ray")
    if ray is not None and extract_scores_ray is not None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="ray")
        for actors in (1, 2):

            def on_ray(method: str, actors: int = actors) -> None:
                extract_scores_ray(plan, ExplainSettings(methods=(method,), batch_size=args.batch_size), actors=actors)

            engines.append((f"ray, {actors} actor{'s' * (actors > 1)}", on_ray))
    print(
        f"## Engines: images/s per method ({n} photos of 224², {args.arch} at {args.size} px on {device}, "
        f"batch {args.batch_size}, no cache, no store; Ray's time includes starting its actor pool)\n"
    )
    print(f"| method | {' | '.join(name for name, _ in engines)} |")
    print(f"|---|{'---:|' * len(engines)}")
    for method in methods:
        rates = [n / timed(functools.partial(run, method), device) for _, run in engines]
        print(f"| {method} | {' | '.join(f'{r:.2f}' for r in rates)} |", flush=True)
    if ray is None:
        print(f"\n(Ray columns left out: {why})")
    else:
        ray.shutdown()
    print()


def method_table(args, dataset, classifier, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """Seconds per image of each method on ``--images`` faces at once, with its pass-count floor."""
    names = dataset.table["image_name"].to_list()[: args.images]
    faces = preprocess(aligned_faces(dataset, names, args.size), classifier.card).to(device)
    network = classifier.network
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    targets = torch.arange(len(faces), device=device) % len(classifier.card.classes)

    def forward() -> None:
        with torch.no_grad():
            network(faces)

    def forward_backward() -> None:
        inputs = faces.clone().requires_grad_(True)
        torch.autograd.grad(network(inputs)[torch.arange(len(faces)), targets].sum(), inputs)

    forward_backward()
    forward()
    methods = [m for m in METHODS if args.methods == "all" or m in args.methods.split(",")]
    print(
        f"## Methods: seconds per image ({len(faces)} faces at once, {args.arch} at {args.size} px, random "
        f"weights, {device}, {torch.get_num_threads()} threads)\n"
    )
    print("| method | passes f/b | s/image | floor s/image | ratio |")
    print("|---|---:|---:|---:|---:|")
    costs = {}
    for method in methods:
        t_f = best_of(3, forward, device) / len(faces)
        t_fb = best_of(3, forward_backward, device) / len(faces)
        n_f, n_b = method_passes(method, size=args.size)
        floor = n_b * t_fb + (n_f - n_b) * t_f
        if floor < 1.0:  # warm: hooks, lazy imports (negligible beside a method of seconds per image)
            attribute(network, faces[:1], targets[:1], method)
        repeats = 3 if floor * len(faces) < 2 else 1
        costs[method] = best_of(repeats, functools.partial(attribute, network, faces, targets, method), device) / len(
            faces
        )
        print(
            f"| {method} | {n_f}/{n_b} | {costs[method]:.3f} | {floor:.3f} | {costs[method] / floor:.2f} |", flush=True
        )
    t_f = best_of(3, forward, device) / len(faces)
    t_fb = best_of(3, forward_backward, device) / len(faces)
    print(f"\nraw passes at the end: forward {t_f:.4f} s/image, forward+backward {t_fb:.4f} s/image")
    floors = {}
    for method in METHODS:  # every method's floor, so the projection covers the fifteen even on a subset
        n_f, n_b = method_passes(method, size=args.size)
        floors[method] = n_b * t_fb + (n_f - n_b) * t_f
    unmeasured = [m for m in METHODS if m not in costs]
    if unmeasured:
        print(f"not measured (their pass-count floor stands in below): {', '.join(unmeasured)}")
    print()
    return {**floors, **costs, "(classification)": t_f}, unmeasured


def projection(args, costs: dict[str, float], unmeasured: list[str]) -> None:
    count, source = paper_workload(Path(args.release))
    per_image = sum(costs.values())
    seconds = count * per_image
    print("## Projection: the paper's fifteen-method workload on this machine\n")
    print(f"images × models: {count} ({source})")
    print(
        f"per image: {per_image:.2f} s = one classification + the fifteen methods as measured above"
        + (f", {len(unmeasured)} of them at their floor (a lower bound)" if unmeasured else "")
        + " (preparing a face, ~5 ms, left out)"
    )
    print(f"projected wall time: {seconds / 3600:.1f} h ({seconds / 86400:.2f} days)")
    print(f"without Occlusion: {(seconds - count * costs['Occlusion']) / 3600:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2, help="faces per method for the per-image costs")
    parser.add_argument("--methods", default="all", help="comma-separated, or all (the fifteen)")
    parser.add_argument("--photos", type=int, default=14, help="photos the engines extract (7 classes)")
    parser.add_argument("--engine-methods", default="Gradient,LayerGradCam")
    parser.add_argument("--batch-size", type=int, default=4, help="the engines' batch (several batches per actor)")
    parser.add_argument("--no-ray", action="store_true", help="leave the Ray engine out")
    parser.add_argument("--no-engines", action="store_true", help="leave the engine table out")
    parser.add_argument("--release", default=str(RELEASE), help="the NIH-Faces release folder (its partitions.csv)")
    args = parser.parse_args()
    quiet_library_warnings()
    device = resolve(args.device)
    started = time.perf_counter()
    print(f"load before: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (1/5/15 min)\n")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        per_class = -(-args.photos // len(CLASSES))
        synthetic_photos(root, per_class)
        dataset = open_dataset(root)
        card = random_classifier_card(args.arch, args.size)
        torch.manual_seed(0)
        path = save_checkpoint(build_resnet(args.arch, len(CLASSES)).eval(), card, root / "models", "classifier")
        classifiers = classifier_on(Path(path), device)
        if not args.no_engines:
            engine_table(args, dataset, classifiers, device)
        costs, unmeasured = method_table(args, dataset, next(iter(classifiers.values())), device)
        projection(args, costs, unmeasured)
    print(
        f"\nload after: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}; "
        f"this run {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
