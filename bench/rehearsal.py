"""The paper-scale rehearsal (issue 11): the whole pipeline on a synthetic twin of the NIH-Faces release.

One command runs every stage a researcher holding the release would, on a twin with one rendered
face per row of the release's partitions.csv (``python -m core twin``), and times each:

1. twin       render the twin (3,544 photos at full scale) from the release's metadata
2. train      the demo's classifier recipe (``core.demo.DemoPreset.classifier``: ResNet-18 at 112 px,
              started from the demo's face-parser encoder) on the release's own folds. This rehearses
              the pipeline's scale, not ResNet-50's accuracy.
3. extract    the cheap methods (``QUICK_METHODS``) on every held-out face: each fold model's val
              faces (RQ1); they and IntegratedGradients and DeepLIFT (the demo leaderboard's best) on
              the 171 annotated test faces (RQ2)
4. sample     all fifteen methods on a sample of test faces, one method at a time, for per-image costs
              (the marginal cost of a face: each method's run on the sample less its run on one face)
5. rq1, rq2   Tables 3 and 4 (RQ2 with the release's real annotation files, copied into the twin)
6. benchmark  the ground-truth leaderboard on test faces (the twin's planted terms are the truth), beside
              RQ2's rho both against the raters' counts of every term (Table 4) and of the drawn terms
7. dashboard  Streamlit AppTest: the Explain page on a face never explained (cold) and on an extracted
              one, then each other page's first render, in the same session

It prints a table of stage wall times with the load averages (``os.getloadavg``) at each stage's
start and end, the RQ2 rho beside the leaderboard, and the projected full fifteen-method run (from
the sample's per-image costs, and for ResNet-50 at 224 px from each method's passes
``method_passes`` times pass times measured here, scaled by the method's measured overhead on
ResNet-18). Everything goes to ``<out>/rehearsal.json`` and ``<out>/rehearsal.md``.

    .venv/bin/python bench/rehearsal.py --rows 60 --out /tmp/twin60     # a small dry run
    .venv/bin/python bench/rehearsal.py --out data/twin --folds fold-1,fold-2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from core.attribute import METHOD_NAMES, QUICK_METHODS, method_passes  # noqa: E402
from core.dataset import Dataset, names_in, open_dataset  # noqa: E402
from core.demo import DemoPreset  # noqa: E402
from core.extract import ExtractionPlan, extract_scores, load_classifiers  # noqa: E402
from core.layout import DatasetLayout, demo_dataset  # noqa: E402
from core.library_warnings import quiet_library_warnings  # noqa: E402
from core.pipeline import ExplainSettings, prepare_dataset_faces  # noqa: E402
from core.score_table import write_score_table  # noqa: E402
from models.resnet import build_resnet  # noqa: E402

RELEASE = REPO.parent / "shared" / "reference" / "nih-faces-release"
APP = REPO / "dashboard" / "app.py"
PAGES = ("views/regions.py", "views/statistics.py", "views/hpo.py")
# RQ2 and the leaderboard: the cheap methods, and the two the demo's leaderboard ranks highest but SmoothGrad.
RQ2_METHODS = (*QUICK_METHODS, "IntegratedGradients", "DeepLIFT")


@dataclasses.dataclass
class Stage:
    name: str
    seconds: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    note: str = ""


class Rehearsal:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root: Path = args.out
        self.stages: list[Stage] = []
        self.facts: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        self.env = {**os.environ, "XAI_CACHE_DIR": str(self.root / ".cache"), "XAI_DATASET": str(self.root)}
        os.environ.update({"XAI_CACHE_DIR": self.env["XAI_CACHE_DIR"], "XAI_DATASET": str(self.root)})

    def stage(self, name: str, run: Callable[[], str | None]) -> None:
        load = os.getloadavg()
        print(f"\n=== {name} (load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}) ===", flush=True)
        started = time.perf_counter()
        try:
            note = run() or ""
        except Exception as error:  # a failed stage is recorded; the later ones still run where they can
            note = f"FAILED: {type(error).__name__}: {error}"
        seconds = time.perf_counter() - started
        self.stages.append(Stage(name, seconds, load, os.getloadavg(), note))
        print(f"--- {name}: {seconds:.1f} s {note}", flush=True)

    def cli(self, *argv: str) -> str:
        """Run ``python -m core ARGV`` as a researcher would; its note in the table is empty."""
        command = [sys.executable, "-m", "core", *argv]
        print("$ python -m core " + " ".join(argv), flush=True)
        subprocess.run(command, cwd=REPO, env=self.env, check=True)
        return ""


def train_flags(epochs: int | None) -> list[str]:
    """The demo's classifier recipe as ``train`` flags, started from the demo's parser encoder."""
    config = DemoPreset().classifier
    flags: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "epochs" and epochs is not None:
            value = epochs
        if isinstance(value, bool):
            if value != field.default:
                flags.append(f"--{'no-' if not value else ''}{field.name.replace('_', '-')}")
        elif value is not None:
            flags += [f"--{field.name.replace('_', '-')}", str(value)]
    encoder = DatasetLayout(demo_dataset()).parser_encoder
    if encoder.is_file():
        flags += ["--init", str(encoder)]
    else:
        print(f"warning: {encoder} is missing (python -m core demo builds it); training from scratch", flush=True)
    return flags


def sample_costs(root: Path, fold: str, sample: int) -> dict:
    """Every method on ``sample`` test faces of the fold's model, one method at a time: seconds per image."""
    dataset = open_dataset(root)
    names = names_in(dataset, fold, "test")
    names = [names[i] for i in np.linspace(0, len(names) - 1, min(sample, len(names))).round().astype(int)]
    subset = Dataset(dataset.root, dataset.table.filter(pl.col("image_name").is_in(names)))
    classifiers = load_classifiers([dataset.layout.classifier_card(fold)])
    size = next(iter(classifiers.values())).card.input_size
    extract_scores(ExtractionPlan(Dataset(root, subset.table[:1]), classifiers, "test"), ExplainSettings())  # warm-up
    started = time.perf_counter()
    prepare_dataset_faces(subset, names, size, ExplainSettings(methods=("Gradient",)))
    prepare = (time.perf_counter() - started) / len(names)
    one = Dataset(root, subset.table[:1])
    per_method, tables, whole = {}, [], {}
    for method in METHOD_NAMES:
        settings = ExplainSettings(methods=(method,))
        started = time.perf_counter()
        extract_scores(ExtractionPlan(one, classifiers, "test"), settings)
        single = time.perf_counter() - started
        started = time.perf_counter()
        tables.append(extract_scores(ExtractionPlan(subset, classifiers, "test"), settings))
        whole[method] = time.perf_counter() - started
        # the marginal cost of a face: a call's fixed costs cancel, and the face's preparation is taken out
        per_method[method] = max((whole[method] - single) / max(len(names) - 1, 1) - prepare, 0.0)
        print(f"  {method:28s} {per_method[method]:.3f} s/image ({whole[method]:.1f} s for all)", flush=True)
    write_score_table(pl.concat(tables), DatasetLayout(root).results / "scores-sample15.parquet")
    return {
        "faces": len(names),
        "prepare_s_per_image": prepare,
        "s_per_image": per_method,
        "seconds_for_the_sample": whole,
    }


