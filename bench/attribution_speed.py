"""Milliseconds per image of every method, and its ratio to the method's floor, measured in one run.

The floor of a method is its number of forward and backward passes per image (``method_passes``: Zennit's
and Captum's pass counts, e.g. z⁺ 3f+2b, α-β 5f+4b, DeepLIFT one doubled f+b) times the raw model's pass
times: a forward without gradients, and a forward plus the backward to the input with frozen weights.
A single measurement of those is easily off by 2× on a shared machine, so the raw passes are measured in
rounds interleaved with the methods (forward, forward+backward, then each method under test, round after
round), and the table reports medians with their spread. A method with a fused rule (core.fused_rules) is
timed both ways, ``fused`` (what ``attribute`` runs) and ``library`` (Zennit or Captum), in the same rounds.
A ratio near 1 means the implementation adds nothing beyond the passes the method needs; below 1, it needs
fewer passes than the library's count.

On a machine shared with other work, wall-clock times swing with the load (a ResNet-50 forward has been
measured anywhere from 35 ms to over a second per image). ``--clock cpu`` times with the CPU time this
process used (``time.process_time``) instead, which waiting for other processes does not inflate; with
``--threads 1`` no time is spent in idle worker threads either, so ratios stay comparable under load (they
are single-core ratios, not the 2-thread ones).

    .venv/bin/python bench/attribution_speed.py                     # ResNet-50, 224 px, 4 images, all methods
    .venv/bin/python bench/attribution_speed.py --methods LRP-EpsilonPlusFlat,ExcitationBackprop --rounds 7
    .venv/bin/python bench/attribution_speed.py --arch resnet18 --size 112 --methods Gradient,Occlusion
    .venv/bin/python bench/attribution_speed.py --methods LRP-EpsilonPlusFlat --clock cpu --threads 1  # under load
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.attribute import METHOD_NAMES, METHODS, attribute, method_passes
from core.library_warnings import quiet_library_warnings
from models.resnet import build_resnet

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(run) -> float:
    start = clock()
    run()
    return clock() - start


def spread(values: list[float], scale: float) -> str:
    """min/median/max, scaled (e.g. to ms per image)."""
    low, mid, high = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    return f"{low:.0f}/{mid:.0f}/{high:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="batch size (images explained at once)")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one for methods over 60 s a batch)")
    parser.add_argument(
        "--implementation",
        choices=("both", "fused", "library"),
        default="both",
        help="for methods with a fused rule: time ours, the library's, or both (default)",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, which other processes' load does not inflate",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's own choice)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_library_warnings()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}")

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

    runs = []  # (label, method, implementation)
    for method in methods:
        if METHODS[method].fused is None or args.implementation == "library":
            runs.append((method, "library"))
        elif args.implementation == "fused":
            runs.append((method, "fused"))
        else:
            runs += [(method, "fused"), (method, "library")]

    # Warm-up: allocator, kernels, autograd, hook registration paths, lazy imports.
    forward_backward()
    forward()
    for method, implementation in runs:
        attribute(model, x[:1], targets[:1], method, implementation=implementation)

    t_f: list[float] = []
    t_fb: list[float] = []
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        for run in runs:
            t_f.append(timed(forward))
            t_fb.append(timed(forward_backward))
            method, implementation = run
            if round_ > 0 and statistics.median(times[run]) > 60:
                continue  # a slow method (Occlusion, SmoothGrad on a big model): one round is enough
            times[run].append(
                timed(lambda m=method, i=implementation: attribute(model, x, targets, m, implementation=i))
            )

    per_image = 1000 / args.images  # seconds per batch -> ms per image
    f, fb = statistics.median(t_f), statistics.median(t_fb)
    print(
        f"{args.arch} {args.size}px, batch {args.images}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{args.clock} clock"
    )
    print(
        f"raw passes (ms/image, min/median/max over {len(t_f)} interleaved runs): "
        f"forward {spread(t_f, per_image)}, forward+backward {spread(t_fb, per_image)}"
    )
    print(f"{'method':28s} {'impl':8s} {'passes f/b':>10s} {'ms/image':>9s} {'floor':>8s} {'ratio':>6s}", end="")
    print("  spread (min/med/max ms)")
    for run in runs:
        method, implementation = run
        n_f, n_b = method_passes(method, size=args.size)
        floor = n_b * fb + (n_f - n_b) * f
        t = statistics.median(times[run])
        print(
            f"{method:28s} {implementation:8s} {n_f:>5d}/{n_b:<4d} {t * per_image:9.0f} {floor * per_image:8.0f} "
            f"{t / floor:6.2f}  {spread(times[run], per_image)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
