"""The synthetic phenotype faces: determinism, exact labels, local phenotypes, class-blind nuisance."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy.stats import ks_2samp
from skimage.draw import polygon as skimage_polygon

from core.paper_terms import paper_terms
from core.synth import (
    DEFAULT_CLASSES,
    FaceParams,
    PlantedTerm,
    RaterModel,
    SyntheticSpec,
    drawable_phenotypes,
    generate_dataset,
    plan_images,
    render_face,
    sample_face_shape,
    sample_photo,
)
from core.synth.canvas import raster_polygon
from core.synth.dataset import simulate_annotations

EYE_LABELS = {-1: (2, 4), 1: (3, 5)}  # image-left side is the person's right: brow 2, eye 4
REGION_LABELS = {"nose": (6,), "mouth": (7, 8, 9)}


def _random_params(seed: int, size: int = 224, phenotypes=()) -> FaceParams:
    rng = np.random.default_rng(seed)
    return FaceParams(sample_face_shape(rng), sample_photo(rng), phenotypes, size)


def _box(mask: np.ndarray, grow: float, margin: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) around a mask, grown by ``grow`` of its size and ``margin`` px on each side."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    dr, dc = grow * (r1 - r0) + margin, grow * (c1 - c0) + margin
    return int(r0 - dr), int(np.ceil(r1 + dr)), int(c0 - dc), int(np.ceil(c1 + dc))


def _box_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for r0, r1, c0, c1 in boxes:
        mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return mask


def _region_boxes(maps: list[np.ndarray], region: str, grow: float, margin: int):
    """Boxes of a region over several label maps (the face before and after a term)."""
    if region == "eye":
        return [_box(np.any([np.isin(m, EYE_LABELS[side]) for m in maps], axis=0), grow, margin) for side in (-1, 1)]
    mask = np.any([np.isin(m, REGION_LABELS[region]) for m in maps], axis=0)
    if region == "mouth":  # the philtrum above the lips belongs to the mouth's drawing
        nose_bottom = max(np.nonzero(m == 6)[0].max() for m in maps)
        rows, cols = np.nonzero(mask)
        mask = mask.copy()
        mask[nose_bottom : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return [_box(mask, grow, margin)]


def test_scanline_raster_matches_skimage():
    rng = np.random.default_rng(0)
    for _ in range(300):
        polygon = rng.uniform(-5, 45, (rng.integers(3, 14), 2))
        expected = np.zeros((40, 40), bool)
        rr, cc = skimage_polygon(polygon[:, 1], polygon[:, 0], expected.shape)
        expected[rr, cc] = True
        np.testing.assert_array_equal(raster_polygon(polygon, (40, 40)), expected)


def test_render_face_is_pure_and_well_formed():
    params = _random_params(1, phenotypes=(PlantedTerm("HP:0000316", 0.7),))
    image, label_map, landmarks = render_face(params)
    again = render_face(params)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    assert label_map.shape == (224, 224) and label_map.dtype == np.uint8
    assert landmarks.shape == (5, 2)
    assert set(np.unique(label_map)) <= set(range(11))
    assert {1, 2, 3, 4, 5, 6, 7, 9, 10} <= set(np.unique(label_map))
    np.testing.assert_array_equal(image, again.image)
    np.testing.assert_array_equal(label_map, again.label_map)


def test_landmarks_fall_on_their_labels():
    terms = sorted(drawable_phenotypes())
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        chosen = rng.choice(terms, size=rng.integers(0, 4), replace=False)
        planted = tuple(PlantedTerm(str(t), float(rng.uniform(0.3, 1.0))) for t in chosen)
        label_map, landmarks = render_face(_random_params(seed, phenotypes=planted).clean())[1:]
        at = [label_map[int(round(y)), int(round(x))] for x, y in landmarks]
        assert landmarks[0, 0] < landmarks[1, 0] and landmarks[3, 0] < landmarks[4, 0]
        assert at[:3] == [4, 5, 6], (seed, planted, at)
        for x, y in landmarks[3:]:
            near = label_map[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3]
            assert np.isin(near, (7, 8, 9)).any(), (seed, planted)


@pytest.mark.parametrize("hpo_id", sorted(drawable_phenotypes()))
def test_each_phenotype_changes_only_its_own_region(hpo_id):
    region = drawable_phenotypes()[hpo_id].term.region
    for seed in range(4):
        params = _random_params(50 + seed).clean()
        if region == "overall":  # upright, as after alignment: the boxes below are tight only then
            params = replace(params, photo=replace(params.photo, rotation_deg=0.0))
        before = render_face(params)
        after = render_face(replace(params, phenotypes=(PlantedTerm(hpo_id, 1.0),)))
        changed = np.any(before.image != after.image, axis=2)
        assert changed.sum() > 20, "the phenotype must be visible"
        maps = [before.label_map, after.label_map]
        if region == "overall":  # the face outline: nothing inside the eye, nose and mouth boxes moves
            features = [box for r in ("eye", "nose", "mouth") for box in _region_boxes(maps, r, 0.1, 1)]
            assert not (changed & _box_mask(changed.shape, features)).any()
        else:
            allowed = _box_mask(changed.shape, _region_boxes(maps, region, 0.25, 3))
            outside = changed & ~allowed
            assert not outside.any(), f"{hpo_id} changed {outside.sum()} pixels outside the {region} box"


def _assert_alike_across_classes(values_by_label: dict[str, dict[str, list[float]]]) -> None:
    """Two-sample KS of every class against Unaffected, family-wise alpha 0.01 (Bonferroni)."""
    reference = values_by_label.pop("Unaffected")
    tests = [(label, name, values) for label, stats in values_by_label.items() for name, values in stats.items()]
    for label, name, values in tests:
        assert ks_2samp(values, reference[name]).pvalue > 0.01 / len(tests), (label, name)


def test_nuisance_parameters_are_distributed_alike_in_every_class():
    by_label: dict[str, dict[str, list[float]]] = {}
    for image in plan_images(300, seed=5, photos_per_person=1):
        shape, photo = image.params.shape, image.params.photo
        stats = by_label.setdefault(image.label, {})
        for name, value in (
            ("rotation", photo.rotation_deg),
            ("scale", photo.scale),
            ("shift", photo.shift_x + photo.shift_y),
            ("background", float(np.mean(photo.background_rgb))),
            ("blur", photo.blur_sigma),
            ("jpeg", photo.jpeg_quality),
            ("skin tone", float(np.mean(shape.skin_rgb))),
            ("hair", float(np.mean(shape.hair_rgb))),
            ("eye distance", shape.eye_half_distance),  # identity jitter, before phenotypes
            ("mouth width", shape.mouth_half_width),
        ):
            stats.setdefault(name, []).append(value)
    _assert_alike_across_classes(by_label)


@pytest.mark.slow
def test_rendered_nuisance_is_distributed_alike_in_every_class():
    by_label: dict[str, dict[str, list[float]]] = {}
    for image in plan_images(200, seed=6, size=64, photos_per_person=1):
        rendered, label_map, _ = render_face(image.params)
        stats = by_label.setdefault(image.label, {})
        stats.setdefault("skin", []).append(float(np.median(rendered[label_map == 1].mean(axis=1))))
        stats.setdefault("background", []).append(float(rendered[:6, :6].mean()))
        stats.setdefault("hair", []).append(float(np.median(rendered[label_map == 10].mean(axis=1))))
    _assert_alike_across_classes(by_label)


def test_classes_follow_the_brief():
    syndromic = [c for c in DEFAULT_CLASSES if c.terms]
    assert len(syndromic) >= 5 and any(c.label == "Unaffected" and not c.terms for c in DEFAULT_CLASSES)
    single = {c.regions[0] for c in syndromic if len(c.regions) == 1}
    assert {"eye", "nose", "mouth"} <= single
    assert any(len(c.regions) >= 3 for c in syndromic)
    images = plan_images(600, seed=2, photos_per_person=1)
    for syndrome in DEFAULT_CLASSES:
        planted = [i.params.phenotypes for i in images if i.label == syndrome.label]
        assert all(planted) if syndrome.terms else not any(planted)
        for term in syndrome.terms:  # resampling empty draws raises frequencies only a little
            seen = np.mean([any(t.hpo_id == term.hpo_id for t in p) for p in planted])
            assert term.frequency - 0.05 < seen < term.frequency + 0.08, (syndrome.label, term)


def test_drawable_terms_come_from_the_paper_table():
    table = {t.hpo_id: t for t in paper_terms()}
    assert len(table) == 50
    for hpo_id, phenotype in drawable_phenotypes().items():
        assert table[hpo_id] == phenotype.term
    assert {p.term.region for p in drawable_phenotypes().values()} == {"eye", "nose", "mouth", "overall"}


def test_simulated_raters_mostly_agree_with_the_truth():
    raters = RaterModel()
    images = [i for i in plan_images(300, seed=3, photos_per_person=1) if i.params.phenotypes]
    names = [t.hpo_id for t in paper_terms()]
    marked_true = marked = missed_mild = mild = missed_strong = strong = 0
    for image in images:
        marks = simulate_annotations(image, seed=3, raters=raters)
        assert marks.shape == (3, 50) and set(np.unique(marks)) <= {0, 1}
        truth = {t.hpo_id: t.severity for t in image.params.phenotypes}
        for column, hpo_id in enumerate(names):
            if marks[:, column].any():
                marked += 1
                marked_true += hpo_id in truth
            if hpo_id in truth:
                misses = 3 - marks[:, column].sum()
                if truth[hpo_id] < 0.5:
                    mild, missed_mild = mild + 3, missed_mild + misses
                elif truth[hpo_id] > 0.8:
                    strong, missed_strong = strong + 3, missed_strong + misses
    assert marked_true / marked > 0.85
    assert missed_mild / mild > 2 * missed_strong / strong
    assert 0 < missed_strong / strong < 0.15


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    summary = generate_dataset(root, SyntheticSpec(n_per_class=10, seed=11, size=96, photos_per_person=2), workers=1)
    assert summary.images == 70 and summary.persons == 35 and summary.images_per_second > 0
    return root


def test_same_seed_gives_identical_files(tiny_dataset, tmp_path):
    again = tmp_path / "b"
    generate_dataset(again, SyntheticSpec(n_per_class=10, seed=11, size=96, photos_per_person=2), workers=2)
    assert _hashes(tiny_dataset) == _hashes(again)
    other = tmp_path / "c"
    generate_dataset(other, SyntheticSpec(n_per_class=10, seed=12, size=96, photos_per_person=2), workers=1)
    assert _hashes(tiny_dataset)["images/WSSlide1.jpg"] != _hashes(other)["images/WSSlide1.jpg"]


def test_refuses_to_overwrite(tiny_dataset):
    with pytest.raises(FileExistsError):
        generate_dataset(tiny_dataset, SyntheticSpec(n_per_class=1, seed=0, size=64), workers=1)


def test_files_follow_the_nih_faces_layout(tiny_dataset):
    metadata = tiny_dataset / "metadata"
    partitions = pl.read_csv(metadata / "partitions.csv")
    folds = [f"fold-{k}" for k in range(1, 6)]
    points = [f"{axis}{k}" for k in range(1, 6) for axis in "xy"]
    assert partitions.columns == ["image_name", "label", *folds, *points]
    assert set(partitions["label"]) == {c.label for c in DEFAULT_CLASSES}
    assert set(partitions.select(folds).unpivot()["value"]) == {"train", "val", "test"}
    truth = pl.read_csv(metadata / "ground_truth.csv", schema_overrides={"hpo_id": pl.String, "term": pl.String})
    assert truth.columns == ["image_name", "person_id", "label", "hpo_id", "term", "region", "severity"]
    assert set(truth["image_name"]) == set(partitions["image_name"])
    unaffected = truth.filter(pl.col("label") == "Unaffected")
    assert unaffected["hpo_id"].is_null().all() and unaffected["severity"].is_null().all()
    affected = truth.filter(pl.col("label") != "Unaffected")
    assert affected["severity"].is_between(0, 1, closed="right").all()
    assert set(affected["region"]) <= {"eye", "nose", "mouth", "overall"}

    # a person stays in one split per fold; the test persons are the same in every fold
    joined = partitions.join(truth.select("image_name", "person_id").unique(), on="image_name")
    splits_per_person = joined.group_by("person_id").agg([pl.col(f).n_unique() for f in folds])
    assert (splits_per_person.select(folds).to_numpy() == 1).all()
    is_test = [row.count("test") for row in partitions.select(folds).iter_rows()]
    assert set(is_test) == {0, 5}

    # segmaps: one lossless label map per image, as large as the image
    for name in partitions["image_name"]:
        image = Image.open(tiny_dataset / "images" / name)
        label_map = np.asarray(Image.open(tiny_dataset / "features" / "segmaps" / Path(name).with_suffix(".png")))
        assert label_map.dtype == np.uint8 and label_map.shape == image.size[::-1] and label_map.max() <= 10

    # annotations: the syndromic test images, three raters, the paper's 50 term names
    names = [t.name for t in paper_terms()]
    test_images = set(partitions.filter(pl.col("fold-1") == "test")["image_name"])
    annotated = set()
    for syndrome in DEFAULT_CLASSES:
        path = metadata / "hpo-annotations" / f"{syndrome.label}.csv"
        assert path.exists() == bool(syndrome.terms)
        if not syndrome.terms:
            continue
        table = pl.read_csv(path)
        assert table.columns == ["image_name", "rater", *names]
        assert set(table["rater"]) <= {1, 2, 3}
        assert table.select(names).unpivot()["value"].is_in([0, 1]).all()
        assert (table.group_by("image_name").len()["len"] == 3).all()
        annotated |= set(table["image_name"])
    syndromic_test = {n for n in test_images if not n.startswith("Unaffected")}
    assert annotated == syndromic_test and annotated


def test_landmarks_in_partitions_match_the_label_maps(tiny_dataset):
    partitions = pl.read_csv(tiny_dataset / "metadata" / "partitions.csv")
    for row in partitions.iter_rows(named=True):
        label_map = np.asarray(
            Image.open(tiny_dataset / "features" / "segmaps" / Path(row["image_name"]).with_suffix(".png"))
        )
        for k, expected in ((1, 4), (2, 5), (3, 6)):
            assert label_map[int(round(row[f"y{k}"])), int(round(row[f"x{k}"]))] == expected


@pytest.mark.slow
def test_phenotypes_land_in_their_paper_region_after_alignment():
    """Cross-check with the project's own alignment and paper region spec (DESIGN): at least 90%
    of the pixels a term changes lie in its region; an overall term changes almost none of them."""
    from skimage.transform import AffineTransform, warp

    from core.align import align_face
    from core.regions import PAPER_REGIONS, region_masks

    for hpo_id, phenotype in drawable_phenotypes().items():
        changed_total = inside_own = inside_any = 0
        for seed in range(6):
            params = _random_params(900 + seed).clean()
            renders = [render_face(params), render_face(replace(params, phenotypes=(PlantedTerm(hpo_id, 1.0),)))]
            aligned = [align_face(r.image, renders[0].landmarks) for r in renders]  # one warp for both
            to_aligned = AffineTransform(matrix=np.vstack([aligned[0].matrix, [0, 0, 1]]))
            maps = [
                warp(r.label_map, to_aligned.inverse, output_shape=(224, 224), order=0, preserve_range=True)
                for r in renders
            ]
            regions = region_masks(np.stack(maps).astype(np.uint8), PAPER_REGIONS)
            union = regions.masks.any(axis=0)  # before or after, R x H x W
            assert isinstance(union, np.ndarray)
            changed = np.any(aligned[0].image != aligned[1].image, axis=2)
            changed_total += changed.sum()
            inside_any += (changed & union.any(axis=0)).sum()
            if phenotype.term.region in regions.names:
                inside_own += (changed & union[regions.names.index(phenotype.term.region)]).sum()
        if phenotype.term.region == "overall":
            assert inside_any / changed_total < 0.005, (hpo_id, inside_any / changed_total)
        else:
            assert inside_own / changed_total >= 0.9, (hpo_id, inside_own / changed_total)
