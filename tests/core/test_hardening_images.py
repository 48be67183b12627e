"""Every odd photo of the corpus (tests/odd_inputs.py) through load_image -> explain: a result or
a UserFacingError with a specific message, never another exception, never a hang, bounded memory.

The corpus figures (inputs, results, messages, slowest input) are printed at the end of the module.
Cases that reach face detection are marked slow; the rest take milliseconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.dataset import Photo
from core.errors import UserFacingError
from core.explain import Explanation, explain
from core.imageio import load_image
from core.pipeline import ExplainSettings
from models.checkpoint import load_classifier, save_checkpoint
from tests.conftest import REPO, tiny_card, tiny_resnet
from tests.core.odd_inputs import CORPUS, EITHER, MESSAGE, RESULT, OddInput, streamed_png

SIZE = 64  # the tiny classifier's input: a real ResNet, milliseconds per image
PER_INPUT_TIMEOUT_S = 120  # generous: on a loaded 2-core machine the slowest input took about 8 s


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    card = tiny_card(("A", "B", "Unaffected"), SIZE, weights="tiny.safetensors")
    return load_classifier(
        save_checkpoint(tiny_resnet(num_classes=3, seed=4), card, tmp_path_factory.mktemp("model"), "tiny")
    )


@pytest.fixture(scope="module")
def tally(request):
    """Outcome and seconds per input; the figures for the closing note are printed at the end."""
    outcomes: dict[str, tuple[str, float]] = {}
    yield outcomes
    if outcomes:
        slowest = max(outcomes, key=lambda name: outcomes[name][1])
        kinds = [kind for kind, _ in outcomes.values()]
        line = (
            f"odd-input corpus: {len(outcomes)} inputs, {kinds.count(RESULT)} results, "
            f"{kinds.count(MESSAGE)} messages, max {outcomes[slowest][1]:.2f} s per input ({slowest})"
        )
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + line)


def _reaches_detection(case: OddInput) -> bool:
    return case.expect != MESSAGE or "No face" in case.match


def test_the_corpus_is_big_and_varied():
    assert len(CORPUS) >= 200
    assert {c.expect for c in CORPUS} == {RESULT, MESSAGE, EITHER}
    assert sum(c.bomb for c in CORPUS) >= 8


@pytest.mark.timeout(PER_INPUT_TIMEOUT_S)
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if _reaches_detection(c) else []) for c in CORPUS]
)
def test_odd_input_ends_in_a_result_or_a_clear_message(case: OddInput, classifier, tally, tmp_path):
    source = case.build(tmp_path)
    start = time.perf_counter()
    try:
        image = load_image(source)
        result = explain(Photo(image), classifier, ExplainSettings(methods=("Gradient",)))
    except UserFacingError as error:
        tally[case.name] = (MESSAGE, time.perf_counter() - start)
        message = str(error)
        assert case.expect != RESULT, f"expected a result, got the message: {message}"
        assert re.search(case.match, message), f"message {message!r} does not match {case.match!r}"
        assert message.strip() and "Traceback" not in message
        return
    tally[case.name] = (RESULT, time.perf_counter() - start)
    assert case.expect != MESSAGE, f"expected a message matching {case.match!r}, got a result"
    _check_result(case, image, result)


def _check_result(case: OddInput, image: np.ndarray, result: Explanation) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and max(image.shape) <= 4096
    relevance = result.maps["Gradient"]
    assert relevance.shape == (SIZE, SIZE) and np.isfinite(relevance).all()
    assert relevance.min() >= 0 and relevance.max() <= 1
    np.testing.assert_allclose(result.probabilities.sum(), 1, atol=1e-5)
    scores = result.scores["Gradient"]
    empty = [name for name, mask in zip(result.face.region_names, result.face.masks) if not mask.any()]
    assert all(np.isnan(s) == (name in empty) for name, s in zip(result.face.region_names, scores))
    found = [int(m.group(1)) for note in result.face.notes if (m := re.match(r"(\d+) faces found", note))]
    assert (found[0] if found else 1) >= case.faces
    if case.upright is not None:
        upright = case.upright()
        assert image.shape == upright.shape
        assert np.abs(image.astype(int) - upright).mean() < 4  # JPEG loss only; a wrong turn is ~50


# ---------------------------------------------------------------- memory and time of bombs

_MEASURE = textwrap.dedent("""
    import io, json, re, sys, time
    from pathlib import Path
    from PIL import Image
    from core.errors import ImageError
    from core.imageio import load_image
    warm_up = io.BytesIO()
    Image.new("RGB", (2, 2)).save(warm_up, "PNG")
    load_image(warm_up.getvalue())  # Pillow imports its plugins on first use

    def peak_kb():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's)
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

    data = Path(sys.argv[1]).read_bytes()
    before = peak_kb()
    start = time.perf_counter()
    try:
        outcome = list(load_image(data, **json.loads(sys.argv[2])).shape)
    except ImageError as error:
        outcome = str(error)
    seconds = time.perf_counter() - start
    growth = (peak_kb() - before) * 1024
    print(json.dumps({"outcome": outcome, "seconds": seconds, "growth": growth}))
