"""Where things live on disk: the one owner of every path of a dataset, its models and its results.

A dataset folder follows the NIH-Faces layout (README "Data layout"); generated data lives under
``XAI_DATA_DIR`` (default ``data/`` in the checkout). Nobody else joins path pieces, so a new file
is one property here and every reader and writer follows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "XAI_DATA_DIR"
CLASSIFIER_CARDS = "classifier-fold-*.json"
# The HPO annotation folder's names: the authors' notebooks read metadata/hpo-annotations/, their
# published release (Zenodo) unpacks to metadata/annotated-hpo-terms/.
ANNOTATION_FOLDERS = ("hpo-annotations", "annotated-hpo-terms")


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT / "data")


def demo_dataset() -> Path:
    return data_dir() / "demo"


@dataclass(frozen=True)
class CurrentResults:
    """The score table and relevance store of one split that readers use now, resolved once (both from one
    version, so a reader never mixes two); ``version`` is None for the unversioned files ``extract`` writes."""

    score_table: Path
    relevance_store: Path
    version: int | None


@dataclass(frozen=True)
class DatasetLayout:
    """The paths of one dataset folder; properties name files that may or may not exist yet.

    ``results_root``: where extraction jobs write versioned results (hosted mode: the deployment's
    ``results(dataset_id)``, outside the dataset's possibly read-only folder); None: ``results/``.
    """

    root: Path
    results_root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.results_root is not None:
            object.__setattr__(self, "results_root", Path(self.results_root))

    # What the dataset brings.
    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def segmaps(self) -> Path:
        return self.root / "features" / "segmaps"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"

    @property
    def partitions(self) -> Path:
        return self.metadata / "partitions.csv"

    @property
    def annotation_folders(self) -> tuple[Path, ...]:
        """Where a dataset may keep its clinicians' HPO annotations, one CSV per class: the name the
        authors' notebooks (and this project) use, then the NIH-Faces release's own name."""
        return tuple(self.metadata / name for name in ANNOTATION_FOLDERS)

    @property
    def annotations(self) -> Path:
        """The annotation folder: the first of ``annotation_folders`` holding a CSV, else the first that
        exists, else the first (where new annotations are written). ``core.annotations`` refuses a
        dataset holding both with different files (which is meant cannot be told)."""
        folders = self.annotation_folders
        filled = (folder for folder in folders if folder.is_dir() and any(folder.glob("*.csv")))
        return next(filled, next((folder for folder in folders if folder.is_dir()), folders[0]))

    @property
    def ground_truth(self) -> Path:
        """Planted phenotypes: only synthetic datasets have them."""
        return self.metadata / "ground_truth.csv"

    # Models trained on it.
    @property
    def models(self) -> Path:
        return self.root / "models"

    def classifier_cards(self) -> list[Path]:
        """The dataset's fold classifiers, ``models/classifier-fold-*.json``, in fold order."""
        return sorted(self.models.glob(CLASSIFIER_CARDS))

    def classifier_card(self, fold: str) -> Path:
        return self.models / f"classifier-{fold}.json"

    def fold_report(self, fold: str) -> Path:
        """Per-class precision, recall and F1 of a fold's classifier on its val split."""
        return self.models / f"report-{fold}.csv"

    def fold_result(self, fold: str) -> Path:
        return self.models / f"result-{fold}.json"

    @property
    def table2(self) -> Path:
        return self.models / "table2.csv"

    @property
    def parser_card(self) -> Path:
        return self.models / "parser.json"

    @property
    def parser_iou(self) -> Path:
        return self.models / "parser-iou.csv"

    @property
    def parser_encoder(self) -> Path:
        """The face parser's encoder weights, which the demo's classifiers start from."""
        return self.models / "parser-encoder.safetensors"

    @property
    def leaderboard(self) -> Path:
        return self.models / "leaderboard.csv"

    # The synthetic demo's own.
    @property
    def parser_training_faces(self) -> Path:
        """A second synthetic dataset (no person shared) the demo's face parser learns from."""
        return self.root / "external" / "parser-faces"

    @property
    def build_markers(self) -> Path:
        return self.root / ".demo"

    # Results computed from it.
    @property
    def results(self) -> Path:
        return self.root / "results"

    def plain_score_table(self, split: str) -> Path:
        """Where ``python -m core extract`` writes a split's score table by default (unversioned)."""
        return self.results / f"scores-{split}.parquet"

    def plain_relevance_store(self, split: str) -> Path:
        """One store per split: a store mirrors one score table (``extract``'s default, unversioned)."""
        return self.results / "relevance" / split

    def score_table(self, split: str) -> Path:
        """The score table readers use: ``current_results(split).score_table``."""
        return self.current_results(split).score_table

    def relevance_store(self, split: str) -> Path:
        """The relevance store readers use: ``current_results(split).relevance_store``."""
        return self.current_results(split).relevance_store

    # Versioned results, written by extraction jobs (core.job_queue): each finished job is a new folder
    # versions/<split>/<n>/ (scores.parquet, relevance/); the text file versions/<split>/current names the
    # one readers use and is replaced atomically (os.replace) only once a version is complete.
    def versions(self, split: str) -> Path:
        return (self.results_root or self.results) / "versions" / split

    def version(self, split: str, number: int) -> Path:
        return self.versions(split) / str(number)

    def current_version_file(self, split: str) -> Path:
        return self.versions(split) / "current"

    def version_score_table(self, folder: Path) -> Path:
        return folder / "scores.parquet"

    def version_relevance_store(self, folder: Path) -> Path:
        return folder / "relevance"

    def current_version(self, split: str) -> int | None:
        """The version ``current`` names, or None when there is none (or the pointer is unreadable)."""
        try:
            text = self.current_version_file(split).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() and self.version(split, int(text)).is_dir() else None

    def current_results(self, split: str) -> CurrentResults:
        """What readers use for ``split``, resolved once: the current version when there is one and it is newer
        than the unversioned score table ``extract`` wrote (so a later ``extract`` run wins, as it always did),
        else the unversioned files."""
        number = self.current_version(split)
        if number is not None:
            plain = self.plain_score_table(split)
            try:
                newer = plain.stat().st_mtime_ns <= self.current_version_file(split).stat().st_mtime_ns
            except OSError:
                newer = True  # no unversioned table: the version it is
            if newer:
                folder = self.version(split, number)
                return CurrentResults(self.version_score_table(folder), self.version_relevance_store(folder), number)
        return CurrentResults(self.plain_score_table(split), self.plain_relevance_store(split), None)

    def faithfulness_table(self, blank: str, split: str) -> Path:
        return self.results / f"faithfulness-{blank}-{split}.csv"

    def sanity_table(self, split: str) -> Path:
        return self.results / f"sanity-{split}.csv"
