"""Reading HPO annotation files, on the NIH-Faces release's own files as published and on small
hand-written ones. The reference is a parse with the csv module that follows the authors' notebooks
(term columns are those between image_name and the last, free-text column; 'kX' = k raters)."""

import shutil
import warnings

import polars as pl
import pytest

from core.annotations import UnlistedAnnotationsWarning, load_annotations, read_annotations
from core.hpo import AnnotationError, paper_terms
from core.layout import ANNOTATION_FOLDERS, DatasetLayout
from tests.conftest import RELEASE_UNLISTED as UNLISTED
from tests.conftest import release_hand_parse as hand_parse


def test_the_release_reads_as_published_leaving_out_the_four_unlisted_images_with_one_warning(release_dataset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        annotations = read_annotations(release_dataset)
    notes = [w for w in caught if issubclass(w.category, UnlistedAnnotationsWarning)]
    assert len(notes) == 1
    for name in UNLISTED:
        assert name in str(notes[0].message)
    expected = hand_parse(DatasetLayout(release_dataset).annotations)
    assert len(expected) == 175  # 35 + 36 + 35 + 35 + 34 rows in the five files
    listed = {name: entry for name, entry in expected.items() if name not in UNLISTED}
    assert annotations["image_name"].n_unique() == len(listed) == 171
    assert annotations["rater"].is_null().all()
    read = {(r["image_name"], r["term"]): (r["label"], r["value"]) for r in annotations.iter_rows(named=True)}
    wanted = {(name, term): (label, value) for name, (label, terms) in listed.items() for term, value in terms.items()}
    assert read == wanted  # every term cell of every listed row, free text ignored, nothing else
    assert set(annotations["term"]) <= set(paper_terms()["paper_name"])


def test_strict_refuses_the_first_unlisted_image_naming_file_and_row(release_dataset):
    with pytest.raises(AnnotationError, match=r"22q11DS\.csv: row 5 \('22q11DSSlide150\.png'\) annotates an image"):
        read_annotations(release_dataset, strict=True)  # image_num 3: the file's fifth line


def test_keep_unlisted_keeps_all_175_under_their_files_label(release_dataset):
    read = load_annotations(release_dataset, keep_unlisted=True)
    assert read.table["image_name"].n_unique() == 175 and read.note is not None and "kept" in read.note
    kept = read.table.filter(pl.col("image_name") == "NSSlide6.png")
    marks = hand_parse(DatasetLayout(release_dataset).annotations)["NSSlide6.png"][1]
    assert set(kept["label"]) == {"NS"} and kept["value"].sum() == sum(marks.values()) > 0
    with pytest.raises(ValueError, match="choose one"):
        load_annotations(release_dataset, strict=True, keep_unlisted=True)


def test_both_folder_names_are_read_and_two_different_folders_refused(release_dataset):
    metadata = release_dataset / "metadata"
    release_folder, notebook_folder = metadata / "annotated-hpo-terms", metadata / "hpo-annotations"
    assert ANNOTATION_FOLDERS == ("hpo-annotations", "annotated-hpo-terms")
    assert DatasetLayout(release_dataset).annotations == release_folder
    as_released = load_annotations(release_dataset).table
    notebook_folder.mkdir()  # an empty folder of the other name does not hide the files
    assert DatasetLayout(release_dataset).annotations == release_folder
    assert load_annotations(release_dataset).table.equals(as_released)
    notebook_folder.rmdir()
    shutil.copytree(release_folder, notebook_folder)  # what a user of the authors' notebooks has beside it
    assert DatasetLayout(release_dataset).annotations == notebook_folder
    assert load_annotations(release_dataset).table.equals(as_released)
    shutil.rmtree(release_folder)
    assert load_annotations(release_dataset).table.equals(as_released)
    shutil.copytree(notebook_folder, release_folder)
    (notebook_folder / "WS.csv").write_text((notebook_folder / "WS.csv").read_text().replace("3X", "2X", 1))
    with pytest.raises(AnnotationError, match="both metadata/hpo-annotations/ and metadata/annotated-hpo-terms/"):
        load_annotations(release_dataset)


def test_an_image_listed_under_another_label_is_refused_even_when_not_strict(release_dataset):
    folder = DatasetLayout(release_dataset).annotations
    with (folder / "KS.csv").open("a", encoding="utf-8") as handle:
        handle.write("99,WSSlide95.png" + "," * 14 + "\n")  # a WS image of partitions.csv, under KS
    with pytest.raises(AnnotationError, match=r"KS\.csv: row 37 \('WSSlide95\.png'\) annotates an image labelled 'WS'"):
        read_annotations(release_dataset)


def test_free_text_columns_are_recognised_by_name_and_unknown_columns_refused(release_dataset):
    folder = DatasetLayout(release_dataset).annotations
    path = folder / "NS.csv"
    before = hand_parse(folder)
    text = path.read_text(encoding="utf-8")
    assert "Other prominent dysmorphic features" in text.splitlines()[0]
    # Another spelling of free text, and the release's cells with spaces around (non-breaking too).
    lines = text.splitlines()
    lines[0] = lines[0] + ",OTHER_notes "
    lines[1:] = [line + ",\xa0whatever" for line in lines[1:]]
    fields = lines[2].split(",")
    fields[2] = f" {fields[2]}\xa0" if fields[2] else "\xa0"
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    annotations = load_annotations(release_dataset).table
    ns = annotations.filter(pl.col("label") == "NS")
    for name, (label, terms) in before.items():
        if label == "NS" and name not in UNLISTED:
            got = {r["term"]: r["value"] for r in ns.filter(pl.col("image_name") == name).iter_rows(named=True)}
            assert got == {t: v for t, v in terms.items() if t != "Other prominent dysmorphic features"}
    path.write_text(text.replace("Thickened helices", "Big smile"), encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"NS\.csv: column 'Big smile' is not one of the paper's 50 HPO terms"):
        load_annotations(release_dataset)