""")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """MTCNN with two OpenMP threads on a busy 2-core machine spin-waits 10-20× longer (measured);
    the outcomes do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _measure(files: dict[str, bytes], folder: Path, **load_options) -> list[dict]:
    """load_image on each file in a fresh interpreter that imports only Pillow and numpy, so the
    growth of its peak resident memory is the decoding's and nothing else's."""
    folder.mkdir()
    measured = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(folder / name), json.dumps(load_options)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        measured.append({"name": name, **json.loads(done.stdout)})
    return measured


# Bound, decided from measurement: a refused bomb costs only its header (measured < 2 MB); a real
# image within the pixel budget costs at most 12 bytes per pixel at the peak (measured 2.2 for
# 1-bit, 3.4 for 16-bit grey, 5.6 for RGB and 9.6 for RGBA, whose resize premultiplies alpha at
# full size). With the default budget of 50 megapixels that is at most 600 MB.
REFUSED_BOMB_MAX_GROWTH = 16 * 2**20
BYTES_PER_PIXEL_BOUND = 12


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_decompression_bombs_are_refused_from_the_header_for_almost_no_memory(tmp_path):
    bombs: dict[str, bytes] = {}
    for case in CORPUS:
        if case.bomb:
            data = case.build(tmp_path)
            assert isinstance(data, bytes), f"{case.name} builds a path, not bytes"
            bombs[case.name] = data
    measured = _measure(bombs, tmp_path / "bombs")
    assert len(measured) == len(bombs) >= 8
    for row in measured:
        assert isinstance(row["outcome"], str), f"{row['name']} decoded to {row['outcome']}"
        assert row["growth"] <= REFUSED_BOMB_MAX_GROWTH, row
    total = sum(row["growth"] for row in measured)
    print(
        f"\n{len(measured)} bombs refused, peak growth {total / 2**20:.1f} MB in all, "
        f"max {max(r['seconds'] for r in measured):.3f} s"
    )


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_images_within_the_budget_decode_in_bounded_memory(tmp_path):
    """One-colour PNGs of 10 megapixels (files of a few kB) with a 10-megapixel budget and 1024-pixel
    cap: each decodes, shrunk, within BYTES_PER_PIXEL_BOUND bytes per pixel."""
    side = 3162  # 9.998 megapixels
    kinds = {"1bit": (1, 0), "grey16": (16, 0), "rgb": (8, 2), "rgba": (8, 6)}
    files = {kind: streamed_png(side, side, depth, colour) for kind, (depth, colour) in kinds.items()}
    measured = _measure(files, tmp_path / "real", max_pixels=10_000_000, max_side=1024)
    for row in measured:
        assert row["outcome"] == [1024, 1024, 3], row
        assert row["growth"] <= BYTES_PER_PIXEL_BOUND * side * side, row
    print("\n" + ", ".join(f"{r['name']}: {r['growth'] / side**2:.1f} B/px {r['seconds']:.2f} s" for r in measured))


def test_pixel_budget_counts_declared_pixels_not_file_bytes():
    """A 10 kB file holding 7200×7200 real pixels is refused; the same bytes with a larger budget are
    decoded (so the refusal is the budget's, not a decoding failure)."""
    data = streamed_png(7200, 7200, 1, 0, 255)
    assert len(data) < 20_000
    with pytest.raises(UserFacingError, match="declared size 7200×7200 exceeds the limit of 50,000,000 pixels"):
        load_image(data)
    assert load_image(data, max_pixels=52_000_000, max_side=512).shape == (512, 512, 3)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_photos_are_shrunk_before_rescaling_with_the_full_range(mode):
    """A 600×20 ramp with one outlier shrunk to 300 wide: the range comes from the full image (the
    outlier sets it even though shrinking averages it away), the values from 2×2 box means."""
    values = np.tile(np.linspace(0, 30000, 600), (20, 1)) / (30000 if mode == "F" else 1)
    # I and F: an outlier outside the nominal range (0..65535, 0..1), so the samples' own range applies.
    top = {"I;16": 65535.0, "I": 131070.0, "F": 2.0}[mode]
    values[0, 0] = top
    array = values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, "PNG" if mode == "I;16" else "TIFF")
    loaded = load_image(buffer.getvalue(), max_side=300)
    assert loaded.shape == (10, 300, 3)
    boxes = array.astype(np.float64).reshape(10, 2, 300, 2).mean(axis=(1, 3))
    expected = np.clip(np.round(boxes * 255 / top), 0, 255)
    assert np.abs(loaded[:, :, 0].astype(int) - expected).max() <= 1