def pass_times(architecture: str, size: int, batch: int = 8, repeats: int = 3) -> tuple[float, float]:
    """(forward, forward+backward) seconds per image of an untrained network, best of ``repeats``."""
    torch.manual_seed(0)
    model = build_resnet(architecture, 12).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(batch, 3, size, size)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        inputs = x.clone().requires_grad_(True)
        torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)

    def best(run: Callable[[], None]) -> float:
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times) / batch

    return best(forward), best(forward_backward)


def floor(method: str, size: int, forward: float, forward_backward: float) -> float:
    n_forward, n_backward = method_passes(method, size=size)
    return n_backward * forward_backward + (n_forward - n_backward) * forward


def projection(costs: dict, held_out: int, size: int) -> dict:
    """Hours of the full fifteen-method run over ``held_out`` maps: at the rehearsal's recipe, and for
    ResNet-50 at 224 px (each method's floor there times its measured overhead over its floor here)."""
    small = pass_times("resnet18", size)
    large = pass_times("resnet50", 224)
    rows = {}
    for method, seconds in costs["s_per_image"].items():
        overhead = seconds / floor(method, size, *small)
        rows[method] = {
            "resnet18_s": seconds,
            "overhead": overhead,
            "resnet50_224_s": floor(method, 224, *large) * overhead,
        }
    prepare = costs["prepare_s_per_image"]
    total_small = held_out * (prepare + sum(r["resnet18_s"] for r in rows.values()))
    total_large = held_out * (prepare + sum(r["resnet50_224_s"] for r in rows.values()))
    return {
        "held_out_maps_per_method": held_out,
        "pass_times_resnet18": small,
        "pass_times_resnet50_224": large,
        "methods": rows,
        "hours_resnet18": total_small / 3600,
        "hours_resnet50_224": total_large / 3600,
        "hours_resnet50_224_without_occlusion": (total_large - held_out * rows["Occlusion"]["resnet50_224_s"]) / 3600,
    }


