"""The dashboard through Streamlit's AppTest: pages load, compose core calls, and show bad input as messages.

The shared fixtures and helpers are in ``tests/dashboard/conftest.py``.
"""

import numpy as np
import polars as pl
import pytest

from core.dataset import names_in, open_dataset
from tests.dashboard.conftest import no_trouble, open_app, plain, png_bytes


def test_explain_opens_on_a_held_out_dataset_face_with_prediction_maps_scores_and_reading(on_tiny):
    app = open_app()
    no_trouble(app)
    test_names = names_in(open_dataset(on_tiny), "fold-1", "test")
    assert app.selectbox(key="image").value == test_names[0]
    assert app.sidebar.selectbox(key="model").value == "classifier-fold-1"
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert any(i.value.startswith("Predicted ") and "methods" in i.value for i in app.info)  # the reading
    assert len(app.get("plotly_chart")) == 6  # photo, aligned, parts, regions, probabilities, region scores
    assert "(stored)" in " ".join(m.value for m in app.markdown)  # no parser: the dataset's label maps


def test_explain_shows_the_terms_raters_annotated_on_a_dataset_image(on_tiny):
    annotations = pl.read_csv(next((on_tiny / "metadata" / "hpo-annotations").glob("*.csv")))
    name = annotations["image_name"][0]
    fold = "fold-1"
    split = open_dataset(on_tiny).table.filter(pl.col("image_name") == name)[fold][0]
    app = open_app({"split": split, "image": name, "methods": "Gradient"})
    no_trouble(app)
    assert app.selectbox(key="image").value == name
    assert any(plain(m.value).startswith(f"**Terms the raters annotated on {name}**") for m in app.markdown)


def test_target_class_and_methods_come_from_the_url(on_tiny):
    app = open_app({"methods": ["Gradient", "LayerGradCam"], "target": "KS", "mode": "signed"})
    no_trouble(app)
    assert app.sidebar.multiselect(key="methods").value == ["Gradient", "LayerGradCam"]
    assert any(h.value.endswith("explaining KS") for h in app.subheader)
    assert [i.caption for i in app.get("imgs")] or len(app.get("image")) >= 2


def test_an_upload_is_explained_and_not_written_to_disk(on_tiny, tmp_path):
    from core.synth import plan_images
    from core.synth.faces import render_face

    face = render_face(plan_images(1, seed=5, size=160)[0].params).image
    app = open_app({"source": "upload", "methods": "Gradient"})
    no_trouble(app)
    assert any("Upload a frontal face photo" in i.value for i in app.info)
    app.file_uploader(key="upload").upload("face.png", png_bytes(face), "image/png")
    app.run()
    no_trouble(app)
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    cache = tmp_path / "cache" / "results"
    assert not cache.exists() or not any(p.name.endswith(".val") for p in cache.rglob("*"))


def test_an_upload_cut_through_an_eye_is_explained_with_an_alignment_warning(on_tiny):
    """Issue 14: MTCNN guesses the hidden half of a cut face; the page says the alignment is likely wrong."""
    from skimage import data

    app = open_app({"source": "upload", "methods": "Gradient"})
    app.file_uploader(key="upload").upload("cut.png", png_bytes(data.astronaut()[:, 215:]), "image/png")
    app.run()
    no_trouble(app)
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert any(w.value.startswith("The alignment is likely wrong") for w in app.warning)


def test_an_upload_that_is_not_an_image_or_has_no_face_is_a_message(on_tiny):
    app = open_app({"source": "upload", "methods": "Gradient"})
    app.file_uploader(key="upload").upload("notes.png", b"this is not a picture", "image/png")
    app.run()
    assert not app.exception
    assert app.error and "image" in app.error[0].value.lower()
    app.file_uploader(key="upload").clear().upload(
        "grey.png", png_bytes(np.full((120, 120, 3), 128, np.uint8)), "image/png"
    )
    app.run()
    assert not app.exception
    assert app.error and "face" in app.error[0].value.lower()


def test_a_wrong_model_card_is_a_message_not_a_traceback(on_tiny, tmp_path):
    bad = tmp_path / "card.json"
    bad.write_text("{not json")
    app = open_app({"model": "other card", "card": str(bad)})
    assert not app.exception
    assert any("not valid JSON" in e.value for e in app.error)


def test_without_a_model_alignment_parts_and_regions_are_shown(on_tiny):
    app = open_app({"model": "other card", "source": "sample photo"})
    no_trouble(app)
    assert any("No classifier model card" in w.value for w in app.warning)
    assert len(app.get("plotly_chart")) == 4


def test_a_dataset_path_that_does_not_exist_is_a_message_and_the_sample_photo_still_works(tmp_path):
    app = open_app({"dataset": str(tmp_path / "nowhere"), "model": "other card"})
    assert not app.exception
    assert any("does not exist" in e.value for e in app.sidebar.error)
    assert app.radio(key="source").options == ["sample photo", "upload"]


