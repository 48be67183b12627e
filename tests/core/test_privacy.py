"""Privacy with default settings: an uploaded photo stays in memory.

The upload path (core.imageio.load_image(bytes) -> core.explain.explain with cache=None, faces
detected by MTCNN) runs in a fresh interpreter whose home, temporary and cache folders and working
directory are new empty folders. Afterwards those folders are still empty; the repository, /tmp
and the real home folder hold no new or changed file that contains anything of the photo; the
interpreter's own audit log shows no file opened for writing, no folder made, nothing renamed or
deleted; and its DEBUG-level log names nothing of the photo (its bytes, their base64, the
metadata text embedded in it, the upload's file name).

Importing captum imports matplotlib, which writes its font cache under the home folder once: the
only file the run leaves, and none of the photo's (checked: nothing else appears, nothing changes
while the photo is handled).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import tomllib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from core.synth import FaceParams, render_face, sample_face_shape, sample_photo
from models.checkpoint import save_checkpoint
from tests.conftest import REPO, tiny_card, tiny_resnet

_UPLOAD = textwrap.dedent("""
    import json, logging, os, sys, warnings
    from pathlib import Path

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    WATCHED = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.link", "os.symlink",
               "os.truncate", "os.chmod", "shutil.copyfile", "shutil.copytree", "shutil.move", "shutil.rmtree",
               "tempfile.mkstemp", "tempfile.mkdtemp", "sqlite3.connect")
    events = []

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                events.append(f"open {path} {mode} {flags}")
        elif event in WATCHED:
            events.append(f"{event} {args[0] if args else ''}")

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name} {record.levelname} {record.getMessage()}")

    logging.basicConfig(level=logging.DEBUG, handlers=[Keep(level=logging.DEBUG)], force=True)
    logging.captureWarnings(True)
    warnings.simplefilter("always")

    from core.dataset import Photo
    from core.explain import explain
    from core.imageio import load_image
    from core.pipeline import ExplainSettings
    from models.checkpoint import load_classifier

    def files(folders):
        return sorted(str(p) for folder in folders for p in Path(folder).rglob("*"))

    upload = Path(sys.argv[1]).read_bytes()  # the bytes a browser would send; read before watching
    classifier = load_classifier(sys.argv[2])
    fresh = json.loads(sys.argv[3])
    ready = files(fresh)  # what importing the libraries left (matplotlib's font cache, via captum)
    logging.getLogger("privacy-test").debug("canary: DEBUG records are captured")
    sys.addaudithook(audit)
    result = explain(Photo(load_image(upload)), classifier, ExplainSettings(methods=("Gradient", "LRP-EpsilonPlus")),
                     cache=None)
    print(json.dumps({"events": events, "records": records, "ready": ready, "after": files(fresh),
                      "landmarks": len(result.face.landmarks)}))
""")


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime in ns) of every regular file under root, symlinks not followed (a socket such as a
    Ray session's under /tmp has no content to leak, and reading one fails)."""
    files = {}
    for folder, subfolders, names in os.walk(root, onerror=lambda error: None):
        subfolders[:] = [s for s in subfolders if Path(folder, s) not in skip]
        for name in names:
            path = os.path.join(folder, name)
            try:
                status = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(status.st_mode):  # only regular files hold bytes (not another process's sockets)
                files[path] = (status.st_size, status.st_mtime_ns)
    return files


def changed(before: dict, after: dict) -> list[str]:
    return sorted(path for path, stamp in after.items() if before.get(path) != stamp)


def photo_with_secrets(token: str) -> bytes:
    """A face PNG whose metadata (a text chunk and the EXIF description) carries `token`."""
    rng = np.random.default_rng(0)
    face = render_face(FaceParams(sample_face_shape(rng), sample_photo(rng), (), 200)).image
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"patient {token}")
    exif = Image.Exif()
    exif[0x010E] = f"description {token}"
    buffer = BytesIO()
    Image.fromarray(face).save(buffer, "PNG", pnginfo=info, exif=exif)
    return buffer.getvalue()