def dashboard_times(root: Path, fold: str) -> dict:
    """Seconds to each page's first render on the twin, in one AppTest session (Explain first)."""
    from streamlit.testing.v1 import AppTest

    dataset = open_dataset(root)
    times, problems = {}, []
    # Cold: a train face nobody explained yet (four attributions computed); then warm: an extracted test face.
    for split, key in (("train", "views/explain.py (cold face)"), ("test", "views/explain.py")):
        image = names_in(dataset, fold, split)[0]
        app = AppTest.from_file(str(APP), default_timeout=900)
        app.query_params.update(
            {"model": f"classifier-{fold}", "methods": list(QUICK_METHODS), "split": split, "image": image}
        )
        started = time.perf_counter()
        app.run()
        times[key] = time.perf_counter() - started
        problems += [f"{key}: {e.value}" for e in app.exception]
    for page in PAGES:
        started = time.perf_counter()
        app.switch_page(page).run()
        times[page] = time.perf_counter() - started
        problems += [f"{page}: {e.value}" for e in app.exception]
    return {"seconds": times, "problems": problems}


def rq2_against_leaderboard(root: Path) -> pl.DataFrame:
    """Per method: its leaderboard row, Table 4's rho per region (the raters' counts of every term, as
    RQ2 runs), and rho against the known truth (the raters' counts of the terms the twin drew)."""
    from core.annotations import read_annotations
    from core.hpo import region_counts
    from core.stats import hpo_correlation
    from core.synth.phenotypes import drawable_phenotypes

    table4 = pl.read_csv(root / "results" / "rq2-table4.csv")
    raters = table4.pivot(on="region", index="method", values="rho_mean")
    drawn_names = {phenotype.term.name for phenotype in drawable_phenotypes().values()}
    annotations = read_annotations(root)
    scores = pl.read_parquet(DatasetLayout(root).score_table("test"))
    drawn = hpo_correlation(scores, region_counts(annotations.filter(pl.col("term").is_in(drawn_names))))
    truth = drawn.summary.pivot(on="region", index="method", values="rho_mean")
    truth = truth.rename({c: f"{c} (drawn)" for c in truth.columns if c != "method"})
    board = pl.read_csv(DatasetLayout(root).leaderboard)
    ranked = board.select("method", "hit_rate", "rho_mean").rename({"rho_mean": "leaderboard_rho"})
    return (
        ranked.join(raters, on="method", how="left")
        .join(truth, on="method", how="left")
        .sort("hit_rate", descending=True)
    )


