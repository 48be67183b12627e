import os

import numpy as np
import pytest

from core.dataset import DatasetError, image_file, label_from_name, landmarks_of, names_in, open_dataset, segmap_file


def write_dataset(root, partitions: str, images=("WSSlide1.png", "NSSlide2.png")):
    (root / "metadata").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "metadata" / "partitions.csv").write_text(partitions)
    for name in images:
        (root / "images" / name).write_bytes(b"x")
    return root


NIH = (
    "image_name,bb_x1,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,score,fold-1,fold-2\n"
    "WSSlide1.png,1,10,20,30,20,20,30,12,40,28,40,0.9,train,val\n"
    "NSSlide2.png,1,11,21,31,21,21,31,13,41,29,41,0.8,val,test\n"
)


def test_the_nih_release_layout_reads_labels_from_names(tmp_path):
    dataset = open_dataset(write_dataset(tmp_path, NIH))
    assert dataset.classes == ("NS", "WS")
    assert dataset.folds == ("fold-1", "fold-2")
    assert names_in(dataset, "fold-1", "train") == ["WSSlide1.png"]
    assert names_in(dataset, "fold-2", "test") == ["NSSlide2.png"]
    landmarks = landmarks_of(dataset, ["NSSlide2.png"])
    assert landmarks is not None
    np.testing.assert_array_equal(landmarks[0], [[11, 21], [31, 21], [21, 31], [13, 41], [29, 41]])
    assert image_file(dataset, "WSSlide1.png").name == "WSSlide1.png"
    assert label_from_name("22q11DSSlide2.png") == "22q11DS"
    assert label_from_name("RSTS1Slide10.jpg") == "RSTS1"


def test_an_explicit_label_column_wins(tmp_path):
    dataset = open_dataset(write_dataset(tmp_path, "image_name,label\nWSSlide1.png,Down\nNSSlide2.png,Down\n"))
    assert dataset.classes == ("Down",)
    assert not dataset.has_landmarks and landmarks_of(dataset, ["WSSlide1.png"]) is None


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("name,label\na.png,X\n", "no image_name column"),
        ("image_name\nphoto1.png\n", "does not start with '<label>Slide<number>'"),
        ("image_name,label\na.png,X\na.png,Y\n", "listed twice: a.png"),
        ("image_name,label\n../secret.png,X\n", "plain file names"),
        ("image_name,label\n/etc/passwd,X\n", "plain file names"),
        ("image_name,label,fold-1\na.png,X,training\n", "row 2 ('a.png') has fold-1 = 'training'"),
        ("image_name,label,x1,y1\na.png,X,1,2\n", "landmark columns incomplete"),
        ("image_name,label,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na.png,X,1,2,3,4,5,6,7,8,9,ten\n", "must be numbers"),
    ],
)
def test_malformed_partitions_are_refused_naming_the_problem(tmp_path, csv, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_dataset(write_dataset(tmp_path, csv))


def test_missing_folder_and_file_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="partitions.csv is missing"):
        open_dataset(tmp_path)


def test_symlinks_out_of_the_dataset_are_refused(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    root = write_dataset(tmp_path / "ds", "image_name,label\nlink.png,X\n", images=())
    os.symlink(outside, root / "images" / "link.png")
    dataset = open_dataset(root)
    with pytest.raises(DatasetError, match="outside"):
        image_file(dataset, "link.png")


def test_segmaps_are_found_by_name_or_png_stem(tmp_path):
    root = write_dataset(tmp_path, "image_name,label\nWSSlide1.jpg,WS\n", images=("WSSlide1.jpg",))
    (root / "features" / "segmaps").mkdir(parents=True)
    dataset = open_dataset(root)
    assert segmap_file(dataset, "WSSlide1.jpg") is None
    (root / "features" / "segmaps" / "WSSlide1.png").write_bytes(b"x")
    segmap = segmap_file(dataset, "WSSlide1.jpg")
    assert segmap is not None and segmap.name == "WSSlide1.png"


def test_the_nih_faces_release_opens_from_its_own_partitions_csv_without_photos(release_dataset):
    """The release's metadata as published (no images/ folder: it only links to the photos) opens for
    metadata-only use; the numbers below are counted from the file with the csv module."""
    import csv
    from collections import Counter

    from core.dataset import label_from_name
    from tests.conftest import RELEASE_UNLISTED, release_hand_parse

    with (release_dataset / "metadata" / "partitions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dataset = open_dataset(release_dataset)
    assert not (release_dataset / "images").exists()
    assert len(dataset.table) == len(rows) == 3544
    assert dataset.classes == tuple(sorted({str(label_from_name(r["image_name"])) for r in rows}))
    assert len(dataset.classes) == 12 and dataset.folds == ("fold-1", "fold-2", "fold-3", "fold-4", "fold-5")
    assert dataset.has_landmarks
    assert Counter(dataset.labels.values()) == Counter(label_from_name(r["image_name"]) for r in rows)
    annotated = set(release_hand_parse(dataset.layout.annotations)) - RELEASE_UNLISTED
    for fold in dataset.folds:
        # The same 171 test images under every fold: exactly the annotated ones partitions.csv lists.
        assert set(names_in(dataset, fold, "test")) == annotated and len(annotated) == 171
        sizes = {split: len(names_in(dataset, fold, split)) for split in ("train", "val", "test")}
        assert sizes == {s: sum(r[fold] == s for r in rows) for s in sizes} and sum(sizes.values()) == 3544
    landmarks = landmarks_of(dataset, [rows[0]["image_name"]])
    assert landmarks is not None
    np.testing.assert_allclose(landmarks[0].ravel(), [float(rows[0][f"{a}{i}"]) for i in range(1, 6) for a in "xy"])
    with pytest.raises(DatasetError, match="does not exist"):
        image_file(dataset, rows[0]["image_name"])  # the photo itself: a clear error, not a crash
