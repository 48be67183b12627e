"""Issue 13, privacy end to end, against a running ``streamlit run`` in a real Chromium: an uploaded photo goes
through the real HTTP upload route and nothing of it is written to disk (nothing at all unless the user opts
in, then only into the upload cache).

The server process records every file it opens for writing through an audit hook (``sys.addaudithook``,
installed by a ``sitecustomize`` on the test server's PYTHONPATH only; ``tests/dashboard/write_recorder.py``,
shared with the hosted security tests): Python's ``open``/``os.open`` (which ``tempfile`` uses for the web
server's spooled upload parts), SQLite connections and new folders.
"""

from pathlib import Path

import pytest

from dashboard.screenshots import CHROMIUM, browser, serve, settled
from tests.dashboard.write_recorder import large_photo, recording_env, written

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


def test_a_3_mb_upload_writes_nothing_unless_opted_in_and_then_only_the_upload_cache(tmp_path):
    photo = large_photo()
    assert len(photo) > 3 * 2**20
    recording, log = recording_env(tmp_path)
    cache = tmp_path / "cache"
    env = {
        **recording,
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