def test_a_folder_that_is_not_a_dataset_is_a_message(tmp_path):
    (tmp_path / "folder").mkdir()
    app = open_app({"dataset": str(tmp_path / "folder")})
    assert not app.exception
    assert any("partitions.csv is missing" in plain(e.value) for e in app.sidebar.error)


def test_a_dataset_photo_over_4096_px_is_shown_with_its_landmarks_and_label_map(tmp_path, monkeypatch):
    """A face at the right end of a 4400 px wide photo, landmarks and label map in the file's pixels:
    the photo is shrunk to 4096 px on loading, so both must shrink with it (unscaled, the landmarks fall
    off the shrunk photo and the map fits neither photo nor face: an error on both pages)."""
    from core.synth import plan_images
    from core.synth.faces import render_face

    face = render_face(plan_images(1, seed=5, size=160)[0].params)
    width, left = 4400, 4100
    photo = np.full((160, width, 3), 120, np.uint8)
    photo[:, left : left + 160] = face.image
    label_map = np.zeros((160, width), np.uint8)
    label_map[:, left : left + 160] = face.label_map
    root = tmp_path / "wide"
    for folder in ("images", "metadata", "features/segmaps"):
        (root / folder).mkdir(parents=True)
    (root / "images" / "WSSlide1.png").write_bytes(png_bytes(photo))
    (root / "features" / "segmaps" / "WSSlide1.png").write_bytes(png_bytes(label_map))
    (root / "metadata" / "partitions.csv").write_text(
        "image_name,label,fold-1,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n"
        "WSSlide1.png,WS,test," + ",".join(f"{v:.4f}" for v in (face.landmarks + [left, 0]).ravel()) + "\n"
    )
    monkeypatch.setenv("XAI_DATASET", str(root))
    app = open_app()
    no_trouble(app)
    assert app.selectbox(key="image").value == "WSSlide1.png"
    assert any(m.value == "**Face parts** (stored)" for m in app.markdown)
    app = open_app(page="views/regions.py")
    no_trouble(app)
    assert [plain(shown.caption) for image in app.get("image") for shown in image.proto.imgs] == ["WSSlide1.png"]


def test_cached_annotations_are_read_again_when_partitions_csv_changes(tmp_path):
    """read_annotations checks each annotated image's label in partitions.csv, so relabelling an image
    there must not be answered from the cache."""
    import os

    from core.hpo import AnnotationError
    from dashboard import resources

    (tmp_path / "metadata" / "hpo-annotations").mkdir(parents=True)
    partitions = tmp_path / "metadata" / "partitions.csv"
    partitions.write_text("image_name,label\na.jpg,WS\nb.jpg,WS\nk.jpg,KS\n")
    (tmp_path / "metadata" / "hpo-annotations" / "WS.csv").write_text("image_name,Wide mouth\na.jpg,1\nb.jpg,0\n")
    assert resources.annotations(open_dataset(tmp_path))["image_name"].to_list() == ["a.jpg", "b.jpg"]
    partitions.write_text("image_name,label\na.jpg,KS\nb.jpg,WS\nk.jpg,KS\n")
    os.utime(partitions, (partitions.stat().st_atime, partitions.stat().st_mtime + 10))
    with pytest.raises(AnnotationError, match="a.jpg"):
        resources.annotations(open_dataset(tmp_path))


@pytest.mark.slow
def test_explain_page_opens_on_a_demo_face_with_the_demo_models(tmp_path, monkeypatch):
    from core.demo import build_demo
    from tests.conftest import TINY

    build_demo(tmp_path / "data" / "demo", TINY, log=lambda line: None)
    app = open_app()
    assert not app.exception, app.exception
    assert app.radio(key="source").value == "dataset image"
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert any("(stored)" in m.value for m in app.markdown)  # the one label-map rule: the demo's own maps win


def test_explain_shows_the_domain_check_beside_the_prediction_and_warns_past_the_threshold(
    tiny_dataset, tmp_path, monkeypatch
):
    """Issue 14, with planted guards: class means 1000 away in every feature flag the face; a huge
    threshold passes it; no guard says there is none."""
    import shutil

    from core.domain import DomainGuard
    from models.checkpoint import load_classifier
    from models.domain_guard import save_domain_guard

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    monkeypatch.setenv("XAI_DATASET", str(root))
    app = open_app({"methods": "Gradient"})
    no_trouble(app)
    assert any(c.value.startswith("Out-of-domain check: none") for c in app.caption)
    card = root / "models" / "classifier-fold-1.json"
    fingerprint = load_classifier(card).fingerprint
    for threshold, flagged in ((1.0, True), (1e12, False)):
        guard = DomainGuard(np.full((1, 512), 1e3), np.eye(512), threshold=threshold, fingerprint=fingerprint)
        save_domain_guard(guard, card)
        app = open_app({"methods": "Gradient"})
        no_trouble(app)
        warned = any(
            w.value.startswith("**This photo is unlike the faces the model was trained on**") for w in app.warning
        )
        assert warned is flagged
        assert any(c.value.startswith("Out-of-domain check: domain score") for c in app.caption) is not flagged
