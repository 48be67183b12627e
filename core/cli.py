"""``python -m core <command>``: the same functions the dashboard calls, over files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import numpy as np

from core.errors import UserFacingError
from core.library_warnings import quiet_library_warnings, warnings_without_data

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_USER_ERROR = 2
Config = typing.TypeVar("Config", bound="DataclassInstance")


def _landmarks(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("landmarks must be ten numbers: x1,y1,x2,y2,…,x5,y5") from None
    if len(values) != 10:
        raise argparse.ArgumentTypeError(f"landmarks must be ten numbers x1,y1,…,x5,y5; got {len(values)}")
    return np.array(values).reshape(5, 2)


def _methods(text: str) -> list[str]:
    from core.attribute import METHOD_NAMES

    if text == "all":
        return list(METHOD_NAMES)
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}"
        )
    return chosen


def _progress(method: str, done: int, total: int) -> None:
    if method != "done":
        print(f"[{done + 1}/{total}] {method}", file=sys.stderr, flush=True)


def _classifier_card(path: Path | None) -> Path:
    from core.layout import DatasetLayout, demo_dataset

    if path is not None:
        return path
    cards = DatasetLayout(demo_dataset()).classifier_cards()
    if not cards:
        raise UserFacingError(
            "No model given and no demo model has been built yet. Pass --model path/to/card.json "
            "(see README, 'Bring your own model')."
        )
    return cards[0]


def _settings(args: argparse.Namespace, split: str | None = None, **fixed):
    """The pipeline's settings from the flags a command has (methods, regions, mode, parser, target, batch
    size), under its ``--profile`` (``core.profiles.apply``: the mode of RQ1's or RQ2's ``split`` unless
    ``--mode`` is given)."""
    from core.pipeline import ExplainSettings
    from core.profiles import apply, profile
    from core.regions import PAPER_REGIONS, RegionSpec
    from models.parser import load_face_parser

    regions = getattr(args, "regions", None)
    parser = getattr(args, "parser", None)
    device = _device(args)
    chosen = {
        "methods": tuple(args.methods),
        "spec": PAPER_REGIONS if regions is None else RegionSpec.from_json(_read_text(regions, "region spec")),
        "mode": getattr(args, "mode", None) or "abs",
        "parser": None if parser is None else load_face_parser(parser, device=device),
        "target": {None: "predicted", "true": "label"}.get(
            getattr(args, "target", None), getattr(args, "target", None)
        ),
        "batch_size": getattr(args, "batch_size", 16),
        "landmark_parser": getattr(args, "landmark_parser", "landmarks68"),
        "detector_device": device,
    }
    settings = ExplainSettings(**{**chosen, **fixed})
    mode = fixed.get("mode") or getattr(args, "mode", None)
    return apply(settings, profile(getattr(args, "profile", "project")), split=split, mode=mode)


def command_explain(args: argparse.Namespace) -> int:
    from cache import DiskCache
    from core.dataset import Photo
    from core.explain import explain
    from core.imageio import load_image_and_scale, load_label_map
    from core.parse import resize_label_map
    from models.checkpoint import load_classifier

    # A photo over 4096 px is shrunk on loading: the user's landmarks and a label map of the photo's size
    # (both in the file's pixels) shrink with it, and the landmarks printed are in the file's pixels again.
    image, factors = load_image_and_scale(args.image)
    stored_map = None if args.segmap is None else load_label_map(args.segmap)
    file_shape = tuple(round(n) for n in np.array(image.shape[:2]) / factors[::-1])
    if stored_map is not None and stored_map.shape == file_shape != image.shape[:2]:
        stored_map = resize_label_map(stored_map, image.shape[:2])
    classifier = load_classifier(_classifier_card(args.model), device=_device(args))
    landmarks = None if args.landmarks is None else args.landmarks * factors
    result = explain(
        Photo(image, landmarks, stored_map),
        classifier,
        _settings(args),
        DiskCache() if args.cache else None,
        None if args.quiet else _progress,
    )
    summary = {
        "image": str(args.image),
        "model": str(_classifier_card(args.model)),
        **result.summary(),
        "landmarks": np.round(result.face.landmarks / factors, 2).tolist(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise UserFacingError(f"cannot read the {what} {path}: {error.strerror}") from None


def command_train(args: argparse.Namespace) -> int:
    from core.dataset import open_dataset
    from core.fit_domain import fit_domain
    from core.layout import demo_dataset
    from core.train import TrainConfig, table2, train_fold, training_faces

    dataset = open_dataset(args.dataset or demo_dataset())
    config = config_from_args(TrainConfig, args)
    out = Path(args.out or dataset.layout.models)
    folds = args.folds.split(",") if args.folds else list(dataset.folds)
    print(f"aligning {dataset.table.height} faces at {config.input_size} px …", file=sys.stderr)
    dataset, faces = training_faces(dataset, config.input_size)  # less the photos that cannot be read
    names = dataset.table["image_name"].to_list()
    position = {n: i for i, n in enumerate(names)}
    results = []
    for fold in folds:
        result = train_fold(
            dataset,
            fold,
            config,
            out,
            lambda subset: faces[[position[n] for n in subset]],
            log=lambda line: print(line, file=sys.stderr),
            device=_device(args),
        )
        print(
            f"{fold}: best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.3f}"
            + (f", test accuracy {result.test_accuracy:.3f}" if result.test_accuracy is not None else "")
            + f" ({result.seconds:.0f} s) -> {result.card_path}",
            file=sys.stderr,
        )
        results.append(result)
        fitted = fit_domain(
            result.card_path, dataset, fold, lambda subset: faces[[position[n] for n in subset]], device=_device(args)
        )
        print(f"{fold}: out-of-domain guard -> {fitted.path.name} {json.dumps(fitted.summary())}", file=sys.stderr)
    table = table2(results)
    table.write_csv(out / "table2.csv")
    print(table)
    return 0


def command_fit_domain(args: argparse.Namespace) -> int:
    from cache import DiskCache
    from core.dataset import open_dataset
    from core.fit_domain import fit_domain

    fitted = fit_domain(
        args.card,
        open_dataset(args.dataset),
        args.fold,
        cache=DiskCache() if args.cache else None,
        device=_device(args),
    )
    print(json.dumps({"card": str(args.card), **fitted.summary()}, indent=2))
    return 0


def command_table2(args: argparse.Namespace) -> int:
    from core.train import table2_from_scores

    table = table2_from_scores(_read_score_table(args.scores))
    out = args.out or args.scores.parent / "table2.csv"
    table.write_csv(out)
    print(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


def command_train_parser(args: argparse.Namespace) -> int:
    from core.dataset import open_dataset
    from core.train_parser import ParserConfig, train_face_parser

    dataset = open_dataset(args.dataset)
    config = config_from_args(ParserConfig, args)
    result = train_face_parser(
        dataset,
        config,
        Path(args.out or dataset.layout.models),
        log=lambda line: print(line, file=sys.stderr),
        device=_device(args),
    )
    result.iou.write_csv(result.card_path.with_name("parser-iou.csv"))
    print(result.iou)
    print(f"mean IoU {result.mean_iou:.3f} on {config.held_out_fraction:.0%} held-out faces -> {result.card_path}")
    return 0


def command_import_model(args: argparse.Namespace) -> int:
    from models.released import import_released_model

    imported = import_released_model(args.checkpoint, args.out, args.fold)
    print(f"{imported.fold}: {imported.checkpoint.name} -> {imported.card_path}", file=sys.stderr)
    if imported.tied_with:
        print(
            f"  tied with {', '.join(p.name for p in imported.tied_with)}: the earliest epoch was taken "
            "(their test.py took whichever its file listing gave first)",
            file=sys.stderr,
        )
    print(imported.card_path)
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from cache import DiskCache
    from core.demo import build_demo

    report = build_demo(
        args.root, log=lambda line: print(line, file=sys.stderr, flush=True), cache=DiskCache(), device=_device(args)
    )
    if report["stages"]:
        print(json.dumps(report, indent=2))
    return 0


def command_twin(args: argparse.Namespace) -> int:
    from core.synth.twin import TwinSpec, generate_twin

    summary = generate_twin(args.release, args.out, TwinSpec(seed=args.seed, rows=args.rows), workers=args.workers)
    print(
        f"{summary.images} photos ({summary.annotated_images} annotated) in {summary.seconds:.0f} s "
        f"({summary.images_per_second:.1f}/s, {summary.workers} workers) -> {summary.root}",
        file=sys.stderr,
    )
    return 0


def command_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cache import DiskCache
    from core.dataset import open_dataset
    from core.extract import ExtractionPlan, extract_scores
    from core.layout import demo_dataset
    from core.relevance_store import RelevanceStore
    from core.score_table import write_score_table

    if args.engine != "ray" and (args.address or args.actors):
        raise UserFacingError("--address and --actors go with --engine ray")
    dataset = open_dataset(args.dataset or demo_dataset())
    cards = [Path(c.strip()) for c in args.models.split(",") if c.strip()] if args.models else None
    classifiers = _fold_classifiers(dataset, cards, args.folds, _device(args))
    settings = _settings(args, split=args.split)
    store = None if args.no_store else RelevanceStore(args.store or dataset.layout.plain_relevance_store(args.split))
    with tqdm(total=0, unit="map", desc="extract", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:

        def progress(done: int, total: int, what: str) -> None:
            bar.total = total
            bar.set_postfix_str(what, refresh=False)
            bar.update(done - bar.n)

        plan = ExtractionPlan(dataset, classifiers, args.split)
        cache = None if args.no_cache else DiskCache()
        if args.engine == "ray":  # only then is Ray imported
            from core.extract_ray import extract_scores_ray

            table = extract_scores_ray(plan, settings, cache, store, progress, address=args.address, actors=args.actors)
        else:
            table = extract_scores(plan, settings, cache=cache, store=store, progress=progress)
    out = write_score_table(table, args.out or dataset.layout.plain_score_table(args.split))
    print(
        f"{table.height} rows ({table['image_name'].n_unique()} images × {len(classifiers)} model(s) × "
        f"{len(settings.methods)} method(s) × {len(settings.spec.regions)} regions) -> {out}"
        + ("" if store is None else f"; relevance maps in {store.root}"),
        file=sys.stderr,
    )
    return 0


def _fold_classifiers(dataset, cards: list[Path] | None, folds: str | None, device: str = "cpu") -> dict:
    """The classifiers to extract with: the cards given (default: the dataset's fold models), of ``folds``,
    on ``device``."""
    from core.extract import load_classifiers

    cards = cards or dataset.layout.classifier_cards()
    if not cards:
        raise UserFacingError(f"no --models given and {dataset.layout.models} holds no classifier-fold-*.json card")
    classifiers = load_classifiers(cards, device)
    if folds:
        wanted = {f.strip() for f in folds.split(",") if f.strip()}
        classifiers = {name: c for name, c in classifiers.items() if c.card.fold in wanted}
        if not classifiers:
            raise UserFacingError(f"none of the models belongs to fold(s) {', '.join(sorted(wanted))}")
    return classifiers


def _read_score_table(path: Path):
    import polars as pl

    try:
        return pl.read_parquet(path)
    except FileNotFoundError:
        raise UserFacingError(f"score table {path} does not exist; write one with python -m core extract") from None
    except (pl.exceptions.PolarsError, OSError) as error:
        raise UserFacingError(f"{path}: not a readable Parquet score table ({error})") from None


def _labels(scores) -> list[str]:
    return scores["label"].drop_nulls().unique().to_list() if "label" in scores.columns else []


def _write_tables(out: Path, tables: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.write_csv(out / name)
    print(f"written to {out}: {', '.join(tables)}", file=sys.stderr)


def command_rq1(args: argparse.Namespace) -> int:
    import polars as pl

    from core.profiles import profile
    from core.stats import compare_groups, domain_counts, in_domain, significance_counts

    scores = _read_score_table(args.scores)
    if args.exclude_out_of_domain:
        flagged, judged = domain_counts(scores)
        print(f"note: {flagged} of {judged} faces out of domain, left out", file=sys.stderr)
        scores = in_domain(scores)
    chosen = profile(args.profile)
    options = chosen.rq1_options(_labels(scores), args.reference)
    if options and chosen.missing_syndromes(_labels(scores)):
        print(
            f"note: the score table has no {', '.join(chosen.missing_syndromes(_labels(scores)))}; the {chosen.name} "
            "profile's family is the rest",
            file=sys.stderr,
        )
    if args.syndromes:
        options["syndromes"] = [s.strip() for s in args.syndromes.split(",") if s.strip()]
    tests = compare_groups(
        scores,
        reference=args.reference,
        alpha=args.alpha,
        correction=args.correction,
        ttest=args.ttest,
        model=args.model,
        **options,
    )
    table3 = significance_counts(tests)
    with pl.Config(tbl_rows=200, tbl_cols=20, float_precision=4, tbl_width_chars=200, fmt_str_lengths=60):
        print(
            tests.select(
                "method",
                "syndrome",
                "region",
                "n_syndrome",
                "n_reference",
                "test",
                "p",
                "p_corrected",
                "significant",
                "cohens_d",
                "note",
            )
        )
        print(
            f"Table 3: significant methods per region and syndrome ({args.correction}, alpha {args.alpha}, "
            f"vs {args.reference})"
        )
        print(table3)
    _write_tables(args.out or args.scores.parent, {"rq1-tests.csv": tests, "rq1-table3.csv": table3})
    return 0


def _annotated_dataset(scores: Path, dataset: Path | None) -> Path:
    """The dataset whose annotations go with the scores: given, or the one holding ``results/scores-*.parquet``."""
    if dataset is not None:
        return dataset
    from core.layout import DatasetLayout

    guess = scores.resolve().parent.parent
    if DatasetLayout(guess).annotations.is_dir():
        return guess
    raise UserFacingError(
        f"{scores} does not lie in <dataset>/results/; pass --dataset, the folder whose "
        "metadata/hpo-annotations/ (or the release's metadata/annotated-hpo-terms/) annotates the scored images"
    )


def command_rq2(args: argparse.Namespace) -> int:
    import polars as pl

    from core.annotations import load_annotations
    from core.hpo import region_counts, term_syndrome_chi2, term_tsne
    from core.profiles import profile
    from core.stats import hpo_correlation, table4_wide

    chosen = profile(args.profile)
    scores = _read_score_table(args.scores)
    annotated = _annotated_dataset(args.scores, args.dataset)
    read = load_annotations(annotated, strict=args.strict)
    if read.note:
        print(f"warning: {read.note}", file=sys.stderr)
    annotations = figure4 = read.table
    if chosen.figure4_keep_unlisted and read.unlisted:  # the published Figure 4 counted them (not strict here)
        figure4 = load_annotations(annotated, keep_unlisted=True).table
        print(f"note: the {chosen.name} profile's Figure 4 keeps them, as the published figure did", file=sys.stderr)
    result = hpo_correlation(scores, region_counts(annotations, **chosen.region_count_options()))
    chi2 = term_syndrome_chi2(figure4, **chosen.chi2_options())
    with pl.Config(tbl_rows=200, tbl_cols=20, float_precision=3, tbl_width_chars=200, fmt_str_lengths=60):
        print(result.per_model)
        print("Table 4: Spearman rho between C_i and the HPO count of the region, mean (std) over models")
        print(table4_wide(result.summary))
        tested = chi2.filter(pl.col("chi2").is_not_null()).sort("chi2", descending=True)
        print(
            f"Figure 4b: chi2 of each HPO term against the syndrome ({len(chi2) - len(tested)} terms never or "
            "always marked: no test)"
        )
        print(tested)
    _write_tables(
        args.out or args.scores.parent,
        {
            "rq2-per-model.csv": result.per_model,
            "rq2-table4.csv": result.summary,
            "rq2-figure4b-chi2.csv": chi2,
            "rq2-figure4a-tsne.csv": term_tsne(figure4, seed=args.seed, **chosen.tsne_options()),
        },
    )
    return 0


def command_benchmark(args: argparse.Namespace) -> int:
    from cache import DiskCache
    from core.dataset import evenly_spaced, names_in
    from core.leaderboard import leaderboard

    dataset, classifier = _dataset_and_classifier(args)
    if not dataset.layout.ground_truth.is_file():
        raise UserFacingError(
            f"{dataset.root} has no metadata/ground_truth.csv: the leaderboard needs planted "
            "phenotypes, i.e. a synthetic dataset (python -m core demo)"
        )
    names = evenly_spaced(names_in(dataset, classifier.card.fold or dataset.folds[0], "test"), args.limit)

    def progress(method: str, m: int, total: int) -> None:
        print(f"[{m + 1}/{total}] {method}: {len(names)} faces", file=sys.stderr, flush=True)

    table = leaderboard(
        dataset,
        classifier,
        names,
        _settings(args),
        DiskCache() if args.cache else None,
        None if args.quiet else progress,
    )
    out = Path(args.out or dataset.layout.leaderboard)
    table.write_csv(out)
    _print_table(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


def _dataset_and_classifier(args: argparse.Namespace):
    """The dataset (default: the demo) and the classifier (default: the dataset's first fold model)."""
    from core.dataset import open_dataset
    from core.layout import demo_dataset
    from models.checkpoint import load_classifier

    dataset = open_dataset(args.dataset or demo_dataset())
    cards = dataset.layout.classifier_cards()
    if args.model is None and not cards:
        raise UserFacingError(f"no --model given and {dataset.layout.models} holds no classifier-fold-*.json card")
    return dataset, load_classifier(args.model or cards[0], device=_device(args))


def _faces_to_check(args: argparse.Namespace, dataset, classifier):
    """The split's faces (a ``FaceSet``), the settings and the cache of a faithfulness or sanity check."""
    from cache import DiskCache
    from core.dataset import evenly_spaced, names_in
    from core.pipeline import dataset_face_set

    fold = classifier.card.fold or (dataset.folds[0] if dataset.folds else "fold-1")
    names = evenly_spaced(names_in(dataset, fold, args.split), args.limit)
    if not names:
        raise UserFacingError(f"{dataset.root}: no {args.split} images in {fold}")
    settings = _settings(args)
    cache = DiskCache() if args.cache else None
    if not args.quiet:
        print(f"aligning and parsing {len(names)} {args.split} faces of {fold} …", file=sys.stderr, flush=True)
    faces = dataset_face_set(dataset, names, classifier.card.input_size, settings, cache)
    if settings.target == "label":
        unknown = sorted(set(faces.labels or ()) - set(classifier.card.classes))
        if unknown:
            raise UserFacingError(f"label(s) {', '.join(unknown)} are not classes of the model; use --target predicted")
    return faces, settings, cache


def _print_table(table) -> None:
    import polars as pl

    with pl.Config(tbl_rows=100, tbl_cols=20, float_precision=3, tbl_width_chars=200):
        print(table)


def command_faithfulness(args: argparse.Namespace) -> int:
    import polars as pl

    from core.faithfulness import region_faithfulness

    dataset, classifier = _dataset_and_classifier(args)
    faces, settings, cache = _faces_to_check(args, dataset, classifier)
    result = region_faithfulness(classifier, faces, settings, args.blank, cache, None if args.quiet else _progress)
    summary = result.summary.with_columns(blank=pl.lit(args.blank))
    out = Path(args.out or dataset.layout.faithfulness_table(args.blank, args.split))
    out.parent.mkdir(parents=True, exist_ok=True)
    summary.write_csv(out)
    drops_path = out.with_name(f"{out.stem}-drops.csv")
    result.drops.write_csv(drops_path)
    _print_table(summary)
    print(f"written to {out} and {drops_path}", file=sys.stderr)
    return 0


def command_sanity(args: argparse.Namespace) -> int:
    from core.faithfulness import Cascade, check_layers, randomisation_check

    dataset, classifier = _dataset_and_classifier(args)
    cascade = [layer.strip() for layer in args.cascade.split(",") if layer.strip()]
    check_layers(classifier, cascade)  # before the faces are read
    faces, settings, cache = _faces_to_check(args, dataset, classifier)
    result = randomisation_check(
        classifier, faces, settings, Cascade(tuple(cascade), args.seed), cache, None if args.quiet else _progress
    )
    out = Path(args.out or dataset.layout.sanity_table(args.split))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.summary.write_csv(out)
    per_image_path = out.with_name(f"{out.stem}-per-image.csv")
    result.per_image.write_csv(per_image_path)
    _print_table(result.summary)
    print(f"written to {out} and {per_image_path}", file=sys.stderr)
    return 0


def add_config_flags(command: argparse.ArgumentParser, config_type: type[DataclassInstance]) -> None:
    """A flag per field of the dataclass ``config_type`` (``--input-size`` for ``input_size``), with the field's
    ``metadata`` help and choices; an unset flag stays None, so the dataclass's own default applies."""
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        if hints[field.name] is bool:
            _add_switch(command, field)
        else:
            command.add_argument(
                f"--{field.name.replace('_', '-')}",
                dest=field.name,
                type=_flag_type(hints[field.name]),
                choices=field.metadata.get("choices"),
                metavar=field.metadata.get("metavar"),
                help=_field_help(field),
            )


def _add_switch(command: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """``--no-flip`` for a field that is on by default, ``--flip`` for one that is off."""
    turn_on = not field.default
    name = field.name.replace("_", "-")
    what = field.metadata.get("help", name).replace("%", "%%")
    command.add_argument(
        f"--{name}" if turn_on else f"--no-{name}",
        dest=field.name,
        action="store_const",
        const=turn_on,
        help=f"turn {'on' if turn_on else 'off'} {what}",
    )


def _flag_type(hint: object) -> type:
    """What argparse converts a flag's text to: ``int`` for ``int``, ``str`` for ``str | None``."""
    kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
    if len(kinds) != 1 or not isinstance(kinds[0], type):
        raise TypeError(f"no command-line flag for a field of type {hint}")
    return kinds[0]


def _field_help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    if field.default is not None and field.default is not dataclasses.MISSING:
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def config_from_args(config_type: type[Config], args: argparse.Namespace) -> Config:
    """``config_type`` with the values of the flags given; the dataclass's defaults for the others."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config_type)
        if getattr(args, field.name, None) is not None
    }
    return config_type(**given)


def build_parser() -> argparse.ArgumentParser:
    # "python -m core" when run as a module; the console script's own name (face-xai) otherwise.
    prog = "python -m core" if Path(sys.argv[0]).name == "__main__.py" else None
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        _add_explain,
        _add_train,
        _add_fit_domain,
        _add_train_parser,
        _add_import_model,
        _add_table2,
        _add_benchmark,
        _add_checks,
        _add_extract,
        _add_worker,
        _add_demo,
        _add_rq1,
        _add_rq2,
        _add_twin,
        _add_prune_specs,
    ):
        add_command(commands)
    return parser


def _device(args: argparse.Namespace) -> str:
    """The command's ``--device`` resolved (``core.devices.resolve_device``: auto = the first GPU, else the
    CPU); ``cpu`` for a command without the flag."""
    from core.devices import resolve_device

    return str(resolve_device(getattr(args, "device", "cpu"), "--device"))


def _add_device(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--device",
        default="auto",
        help="where the networks run: auto (default: the first GPU if PyTorch sees one, else the CPU), cpu, "
        "cuda or cuda:N (README 'Running on a GPU')",
    )


def _add_methods(command: argparse.ArgumentParser) -> None:
    command.add_argument("--methods", type=_methods, default="all", help="comma-separated method names, or 'all'")


def _add_regions(command: argparse.ArgumentParser) -> None:
    command.add_argument("--regions", type=Path, help="region spec JSON (default: the paper's eye, nose, mouth)")


def _add_mode(command: argparse.ArgumentParser) -> None:
    from core.score import RELEVANCE_MODES

    command.add_argument(
        "--mode",
        choices=RELEVANCE_MODES,
        help="relevance map (default: abs, min–max per image; with --profile paper, extract uses abs-raw for "
        "split val, as the released code's Table 3)",
    )


def _add_profile(command: argparse.ArgumentParser) -> None:
    from core.profiles import PROFILE_NAMES

    command.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        default="project",
        help="project (default): this project's choices; paper: the released code's where they differ "
        "(README 'Fidelity profiles', docs/DECISIONS.md 'Issue 11')",
    )


def _add_landmark_parser(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--landmark-parser",
        choices=("landmarks68", "template"),  # core.pipeline.LANDMARK_PARSERS, without importing torch here
        default="landmarks68",
        help="parts of a face with neither a stored label map nor --parser: dlib's 68 landmarks (default; the "
        "template when dlib is missing) or the five-point template (README 'Real faces': the 68-point model "
        "is not for commercial use)",
    )


def _add_explain(commands: Subcommands) -> None:
    explain = commands.add_parser("explain", help="one photo -> JSON: landmarks, prediction, region scores per method")
    explain.add_argument("image", type=Path)
    explain.add_argument(
        "--landmarks", type=_landmarks, help="x1,y1,…,x5,y5 in the photo file's pixels (skips face detection)"
    )
    explain.add_argument("--model", type=Path, help="classifier model card (JSON); default: the demo's fold-1 model")
    _add_methods(explain)
    _add_regions(explain)
    explain.add_argument(
        "--parser",
        type=Path,
        help="face parser model card (JSON); default: parts drawn from dlib's 68 landmarks (--landmark-parser)",
    )
    _add_landmark_parser(explain)
    explain.add_argument(
        "--segmap",
        type=Path,
        help="stored LaPa label map (PNG) of the photo (its size) or of the aligned face (square)",
    )
    explain.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    _add_mode(explain)
    _add_profile(explain)
    explain.add_argument("--cache", action="store_true", help="memoise results on disk (XAI_CACHE_DIR); off by default")
    _add_device(explain)
    explain.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    explain.set_defaults(run=command_explain)


def _add_train(commands: Subcommands) -> None:
    from core.train import TrainConfig

    train = commands.add_parser(
        "train",
        help="fine-tune a classifier per fold and write Table 2 (--vggface2 PATH: exactly the paper's recipe)",
        epilog=(
            f"Defaults: the paper's numbers, {TrainConfig()}. Without --vggface2 the network starts from random "
            "weights (or --init) and is fed RGB 0..1 normalised by the training pixels' mean and std. With "
            "--vggface2 resnet50_ft_weight.pkl it is the authors' train.py: the VGGFace2 Caffe ResNet-50 "
            "(resnet50-caffe) with a new head, BGR 0..255 minus the fold's BGR training mean, no std, the stem's "
            "batch norm out of the optimiser. Photos that cannot be read are left out with one warning."
        ),
    )
    train.add_argument("dataset", nargs="?", type=Path, help="dataset folder (default: the demo dataset)")
    train.add_argument("--out", type=Path, help="where checkpoints and cards go (default: <dataset>/models)")
    train.add_argument("--folds", help="comma-separated folds (default: all in partitions.csv)")
    add_config_flags(train, TrainConfig)
    _add_device(train)
    train.set_defaults(run=command_train)


def _add_fit_domain(commands: Subcommands) -> None:
    fit = commands.add_parser(
        "fit-domain",
        help="fit a classifier's out-of-domain guard on a dataset fold and store it beside the card",
        description="Class-conditional Gaussians with a shared (Ledoit-Wolf) covariance on the classifier's "
        "penultimate features of the fold's train faces; threshold: the 99th percentile of its val faces' "
        "Mahalanobis scores. Written to <card>.domain.safetensors; explain and extract then report the score.",
    )
    fit.add_argument("card", type=Path, help="classifier card (JSON)")
    fit.add_argument("dataset", type=Path, help="dataset folder with landmarks in partitions.csv")
    fit.add_argument("--fold", help="fold whose train/val faces to fit on (default: the card's fold)")
    fit.add_argument("--cache", action="store_true", help="memoise the features on disk (XAI_CACHE_DIR)")
    _add_device(fit)
    fit.set_defaults(run=command_fit_domain)


def _add_train_parser(commands: Subcommands) -> None:
    from core.train_parser import ParserConfig

    parser_training = commands.add_parser("train-parser", help="train the SMP face parser on stored label maps")
    parser_training.add_argument("dataset", type=Path, help="dataset folder with features/segmaps/")
    parser_training.add_argument("--out", type=Path, help="where the parser goes (default: <dataset>/models)")
    add_config_flags(parser_training, ParserConfig)
    _add_device(parser_training)
    parser_training.set_defaults(run=command_train_parser)


def _add_benchmark(commands: Subcommands) -> None:
    benchmark = commands.add_parser("benchmark", help="ground-truth leaderboard of the methods on synthetic faces")
    benchmark.add_argument("dataset", nargs="?", type=Path, help="synthetic dataset (default: the demo)")
    benchmark.add_argument("--model", type=Path, help="classifier card (default: the dataset's first fold model)")
    _add_methods(benchmark)
    _add_profile(benchmark)
    benchmark.add_argument("--limit", type=int, help="use N test faces, evenly spaced over the split")
    benchmark.add_argument("--out", type=Path, help="CSV path (default: <dataset>/models/leaderboard.csv)")
    benchmark.add_argument("--cache", action="store_true", help="memoise attributions on disk")
    _add_device(benchmark)
    benchmark.add_argument("--quiet", action="store_true")
    benchmark.set_defaults(run=command_benchmark)


def _add_checks(commands: Subcommands) -> None:
    from core.faithfulness import BLANK_MODES, CASCADE, CHANGED_BELOW

    faithfulness = commands.add_parser(
        "faithfulness", help="blank each face region: Spearman ρ between C_i and the drop in the target's probability"
    )
    sanity = commands.add_parser(
        "sanity", help="model randomisation (Adebayo et al. 2018): do the maps change when the top layers do?"
    )
    _add_check_flags(faithfulness)
    _add_check_flags(sanity)
    faithfulness.add_argument(
        "--blank",
        choices=BLANK_MODES,
        default="mean",
        help="fill a region with the face's mean colour, or blur it (default: mean)",
    )
    faithfulness.set_defaults(run=command_faithfulness)
    sanity.add_argument(
        "--cascade",
        default=",".join(CASCADE[:2]),
        help=f"layers re-initialised, cumulatively in this order (default: fc,layer4; the full "
        f"cascade is {','.join(CASCADE)}); 'changed' = mean rank correlation < {CHANGED_BELOW}",
    )
    sanity.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    sanity.set_defaults(run=command_sanity)


def _add_check_flags(check: argparse.ArgumentParser) -> None:
    """The flags ``faithfulness`` and ``sanity`` share."""
    check.add_argument("dataset", nargs="?", type=Path, help="dataset folder (default: the demo)")
    check.add_argument("--model", type=Path, help="classifier card (default: the dataset's first fold model)")
    _add_methods(check)
    check.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="images of the model's fold (default: test)"
    )
    check.add_argument("--limit", type=int, help="use N faces, evenly spaced over the split")
    check.add_argument(
        "--target",
        choices=("predicted", "true"),
        default="predicted",
        help="class explained and measured (default: the predicted one)",
    )
    _add_regions(check)
    check.add_argument("--parser", type=Path, help="face parser card, for datasets without stored label maps")
    _add_mode(check)
    _add_profile(check)
    check.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="faces per attribution batch")
    check.add_argument("--out", type=Path, help="CSV of the per-method table (a second CSV is written beside it)")
    check.add_argument("--cache", action="store_true", help="memoise attributions on disk")
    _add_device(check)
    check.add_argument("--quiet", action="store_true")


def _add_extract(commands: Subcommands) -> None:
    extract = commands.add_parser(
        "extract",
        help="dataset × fold models × methods -> Parquet score table (resumable through the cache, with progress)",
    )
    extract.add_argument("dataset", nargs="?", type=Path, help="dataset folder (default: the demo dataset)")
    extract.add_argument(
        "--models", help="comma-separated classifier cards (default: <dataset>/models/classifier-fold-*.json)"
    )
    _add_methods(extract)
    extract.add_argument("--folds", help="comma-separated folds: keep the models whose card names one of them")
    extract.add_argument(
        "--split",
        choices=("val", "test", "all"),
        default="val",
        help="each model's own held-out val images (RQ1, default), the test set (RQ2), or all",
    )
    _add_regions(extract)
    _add_mode(extract)
    _add_profile(extract)
    extract.add_argument(
        "--target",
        choices=("predicted", "label"),
        default="predicted",
        help="class to explain: the predicted one (default, the paper) or the true label",
    )
    extract.add_argument(
        "--parser",
        type=Path,
        help="face parser card, for images without a stored label map (default: --landmark-parser)",
    )
    _add_landmark_parser(extract)
    _add_device(extract)
    extract.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="images per batch (default 16)")
    extract.add_argument("--out", type=Path, help="Parquet path (default: <dataset>/results/scores-<split>.parquet)")
    extract.add_argument(
        "--store", type=Path, help="relevance store folder (default: <dataset>/results/relevance/<split>)"
    )
    extract.add_argument(
        "--no-store",
        dest="no_store",
        action="store_true",
        help="keep no relevance maps (re-scoring another region spec then needs a new extraction)",
    )
    extract.add_argument(
        "--no-cache",
        dest="no_cache",
        action="store_true",
        help="do not memoise attributions in XAI_CACHE_DIR (an interrupted run then starts over)",
    )
    extract.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: a pool of Ray actors, one per GPU or --actors CPU actors "
        "(README: Extraction on a Ray cluster)",
    )
    extract.add_argument(
        "--address",
        help="with --engine ray: auto, HOST:PORT or ray://HOST:PORT of the cluster "
        "(default: RAY_ADDRESS, else a Ray instance started here)",
    )
    extract.add_argument(
        "--actors", type=int, help="with --engine ray: actors in the pool (default: one per GPU, else one per CPU)"
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=command_extract)


def _deployment(args: argparse.Namespace):
    """``--deployment FILE``, else ``$XAI_DEPLOYMENT``'s; None in local mode."""
    from core.deployment import deployment_from_environment, read_deployment

    return read_deployment(args.deployment) if args.deployment else deployment_from_environment()


def command_worker(args: argparse.Namespace) -> int:
    import logging
    import signal

    from core.job_queue import JobQueue, run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Stopped as a service is stopped (SIGTERM): the running jobs' processes are killed on the way out, and
    # their half-built versions removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    deployment = _deployment(args)
    # A job's warnings may name photos (those an extraction left out): the server's log policy, in every job.
    warnings_without_data()
    return run_worker(JobQueue.for_deployment(deployment), idle_exit_s=args.idle_exit, prepare=warnings_without_data)


def _add_worker(commands: Subcommands) -> None:
    worker = commands.add_parser(
        "worker",
        help="run the dashboard's extraction jobs: serves the job queue (one worker per queue; README "
        "'Jobs and results in hosted mode')",
    )
    worker.add_argument(
        "--deployment",
        type=Path,
        help="hosted mode: the deployment file (default: $XAI_DEPLOYMENT; unset: local mode's queue beside "
        "the result cache)",
    )
    worker.add_argument(
        "--idle-exit",
        dest="idle_exit",
        type=float,
        help="exit after this many seconds with nothing to do (default: serve until stopped)",
    )
    worker.set_defaults(run=command_worker)


def _add_import_model(commands: Subcommands) -> None:
    imported = commands.add_parser(
        "import-model",
        help="a checkpoint of the authors' train.py (torch.save(model)) -> safetensors + card, running none of it",
        description=(
            "Reads a whole-module checkpoint of the paper's authors (class models.VGGFace2_ResNet.resnet50_adapted) "
            "without importing their code or running anything pickled in it, and writes "
            "classifier-<fold>.safetensors and its card: resnet50-caffe, BGR, 0..255 minus the fold's BGR mean "
            "from their test.py, std 1, 224 px, their twelve classes in their order."
        ),
    )
    imported.add_argument(
        "checkpoint",
        type=Path,
        help="an epoch-NN-test_accuracy-A.pt file, or a fold's folder of them (the highest accuracy in the "
        "names is taken, as their test.py does; the earliest epoch on a tie)",
    )
    imported.add_argument(
        "--fold", choices=[f"fold-{i}" for i in range(1, 6)], help="the model's fold (default: the one the path names)"
    )
    imported.add_argument(
        "--out", type=Path, required=True, help="folder for the weights and card, e.g. <dataset>/models"
    )
    imported.set_defaults(run=command_import_model)


def _add_table2(commands: Subcommands) -> None:
    table2 = commands.add_parser(
        "table2",
        help="Table 2 (per-class precision, recall, F1; accuracy) from a val score table, e.g. of imported models",
    )
    table2.add_argument("scores", type=Path, help="score table of extract --split val (each fold model's val faces)")
    table2.add_argument("--out", type=Path, help="CSV path (default: table2.csv beside the score table)")
    table2.set_defaults(run=command_table2)


def _add_demo(commands: Subcommands) -> None:
    demo = commands.add_parser("demo", help="build the synthetic demo dataset and its models (idempotent)")
    demo.add_argument("--root", type=Path, help="where (default: data/demo, or $XAI_DATA_DIR/demo)")
    _add_device(demo)
    demo.set_defaults(run=command_demo)


def _add_twin(commands: Subcommands) -> None:
    twin = commands.add_parser(
        "twin",
        help="synthetic twin of a real release: one rendered face per row of its partitions.csv, on its landmarks",
    )
    twin.add_argument("release", type=Path, help="the release folder (metadata/partitions.csv, annotations)")
    twin.add_argument("out", type=Path, help="new dataset folder for the twin")
    twin.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    twin.add_argument("--rows", type=int, help="render a slice of N rows, a quarter of them annotated test rows")
    twin.add_argument("--seed", type=int, default=0, help="seed of the persons, photos and sampled phenotypes")
    twin.set_defaults(run=command_twin)


def command_prune_specs(args: argparse.Namespace) -> int:
    from cache.spec_store import SpecStore, default_spec_dir
    from core.layout import DatasetLayout, demo_dataset
    from core.relevance_store import prune_region_masks

    deployment = _deployment(args)
    if deployment is not None:  # hosted: the deployment's spec folder, results and limit
        store = SpecStore(deployment.spec_dir, deployment.limits)
        results = [deployment.results(entry.id) for entry in deployment.datasets]
    else:
        store = SpecStore(default_spec_dir())
        results = [DatasetLayout(root).results for root in (args.dataset or [demo_dataset()])]
    days = store.limits.spec_days if args.days is None else args.days
    if days < 1:
        raise UserFacingError(f"--days must be at least 1, not {days}")
    specs = store.prune(days)
    masks = sum(prune_region_masks(folder, days) for folder in results)
    print(f"pruned {len(specs)} stored spec(s) and {masks} region mask file(s) unused for {days} days")
    return 0


def _add_prune_specs(commands: Subcommands) -> None:
    prune = commands.add_parser(
        "prune-specs",
        help="delete stored region specs and memoised region masks unused for a while (README 'Limits on what "
        "users store'); the spec store also prunes itself daily when a spec is saved",
    )
    prune.add_argument(
        "--deployment",
        type=Path,
        help="hosted mode: the deployment file (default: $XAI_DEPLOYMENT; unset: the local spec store)",
    )
    prune.add_argument(
        "--dataset",
        type=Path,
        action="append",
        help="local mode: a dataset whose results' region masks to prune (repeatable; default: the demo)",
    )
    prune.add_argument(
        "--days", type=int, help="unused for this many days (default: the deployment's spec_days, else 90)"
    )
    prune.set_defaults(run=command_prune_specs)


def _add_rq1(commands: Subcommands) -> None:
    from core.stats import CORRECTIONS, TTESTS

    rq1 = commands.add_parser("rq1", help="RQ1: each syndrome vs the reference, per method and region -> Table 3")
    rq1.add_argument("scores", type=Path, help="score table (Parquet), e.g. <dataset>/results/scores-val.parquet")
    rq1.add_argument("--reference", default="Unaffected", help="label of the reference group (default: Unaffected)")
    rq1.add_argument("--alpha", type=float, default=0.001, help="family-wise alpha per method (default: 0.001)")
    rq1.add_argument(
        "--exclude-out-of-domain",
        action="store_true",
        help="leave out faces their model's out-of-domain guard flagged (default: keep them, as the paper)",
    )
    rq1.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default="bonferroni",
        help="multiple-testing correction over one method's tests (default: bonferroni)",
    )
    rq1.add_argument(
        "--ttest",
        choices=TTESTS,
        default="paper",
        help="paper = pingouin's default (Welch when group sizes differ), student, welch",
    )
    rq1.add_argument(
        "--syndromes",
        help="comma-separated labels to compare, each method's correction family (default: all but the "
        "reference; with --profile paper the released five: 22q11DS, Angelman, KS, NS, WS)",
    )
    _add_profile(rq1)
    rq1.add_argument("--model", help="keep one model's rows (needed when several models scored the same images)")
    rq1.add_argument("--out", type=Path, help="folder for rq1-tests.csv and rq1-table3.csv (default: the table's)")
    rq1.set_defaults(run=command_rq1)


def _add_rq2(commands: Subcommands) -> None:
    rq2 = commands.add_parser("rq2", help="RQ2: Spearman rho between C_i and rater HPO counts -> Table 4, Figure 4")
    rq2.add_argument(
        "scores", type=Path, help="score table (Parquet) of the annotated images, e.g. scores-test.parquet"
    )
    rq2.add_argument(
        "--dataset",
        type=Path,
        help="dataset with metadata/hpo-annotations/ or annotated-hpo-terms/ (default: the table's)",
    )
    rq2.add_argument(
        "--strict",
        action="store_true",
        help="refuse annotated images that partitions.csv does not list (default: leave them out with a warning)",
    )
    rq2.add_argument("--seed", type=int, default=0, help="seed of the t-SNE of Figure 4a")
    _add_profile(rq2)
    rq2.add_argument("--out", type=Path, help="folder for the rq2-*.csv tables (default: the table's)")
    rq2.set_defaults(run=command_rq2)


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "methods", None), str):  # argparse does not convert the default
        args.methods = _methods(args.methods)
    try:
        if hasattr(args, "device"):  # a bad name or a missing GPU: one line, before any work
            args.device = _device(args)
        return args.run(args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
