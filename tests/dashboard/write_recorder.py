"""Record every file a test server opens for writing: an audit hook (``sys.addaudithook``) installed by a
``sitecustomize`` on the server's PYTHONPATH only. It sees Python's ``open``/``os.open`` (which ``tempfile``
uses for the web server's spooled upload parts), SQLite connections and new folders.

The mechanism is helper D's (tests/dashboard/test_privacy.py, issue 13), shared here so the hosted security
tests replay the 3 MB upload with the same proof.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.synth import plan_images
from core.synth.faces import render_face

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


def recording_env(folder: Path) -> tuple[dict[str, str], Path]:
    """The environment that makes a server started with it record its writes, and the log it writes to."""
    hook = folder / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    log = folder / "writes.log"
    log.touch()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])), WRITES_ENV: str(log)}
    return env, log


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
