"""Issue 13: the dashboard's server log names no photo, file or dataset path at INFO or above, even when a
warning's text does (photos an extraction left out): that text goes to the log at DEBUG only."""

import logging
import shutil
import sys
import warnings

from core.dataset import names_in, open_dataset
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.pipeline import ExplainSettings
from tests.dashboard.conftest import no_trouble, open_app


def _printed(message: warnings.WarningMessage) -> None:
    """What Python does with a warning nobody catches: print it to stderr."""
    sys.stderr.write(warnings.formatwarning(message.message, message.category, message.filename, message.lineno))


def test_explaining_and_extracting_log_no_photo_name_or_dataset_path_above_debug(
    tiny_dataset, tmp_path, monkeypatch, caplog, capfd
):
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, root)
    dataset = open_dataset(root)
    names = dataset.table["image_name"].to_list()
    split = "val"
    broken = names_in(dataset, dataset.folds[0], split)[0]
    (dataset.layout.images / broken).write_bytes(b"not a picture")  # the extraction leaves it out, with a warning
    monkeypatch.setenv("XAI_DATASET", str(root))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        # As in a server process: every warning printed to stderr (not recorded by pytest), unless the app's
        # policy takes it.
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "_showwarnmsg_impl", _printed)
        app = open_app({"methods": "Gradient"})  # the server's first page: explains a dataset face
        no_trouble(app)
        classifiers = load_classifiers(sorted((root / "models").glob("classifier-fold-1.json")))
        extract_scores(ExtractionPlan(open_dataset(root), classifiers, split), ExplainSettings(methods=("Gradient",)))
    loud = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    printed = capfd.readouterr()
    for text in [*loud, printed.err, printed.out]:
        assert str(root) not in text and str(tmp_path) not in text
        assert [name for name in names if name in text] == []
    quiet = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]
    assert any(broken in text and "left out" in text for text in quiet)  # the warning was raised, at DEBUG
    said = [record for record in caplog.records if record.name == "core.library_warnings"]
    assert any(record.levelno == logging.WARNING for record in said)  # and said at WARNING, without its text