def markdown(rehearsal: Rehearsal) -> str:
    lines = ["| stage | wall time | load 1/5/15 min at start | at end | note |", "| --- | ---: | --- | --- | --- |"]
    for s in rehearsal.stages:
        lines.append(
            f"| {s.name} | {s.seconds / 60:.1f} min ({s.seconds:.0f} s) | {' '.join(f'{x:.1f}' for x in s.load_start)} "
            f"| {' '.join(f'{x:.1f}' for x in s.load_end)} | {s.note} |"
        )
    total = sum(s.seconds for s in rehearsal.stages)
    lines.append(f"| **total** | {total / 60:.1f} min | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, default=RELEASE, help="the release's metadata folder's parent")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "twin", help="the twin (deleted first)")
    parser.add_argument("--rows", type=int, help="a slice of the release (default: every row)")
    parser.add_argument("--folds", default="fold-1,fold-2,fold-3,fold-4,fold-5", help="folds to train")
    parser.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    parser.add_argument("--sample", type=int, default=20, help="test faces for the fifteen-method sample")
    parser.add_argument("--bench-limit", type=int, default=60, help="test faces of the leaderboard")
    parser.add_argument(
        "--rq2-methods", default=",".join(RQ2_METHODS), help="methods on the annotated test faces (RQ2, leaderboard)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the twin and its trained models in --out: run the stages after train",
    )
    args = parser.parse_args()
    quiet_library_warnings()
    if args.out.exists() and not args.resume:
        shutil.rmtree(args.out)
    r = Rehearsal(args)
    root, folds = str(args.out), args.folds.split(",")
    quick = ",".join(QUICK_METHODS)
    r.facts |= {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "folds": folds}
    r.facts["command"] = " ".join(sys.argv)

    twin = ["twin", str(args.release), root, "--workers", str(args.workers)]
    if not args.resume:
        r.stage("twin", lambda: r.cli(*twin, *(["--rows", str(args.rows)] if args.rows else [])))
    dataset = open_dataset(args.out)
    held_out = {fold: len(names_in(dataset, fold, "val")) + len(names_in(dataset, fold, "test")) for fold in folds}
    r.facts |= {"images": dataset.table.height, "held_out_per_fold": held_out}
    if not args.resume:
        r.stage("train", lambda: r.cli("train", root, "--folds", args.folds, *train_flags(args.epochs)))
        r.facts["table2"] = pl.read_csv(DatasetLayout(args.out).table2).to_dicts()
    r.stage(
        "extract val (4 quick methods)", lambda: r.cli("extract", root, "--split", "val", "--methods", quick, "--quiet")
    )
    rq2 = args.rq2_methods
    r.stage(
        f"extract test ({len(rq2.split(','))} methods)",
        lambda: r.cli("extract", root, "--split", "test", "--methods", rq2, "--quiet"),
    )
    costs: dict = {}
    r.stage(
        "sample: 15 methods",
        lambda: (
            costs.update(sample_costs(args.out, folds[0], args.sample))
            or f"{costs['faces']} faces, fold model {folds[0]}"
        ),
    )
    r.stage("rq1", lambda: r.cli("rq1", f"{root}/results/scores-val.parquet"))
    r.stage("rq2", lambda: r.cli("rq2", f"{root}/results/scores-test.parquet", "--dataset", root))
    bench = ["benchmark", root, "--limit", str(args.bench_limit), "--methods", rq2, "--quiet"]
    r.stage("benchmark", lambda: r.cli(*bench) or f"{args.bench_limit} test faces")
    dashboard: dict = {}
    r.stage("dashboard (AppTest, 4 pages)", lambda: dashboard.update(dashboard_times(args.out, folds[0])) or "")
    full_held_out = sum(len(names_in(dataset, f, "val")) + len(names_in(dataset, f, "test")) for f in dataset.folds)
    size = DemoPreset().classifier.input_size
    r.facts |= {
        "sample": costs,
        "dashboard": dashboard,
        "projection": projection(costs, full_held_out, size),
        "rq2_vs_leaderboard": rq2_against_leaderboard(args.out).to_dicts(),
        "stages": [dataclasses.asdict(s) for s in r.stages],
    }
    table = markdown(r)
    with pl.Config(tbl_rows=40, tbl_cols=12, float_precision=3, tbl_width_chars=160):
        print("\n" + table)
        print(pl.DataFrame(r.facts["rq2_vs_leaderboard"]))
    p = r.facts["projection"]
    print(
        f"\nprojected full fifteen-method run over {full_held_out} held-out maps per method (5 folds): "
        f"{p['hours_resnet18']:.1f} h at ResNet-18 112 px, {p['hours_resnet50_224']:.1f} h at ResNet-50 224 px "
        f"({p['hours_resnet50_224_without_occlusion']:.1f} h without Occlusion)"
    )
    print(f"dashboard first renders: {dashboard}")
    (args.out / "rehearsal.json").write_text(json.dumps(r.facts, indent=2, default=str))
    (args.out / "rehearsal.md").write_text(table + "\n")
    print(f"written to {args.out}/rehearsal.json and rehearsal.md")


if __name__ == "__main__":
    main()