def fingerprints(token: str, upload_name: str, data: bytes) -> list[bytes]:
    """Byte strings whose presence in a log or file would leak the upload."""
    pixels = np.asarray(Image.open(BytesIO(data)).convert("RGB")).tobytes()
    pieces = [token.encode(), upload_name.encode(), data[100:140], pixels[3000:3040]]
    pieces += [base64.b64encode(data[99:147]), base64.b64encode(pixels[2997:3045]), data[100:120].hex().encode()]
    return pieces


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_uploaded_photo_leaves_no_file_no_cache_entry_and_no_log_trace(tmp_path):
    token = secrets.token_hex(8)
    upload_name = f"upload-{token}.png"
    data = photo_with_secrets(token)
    assert token.encode() in data  # the search below is not vacuous
    fresh = {name: tmp_path / name for name in ("home", "tmp", "cache", "cwd")}
    for folder in fresh.values():
        folder.mkdir()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "upload").write_bytes(data)  # stands in for the browser's request body
    card = tiny_card(("A", "B", "Unaffected"), 64)
    card_path = save_checkpoint(tiny_resnet(num_classes=3), card, inputs, "model")

    watched = {
        "repo": (REPO, (REPO / ".venv",)),
        "tmp": (Path("/tmp"), (tmp_path,)),
        "home": (Path.home(), (REPO / ".venv",)),
    }
    before = {name: snapshot(root, skip) for name, (root, skip) in watched.items()}
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "XAI_"))}
    environment.update(
        HOME=str(fresh["home"]),
        TMPDIR=str(fresh["tmp"]),
        XAI_CACHE_DIR=str(fresh["cache"]),
        PYTHONPATH=str(REPO),
        PYTHONDONTWRITEBYTECODE="1",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _UPLOAD,
            str(inputs / "upload"),
            str(card_path),
            json.dumps([str(f) for f in fresh.values()]),
        ],
        cwd=fresh["cwd"],
        env=environment,
        capture_output=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["landmarks"] == 5  # the photo really went through detection and explanation

    assert report["events"] == [], "the upload path wrote to the file system"
    assert report["after"] == report["ready"], "the upload path left files in the fresh folders"
    for name in ("tmp", "cache", "cwd"):
        assert not any(fresh[name].iterdir()), f"the fresh {name} folder is not empty"
    import_leftovers = [Path(p).relative_to(fresh["home"]).parts for p in report["ready"]]
    assert all(
        parts[0] in (".cache", ".config") and parts[1:2] in ((), ("matplotlib",)) for parts in import_leftovers
    ), import_leftovers

    secrets_in_bytes = fingerprints(token, upload_name, data)
    for name, (root, skip) in watched.items():
        for path in changed(before[name], snapshot(root, skip)):
            try:
                if os.path.getsize(path) > 200 * 2**20:
                    continue
                content = Path(path).read_bytes()
            except FileNotFoundError:  # gone since the snapshot (another process's temporary file): holds nothing
                continue
            leaked = [piece for piece in secrets_in_bytes if piece in content]
            assert not leaked, f"{path} (new or changed in {name}) holds part of the upload"

    logs = "\n".join(report["records"]).encode()
    assert b"canary: DEBUG records are captured" in logs
    leaked = [piece for piece in secrets_in_bytes if piece in logs]
    assert not leaked, f"the DEBUG log holds part of the upload: {leaked}"
    output = done.stdout + done.stderr
    assert not [piece for piece in secrets_in_bytes if piece in output]


def test_streamlit_gathers_no_usage_statistics_and_shows_no_tracebacks():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["browser"]["gatherUsageStats"] is False
    assert config["client"]["showErrorDetails"] in ("none", "type", False)


def test_explain_defaults_to_no_cache():
    import inspect

    from core.explain import explain
    from core.pipeline import prepare_face

    assert inspect.signature(explain).parameters["cache"].default is None
    assert inspect.signature(prepare_face).parameters["cache"].default is None
