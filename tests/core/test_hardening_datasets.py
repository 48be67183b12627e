"""Malformed datasets: every problem ends in a DatasetError (or the HPO reader's AnnotationError)
that names the file and, where there is one, the row of partitions.csv; nothing is read from
outside the dataset folder.

Complements tests/test_dataset.py (layout basics, duplicated names, ../ and absolute names, an
image symlinked outside) with what a real, messy dataset adds: photos and label maps that do not
fit their metadata, shrunk and rotated photos, empty cells, annotation files of unknown labels.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from core.align import align_face
from core.dataset import DatasetError, open_dataset, read_photo
from core.errors import UserFacingError
from core.pipeline import ExplainSettings, prepare_face
from core.synth import FaceParams, render_face, sample_face_shape, sample_photo
from tests.core.odd_inputs import png_declaring

PHOTO = 160
LANDMARK_HEADER = "x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"


def rendered(seed: int = 0):
    rng = np.random.default_rng(seed)
    return render_face(FaceParams(sample_face_shape(rng), sample_photo(rng), (), PHOTO))


def png(array: np.ndarray, **options) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, "PNG", **options)
    return buffer.getvalue()


def landmark_cells(points: np.ndarray) -> str:
    return ",".join(f"{v:.3f}" for v in np.asarray(points).ravel())


def make_dataset(
    root: Path,
    rows: list[tuple[str, str, np.ndarray | None]],
    images: dict[str, bytes],
    segmaps: dict[str, bytes] | None = None,
) -> Path:
    """partitions.csv with image_name, label, fold-1 and landmarks (when given) plus the files."""
    (root / "metadata").mkdir(parents=True)
    (root / "images").mkdir()
    with_landmarks = any(points is not None for _, _, points in rows)
    lines = ["image_name,label,fold-1" + ("," + LANDMARK_HEADER if with_landmarks else "")]
    for name, label, points in rows:
        line = f"{name},{label},test"
        if with_landmarks:
            assert points is not None, "give landmarks for every row or for none"
            line += "," + landmark_cells(points)
        lines.append(line)
    (root / "metadata" / "partitions.csv").write_text("\n".join(lines) + "\n")
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    if segmaps:
        (root / "features" / "segmaps").mkdir(parents=True)
        for name, data in segmaps.items():
            (root / "features" / "segmaps" / name).write_bytes(data)
    return root


@pytest.fixture
def face():
    return rendered(0)


def one_photo_dataset(root: Path, face, landmarks=None, segmap: bytes | None = None, image: bytes | None = None):
    points = face.landmarks if landmarks is None else landmarks
    return open_dataset(
        make_dataset(
            root,
            [("WSSlide1.png", "WS", points)],
            {"WSSlide1.png": png(face.image) if image is None else image},
            None if segmap is None else {"WSSlide1.png": segmap},
        )
    )


ROW = r"partitions\.csv: row 2 \('WSSlide1\.png'\)"


# ---------------------------------------------------------------- partitions.csv


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("image_name,label\n", "lists no images"),
        ("image_name,label\na.png,X\nb.png,\n", r"row 3 \('b\.png'\) has an empty label"),
        ("image_name,label\na.png,X\nb.png,  \n", r"row 3 \('b\.png'\) has an empty label"),
        ("image_name,label\n.,X\n", r"row 2 \('\.'\): image names must be plain file names"),
        ("image_name,label\nsub\\a.png,X\n", r"row 2 .*: image names must be plain file names"),
        ("image_name,label\nimages/../../secret.png,X\n", r"row 2 .*: image names must be plain file names"),
        ('image_name,label\n"a\tb.png",X\n', r"row 2 .*: image names must be plain file names"),
        ('image_name,label\n"a\nb.png",X\n', r"row 2 .*: image names must be plain file names"),
        (
            f"image_name,label,{LANDMARK_HEADER}\na.png,X,1,2,3,4,5,6,7,8,9,10\nb.png,X,1,2,3,4,5,,7,8,9,10\n",
            r"row 3 \('b\.png'\) has y3 = None; every row needs all ten landmark numbers",
        ),
        (f"image_name,label,{LANDMARK_HEADER}\na.png,X,1,2,3,4,5,NaN,7,8,9,10\n", r"row 2 \('a\.png'\) has y3 = nan"),
        (f"image_name,label,{LANDMARK_HEADER}\na.png,X,1,2,3,4,5,6,7,8,9,inf\n", r"row 2 \('a\.png'\) has y5 = inf"),
    ],
)
def test_partition_rows_that_cannot_be_used_are_refused_naming_the_row(tmp_path, csv, message):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "partitions.csv").write_text(csv)
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path)


def test_a_name_with_a_nul_byte_is_refused_at_open(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "partitions.csv").write_bytes(b"image_name,label\na\x00.png,X\n")
    with pytest.raises(DatasetError, match="row 2 .*plain file names"):
        open_dataset(tmp_path)


def test_utf16_partitions_say_to_save_as_utf8(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "partitions.csv").write_bytes("image_name,label\na.png,X\n".encode("utf-16"))
    with pytest.raises(DatasetError, match="UTF-16; save it as UTF-8"):
        open_dataset(tmp_path)


# ---------------------------------------------------------------- HPO annotations


HPO_HEADER = "image_name,Hypertelorism,Thick lower lip vermillion"


def annotated_dataset(root: Path, files: dict[str, str]) -> Path:
    root = make_dataset(root, [("WSSlide1.png", "WS", None), ("NSSlide2.png", "NS", None)], {})
    (root / "metadata" / "hpo-annotations").mkdir()
    for label, text in files.items():
        (root / "metadata" / "hpo-annotations" / f"{label}.csv").write_text(text)
    return root


def test_an_annotation_file_of_an_unknown_label_is_refused_at_open(tmp_path):
    root = annotated_dataset(
        tmp_path, {"WS": f"{HPO_HEADER}\nWSSlide1.png,1,0\n", "WHS": f"{HPO_HEADER}\nWHSSlide9.png,0,1\n"}
    )
    with pytest.raises(DatasetError, match=r"WHS\.csv: label 'WHS' is not a class of partitions\.csv"):
        open_dataset(root)


def test_annotation_columns_that_are_not_hpo_terms_are_refused(tmp_path):
    from core.annotations import read_annotations
    from core.hpo import AnnotationError

    root = annotated_dataset(tmp_path, {"WS": "image_name,Hypertelorism,Big ears\nWSSlide1.png,1,0\n"})
    with pytest.raises(AnnotationError, match="column 'Big ears' is not one of the paper's 50 HPO terms"):
        read_annotations(open_dataset(root))
    root = annotated_dataset(tmp_path / "values", {"WS": f"{HPO_HEADER}\nWSSlide1.png,yes,0\n"})
    with pytest.raises(AnnotationError, match=r"row 2 \('WSSlide1\.png'\), column 'Hypertelorism': 'yes'"):
        read_annotations(open_dataset(root))


def test_an_annotated_image_missing_from_partitions_is_left_out_with_a_warning_or_refused_when_strict(tmp_path):
    from core.annotations import UnlistedAnnotationsWarning, read_annotations

    root = annotated_dataset(tmp_path, {"WS": f"{HPO_HEADER}\nWSSlide1.png,1,0\nWSSlide7.png,0,1\n"})
    with pytest.warns(UnlistedAnnotationsWarning, match=r"WSSlide7\.png \(WS\.csv\)"):
        annotations = read_annotations(open_dataset(root))
    assert set(annotations["image_name"]) == {"WSSlide1.png"}
    with pytest.raises(UserFacingError, match="WSSlide7.png"):
        read_annotations(open_dataset(root), strict=True)


def test_an_image_annotated_under_another_label_than_its_own_is_refused(tmp_path):
    from core.annotations import read_annotations

    root = annotated_dataset(tmp_path, {"NS": f"{HPO_HEADER}\nWSSlide1.png,1,0\n"})
    with pytest.raises(UserFacingError, match="WSSlide1.png"):
        read_annotations(open_dataset(root))


# ---------------------------------------------------------------- photos against their metadata


def test_a_good_photo_reads_back_exactly_and_prepares(tmp_path, face):
    dataset = one_photo_dataset(tmp_path, face, segmap=png(face.label_map))
    photo = read_photo(dataset, "WSSlide1.png")
    assert photo.landmarks is not None
    np.testing.assert_array_equal(photo.image, face.image)
    np.testing.assert_allclose(photo.landmarks, face.landmarks, atol=1e-3)
    np.testing.assert_array_equal(photo.label_map, face.label_map)
    prepared = prepare_face(photo, 64, ExplainSettings())
    assert prepared.parse_source == "stored" and all(mask.any() for mask in prepared.masks)


def _one_point_far(points):
    points[4] = (PHOTO + 200, points[4, 1])
    return points


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p + [PHOTO, 0], "None of the five landmarks lies on the 160×160 photo"),
        (lambda p: p * 3, "None of the five landmarks lies on the 160×160 photo"),
        (_one_point_far, r"landmark \(360\.0, \d+\.\d\) lies farther outside the 160×160 photo than the face is wide"),
        (lambda p: p / PHOTO, "eyes are 0.\\d+ pixels apart.*not normalised to 0..1"),
    ],
)
def test_landmarks_that_do_not_fit_the_photo_are_refused_naming_the_row(tmp_path, face, change, message):
    dataset = one_photo_dataset(tmp_path, face, landmarks=change(face.landmarks.copy()))
    with pytest.raises(DatasetError, match=ROW + ": .*" + message):
        read_photo(dataset, "WSSlide1.png")


def test_swapped_x_and_y_on_a_wide_photo_are_refused(tmp_path, face):
    wide = np.zeros((PHOTO, 4 * PHOTO, 3), np.uint8)
    wide[:, 3 * PHOTO :] = face.image
    points = face.landmarks + [3 * PHOTO, 0]
    dataset = one_photo_dataset(tmp_path, face, landmarks=points[:, ::-1], image=png(wide))
    with pytest.raises(DatasetError, match=ROW + ".*None of the five landmarks lies on the 640×160 photo"):
        read_photo(dataset, "WSSlide1.png")


def test_a_face_cut_by_the_border_keeps_its_landmarks(tmp_path, face):
    cut = np.ascontiguousarray(face.image[:, : int(face.landmarks[:, 0].max()) - 2])  # right eye, mouth corner cut off
    dataset = one_photo_dataset(tmp_path, face, image=png(cut))
    photo = read_photo(dataset, "WSSlide1.png")
    assert photo.landmarks is not None
    assert (photo.landmarks[:, 0] > cut.shape[1]).any()
    np.testing.assert_allclose(photo.landmarks, face.landmarks, atol=1e-3)


def test_a_photo_shrunk_on_loading_takes_its_landmarks_and_label_map_along(tmp_path, face):
    """4400 px wide: load_image shrinks it to 4096, so metadata in the file's pixels must shrink too;
    the face aligned from the shrunk photo matches the face aligned from the full one."""
    width, left = 4400, 4100
    full = np.full((PHOTO, width, 3), 120, np.uint8)
    full[:, left : left + PHOTO] = face.image
    full_map = np.zeros((PHOTO, width), np.uint8)
    full_map[:, left : left + PHOTO] = face.label_map
    points = face.landmarks + [left, 0]
    dataset = one_photo_dataset(tmp_path, face, landmarks=points, image=png(full), segmap=png(full_map))
    photo = read_photo(dataset, "WSSlide1.png")
    assert photo.landmarks is not None and photo.label_map is not None
    assert photo.image.shape == (round(PHOTO * 4096 / width), 4096, 3)
    factors = np.array([4096 / width, photo.image.shape[0] / PHOTO])
    np.testing.assert_allclose(photo.landmarks, points * factors, atol=1e-3)
    assert photo.label_map.shape == photo.image.shape[:2]
    assert set(np.unique(photo.label_map)) <= set(np.unique(face.label_map))
    from_shrunk = align_face(photo.image, photo.landmarks, size=64).image.astype(int)
    from_full = align_face(full, points, size=64).image.astype(int)
    assert np.abs(from_shrunk - from_full).mean() < 6  # a misplaced face differs by ~40


def test_an_exif_rotated_photo_keeps_landmarks_in_upright_pixels(tmp_path, face):
    tall = np.full((PHOTO + 60, PHOTO, 3), 120, np.uint8)
    tall[60:] = face.image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: applying the orientation makes it upright again
    stored = png(np.asarray(Image.fromarray(tall).transpose(Image.Transpose.ROTATE_90)), exif=exif)
    points = face.landmarks + [0, 60]
    photo = read_photo(one_photo_dataset(tmp_path, face, landmarks=points, image=stored), "WSSlide1.png")
    assert photo.landmarks is not None
    np.testing.assert_array_equal(photo.image, tall)
    np.testing.assert_allclose(photo.landmarks, points, atol=1e-3)


# ---------------------------------------------------------------- stored label maps


def test_a_label_map_of_another_size_is_refused_naming_row_and_sizes(tmp_path, face):
    dataset = one_photo_dataset(tmp_path, face, segmap=png(face.label_map[:, :100]))
    with pytest.raises(DatasetError, match=ROW + ": the label map WSSlide1.png is 100×160 but the photo is 160×160"):
        read_photo(dataset, "WSSlide1.png")


def test_a_square_label_map_is_taken_as_aligned(tmp_path, face):
    aligned_map = np.zeros((64, 64), np.uint8)
    aligned_map[20:40, 10:50] = 4
    photo = read_photo(one_photo_dataset(tmp_path, face, segmap=png(aligned_map)), "WSSlide1.png")
    np.testing.assert_array_equal(photo.label_map, aligned_map)


def test_a_label_map_bomb_is_refused_from_its_header(tmp_path, face):
    bomb = png_declaring(30000, 30000)
    with pytest.raises(DatasetError, match=ROW + ": cannot read the label map .*exceeds limit"):
        read_photo(one_photo_dataset(tmp_path, face, segmap=bomb), "WSSlide1.png")


def test_a_label_map_that_is_not_lapa_ids_is_refused_naming_the_row(tmp_path, face):
    colour_map = np.repeat(face.label_map[:, :, None], 3, axis=2)
    with pytest.raises(DatasetError, match=ROW + ": .*single-channel image of LaPa ids"):
        read_photo(one_photo_dataset(tmp_path, face, segmap=png(colour_map)), "WSSlide1.png")


def test_a_label_map_symlinked_outside_is_refused(tmp_path, face):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(face.label_map))
    dataset = one_photo_dataset(tmp_path / "ds", face, segmap=png(face.label_map))
    link = dataset.root / "features" / "segmaps" / "WSSlide1.png"
    link.unlink()
    os.symlink(outside, link)
    with pytest.raises(DatasetError, match="label map 'WSSlide1.png' resolves outside"):
        read_photo(dataset, "WSSlide1.png")


# ---------------------------------------------------------------- files that are not what the table says


def test_unreadable_and_escaping_photos_are_refused_naming_the_row(tmp_path, face):
    root = make_dataset(
        tmp_path / "ds",
        [
            ("WSSlide1.png", "WS", None),
            ("WSSlide2.png", "WS", None),
            ("WSSlide3.png", "WS", None),
            ("WSSlide4.png", "WS", None),
        ],
        {"WSSlide1.png": png(face.image)[:300], "WSSlide2.png": b"not a photo"},
    )
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(face.image))
    os.symlink(secret, root / "images" / "WSSlide3.png")
    dataset = open_dataset(root)
    expected = {
        "WSSlide1.png": r"row 2 \('WSSlide1.png'\): the image data is truncated",
        "WSSlide2.png": r"row 3 \('WSSlide2.png'\): not an image",
        "WSSlide3.png": r"row 4 \('WSSlide3.png'\): image 'WSSlide3.png' resolves outside",
        "WSSlide4.png": r"row 5 \('WSSlide4.png'\): image 'WSSlide4.png' is listed in partitions.csv but",
    }
    for name, message in expected.items():
        with pytest.raises(DatasetError, match=message):
            read_photo(dataset, name)


def test_reading_a_dataset_never_opens_files_outside_it(tmp_path, face):
    """Every file the dataset functions open lies inside the dataset folder (checked by auditing opens)."""
    import sys

    root = make_dataset(
        tmp_path / "ds",
        [("WSSlide1.png", "WS", face.landmarks)],
        {"WSSlide1.png": png(face.image)},
        {"WSSlide1.png": png(face.label_map)},
    )
    read_photo(open_dataset(root), "WSSlide1.png")  # lazy imports happen here, not while watching
    opened: list[str] = []
    watching = [True]

    def audit(event, args):  # audit hooks cannot be removed: this one stops recording after the test
        if watching[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(os.path.realpath(args[0]))

    sys.addaudithook(audit)
    try:
        read_photo(open_dataset(root), "WSSlide1.png")
    finally:
        watching[0] = False
    inside = str(root.resolve())
    assert opened and all(path.startswith(inside + os.sep) for path in opened), opened
    assert pl.read_csv(root / "metadata" / "partitions.csv").height == 1
