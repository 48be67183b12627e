"""Issue 13: photos and overlays reach the browser at display size (``Limits.display_pixels`` on the long side),
as compressed pictures, never as the full photo."""

import base64
import io
import json

import numpy as np
from PIL import Image

from dashboard import render
from tests.dashboard.conftest import no_trouble, open_app, png_bytes


def _decoded(source: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert source.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source[len(prefix) :]))))


def test_display_size_shrinks_the_long_side_and_moves_points_with_the_picture():
    image = np.zeros((3000, 4000, 3), np.uint8)
    image[1500:1520, 2000:2020] = 255  # a white square whose centre is (2009.5, 1509.5)
    small, points = render.display_size(image, np.array([[2009.5, 1509.5], [-0.5, -0.5]]), limit=1024)
    assert small.shape == (768, 1024, 3) and points is not None
    rows, columns = np.nonzero(small[..., 0] > 127)
    np.testing.assert_allclose(points[0], np.array([columns.mean(), rows.mean()]), atol=0.5)
    np.testing.assert_allclose(points[1], np.array([-0.5, -0.5]))  # the picture's corner stays its corner
    face = np.zeros((224, 224, 3), np.uint8)
    same, kept = render.display_size(face, None, limit=1024)
    assert same is face and kept is None  # never enlarged


def test_a_12_mp_photo_becomes_a_small_png_in_the_figure():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    figure = render.image_figure(photo, np.array([[100.0, 200.0]] * 5), limit=1024)
    shown = _decoded(figure.data[0].source)
    expected = np.asarray(Image.fromarray(photo).resize((1024, 768), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(shown, expected)
    assert figure.data[0].z is None
    # The JSON holds the PNG (noise compresses badly: at most its raw 2.4 MB, base64-encoded), not 36 million
    # numbers (the full photo as a JSON array was about 50 MB).
    assert len(figure.to_json()) < 4 * 1024 * 768


def test_the_explain_page_sends_an_upload_at_display_size(on_tiny):
    from core.synth import plan_images
    from core.synth.faces import render_face

    face = render_face(plan_images(1, seed=5, size=224)[0].params).image
    photo = np.asarray(Image.fromarray(face).resize((1600, 1600), Image.Resampling.BILINEAR))
    app = open_app({"source": "upload", "methods": "Gradient"})
    app.file_uploader(key="upload").upload("face.png", png_bytes(photo), "image/png")
    app.run()
    no_trouble(app)
    figures = [json.loads(chart.proto.spec) for chart in app.get("plotly_chart")]
    pictures = [_decoded(trace["source"]) for figure in figures for trace in figure["data"] if trace["type"] == "image"]
    assert len(pictures) == 4  # photo, aligned face, parts, regions
    assert pictures[0].shape == (1024, 1024, 3)
    assert all(max(picture.shape[:2]) <= 1024 for picture in pictures)
