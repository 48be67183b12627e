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
class DatasetLayout:
    """The paths of one dataset folder; properties name files that may or may not exist yet."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

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

    def score_table(self, split: str) -> Path:
        return self.results / f"scores-{split}.parquet"

    def relevance_store(self, split: str) -> Path:
        """One store per split: a store mirrors one score table."""
        return self.results / "relevance" / split

    def faithfulness_table(self, blank: str, split: str) -> Path:
        return self.results / f"faithfulness-{blank}-{split}.csv"

    def sanity_table(self, split: str) -> Path:
        return self.results / f"sanity-{split}.csv"
