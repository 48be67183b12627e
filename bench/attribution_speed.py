"""Seconds per image of every method, and its ratio to the method's floor, measured in one run.

The floor of a method is its number of forward and backward passes per image (``method_passes``)
times the raw model's pass times, measured here, on the same batch, just before. A ratio near 1
means the wrapper, hooks and library add nothing beyond the passes the method needs.

    .venv/bin/python bench/attribution_speed.py                     # ResNet-50, 224 px, 4 images
    .venv/bin/python bench/attribution_speed.py --arch resnet18 --methods Gradient,Occlusion
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.attribute import METHOD_NAMES, attribute, method_passes
from core.library_warnings import quiet_library_warnings
from models.resnet import build_resnet


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="batch size (images explained at once)")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (methods under 5 s too)")
    args = parser.parse_args()
    quiet_library_warnings()

    torch.manual_seed(0)
    model = build_resnet(args.arch, args.classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.images, 3, args.size, args.size)
    targets = torch.arange(args.images) % args.classes

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        torch.autograd.grad(out[torch.arange(args.images), targets].sum(), inp)

    forward_backward()  # warm-up: allocator, kernels, autograd
    forward()
    print(f"{args.arch} {args.size}px, batch {args.images}, {torch.get_num_threads()} threads")
    print(f"{'method':28s} {'passes f/b':>10s} {'s/image':>9s} {'floor':>9s} {'ratio':>6s}")
    for method in args.methods.split(","):
        n_f, n_b = method_passes(method, size=args.size)
        # The raw passes are re-measured beside each method, so load from elsewhere hits both alike.
        t_f = best_of(args.repeats, forward) / args.images
        t_fb = best_of(args.repeats, forward_backward) / args.images
        floor = n_b * t_fb + (n_f - n_b) * t_f
        repeats = args.repeats if floor * args.images < 5 else 1
        attribute(model, x[:1], targets[:1], method)  # warm-up: hook registration paths, lazy imports
        per_image = best_of(repeats, lambda m=method: attribute(model, x, targets, m)) / args.images
        print(f"{method:28s} {n_f:>5d}/{n_b:<4d} {per_image:9.3f} {floor:9.3f} {per_image / floor:6.2f}", flush=True)
    print(f"\nraw pass times beside the last method: forward {t_f:.4f} s/image, forward+backward {t_fb:.4f} s/image")


if __name__ == "__main__":
    main()
