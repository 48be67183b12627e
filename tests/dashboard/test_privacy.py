"""Issue 13, privacy end to end, against a running ``streamlit run`` in a real Chromium: an uploaded photo goes
through the real HTTP upload route and nothing of it is written to disk (nothing at all unless the user opts
in, then only into the upload cache).

The server process records every file it opens for writing through an audit hook (``sys.addaudithook``,
installed by a ``sitecustomize`` on the test server's PYTHONPATH only): Python's ``open``/``os.open`` (which
``tempfile`` uses for the web server's spooled upload parts), SQLite connections and new folders.
"""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.synth import plan_images
from core.synth.faces import render_face
from dashboard.screenshots import CHROMIUM, browser, serve, settled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]

WRITES_ENV = "XAI_TEST_WRITES"
# Runs at the test server's start-up, before Streamlit is imported. An audit hook must never raise (the
# audited call would fail), and it writes its record through a descriptor opened before it is installed.
RECORDER = """
import os, sys

_log = os.open(os.environ["XAI_TEST_WRITES"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _record(event, args):
    try:
        if event == "open":
            path, _mode, flags = args
            if isinstance(path, int) or not flags & _WRITING:
                return
        elif event in ("sqlite3.connect", "os.mkdir"):
            path = args[0]
        else:
            return
        os.write(_log, (event + " " + os.fsdecode(os.fspath(path)) + "\\n").encode())
    except Exception:
        pass


sys.addaudithook(_record)
os.write(_log, b"recording " + str(os.getpid()).encode() + b"\\n")
"""


def written(log: Path, since: int) -> list[tuple[str, str]]:
    """(event, path) recorded after byte ``since`` of the log; compiled bytecode (``__pycache__``) and
    ``/dev/null`` are not data."""
    lines = log.read_bytes()[since:].decode().splitlines()
    events = [tuple(line.split(" ", 1)) for line in lines]
    return [
        (event, path)
        for event, path in events
        if path != "/dev/null" and "__pycache__" not in Path(path).parts and path != ":memory:"
    ]


def large_photo(side: int = 1400) -> bytes:
    """A synthetic face as a PNG of more than 3 MB (upscaled, with pixel noise so it does not compress)."""
    face = render_face(plan_images(1, seed=5, size=224)[0].params).image
    big = np.asarray(Image.fromarray(face).resize((side, side), Image.Resampling.BILINEAR)).astype(np.int16)
    noisy = np.clip(big + np.random.default_rng(0).integers(-6, 7, big.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_3_mb_upload_writes_nothing_unless_opted_in_and_then_only_the_upload_cache(tmp_path):
    photo = large_photo()
    assert len(photo) > 3 * 2**20
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    log = tmp_path / "writes.log"
    log.touch()
    cache = tmp_path / "cache"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
        WRITES_ENV: str(log),
        "XAI_CACHE_DIR": str(cache / "results"),
        "XAI_DATA_DIR": str(tmp_path / "data"),  # no demo: no model, the page prepares the face only
    }
    with serve(env) as base, browser(tmp_path / "profile") as context:
        page = context.new_page()
        page.goto(f"{base}/?source=upload")
        settled(page)
        assert written(log, 0)[0][0] == "recording", "the recorder is not running"
        start = log.stat().st_size
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            files=[{"name": "patient-0042.png", "mimeType": "image/png", "buffer": photo}]
        )
        page.get_by_text("Aligned face").first.wait_for(timeout=180_000)
        settled(page)
        assert written(log, start) == []  # nothing at all: not the spooled upload, not a cache entry
        start = log.stat().st_size
        page.get_by_text("Cache results of this upload on disk").click()
        page.get_by_text("Aligned face").first.wait_for(timeout=180_000)
        settled(page)
        opted_in = written(log, start)
    assert opted_in, "opting in cached nothing"
    uploads = cache / "uploads"
    outside = [
        (event, path)
        for event, path in opted_in
        if not Path(path).is_relative_to(uploads) and not (event == "os.mkdir" and uploads.is_relative_to(path))
    ]
    assert outside == []  # only the upload cache (and its parent folders, created for it)
    assert any(Path(path).is_relative_to(uploads) for event, path in opted_in if event == "open")
