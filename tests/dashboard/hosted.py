"""A real hosted-mode server for the security tests: ``./run.sh host FILE`` on 127.0.0.1 with a deployment file
written here, serving a copy of the tiny dataset by id, signed in through an authenticating proxy's header.

The proxy is played by the tests: a request carrying ``X-Forwarded-Email: viewer@clinic.example`` is what the
proxy sends for a signed-in viewer; no header is a signed-out visitor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dashboard.screenshots import REPO, serve, stop
from tests.dashboard.streamlit_ws import Session
from tests.dashboard.write_recorder import recording_env

DATASET_ID = "tiny"
DATASET_TITLE = "Tiny synthetic faces"
BROKEN_ID = "broken"
HEADER = "X-Forwarded-Email"
VIEWER, ANALYST = "viewer@clinic.example", "analyst@clinic.example"
STRANGER = "stranger@elsewhere.example"  # signed in at the proxy, but the deployment gives them no role
ALLOWED_HOST = "127.0.0.1"
SPEC_REGIONS = 12  # [limits] spec_regions of the test deployment


def deployment_toml(dataset: Path, broken: Path, state: Path) -> str:
    models = sorted((dataset / "models").glob("classifier-fold-*.json"))
    lines = [
        "[server]",
        f'state_dir = "{state}"',
        f'allowed_hosts = ["{ALLOWED_HOST}"]',
        "",
        "[auth]",
        'mode = "proxy"',
        f'proxy_header = "{HEADER}"',
        "",
        "[users]",
        f'"{VIEWER}" = "viewer"',
        f'"{ANALYST}" = "analyst"',
        "",
        "[limits]",
        f"spec_regions = {SPEC_REGIONS}",
        "",
        f"[datasets.{DATASET_ID}]",
        f'title = "{DATASET_TITLE}"',
        f'folder = "{dataset}"',
        "",
        f"[datasets.{DATASET_ID}.models]",
        *(f'{card.stem.removeprefix("classifier-")} = "{card}"' for card in models),
        "",
        # A dataset whose folder is not a dataset and whose model card is missing: its errors name server paths
        # unless the page redacts them.
        f"[datasets.{BROKEN_ID}]",
        f'folder = "{broken}"',
        f"[datasets.{BROKEN_ID}.models]",
        f'm1 = "{broken / "models" / "classifier-m1.json"}"',
    ]
    return "\n".join(lines) + "\n"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def streamlit_pid(root: int) -> int:
    """The process serving the app: ``root`` itself when ``run.sh`` execs Streamlit, else its descendant."""
    pending = [root]
    while pending:
        pid = pending.pop(0)
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streamlit" in command and b"run" in command:
            return pid
        pending.extend(_children(pid))
    raise AssertionError(f"no `streamlit run` process under {root}")


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in KiB (/proc/PID/status): ``VmRSS`` now, ``VmHWM`` its peak."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def reset_peak_memory(pid: int) -> None:
    """Start ``VmHWM`` again from the current RSS (``clear_refs`` 5, Linux 4.0+), so a passing spike shows."""
    (Path("/proc") / str(pid) / "clear_refs").write_text("5")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its content: compare two to see anything written."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass
class Hosted:
    """A running hosted server and what the tests need to know about it (never shown to its visitors)."""

    base: str
    root: Path  # the test's folder: deployment file, dataset copy, state, temp
    dataset: Path
    state: Path
    tmp: Path  # the server's $TMPDIR
    writes: Path  # every file the server opens for writing (tests/dashboard/write_recorder.py)
    pid: int = 0
    secrets: tuple[str, ...] = field(default=())  # server paths and file names no page may show

    def session(self, email: str | None = None, host: str | None = None) -> Session:
        """A websocket session as ``email`` (through the proxy's header), or signed out (None)."""
        return Session(self.base, headers={HEADER: email} if email else {}, host=host)

    def headers(self, email: str | None) -> dict[str, str]:
        return {HEADER: email} if email else {}


@contextlib.contextmanager
def hosted_server(tiny_dataset: Path, root: Path) -> Iterator[Hosted]:
    """``./run.sh host`` on a copy of ``tiny_dataset`` (served as id ``tiny``), state and $TMPDIR under ``root``."""
    dataset, state, tmp = root / "datasets" / "tiny-faces", root / "state", root / "tmp"
    broken = root / "datasets" / "broken-set"
    shutil.copytree(tiny_dataset, dataset)
    (broken / "images").mkdir(parents=True)
    state.mkdir(parents=True)
    tmp.mkdir()
    toml = root / "deployment.toml"
    toml.write_text(deployment_toml(dataset, broken, state), encoding="utf-8")
    names = [path.name for path in (dataset / "images").rglob("*") if path.is_file()]
    secrets = (str(root), str(REPO), str(dataset), str(state), "tiny-faces", "broken-set", "deployment.toml", *names)
    processes: list[subprocess.Popen] = []
    recording, writes = recording_env(root / "recorder")
    env = {
        **recording,
        "TMPDIR": str(tmp),
        # Local mode's knobs, pointed somewhere visible: hosted mode keeps everything under its state folder.
        "XAI_CACHE_DIR": str(root / "local-cache"),
        "XAI_DATA_DIR": str(root / "local-data"),
        "XAI_DATASET": "",
        "XAI_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    # The extraction worker, as the deployment recipe runs it beside the app (deploy/compose.yaml); its writes
    # are not the web server's, so it runs without the recorder.
    worker_log = (root / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "core", "worker", "--deployment", str(toml)],
        cwd=REPO,
        env={**os.environ, **{k: v for k, v in env.items() if k not in recording}},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        with serve(
            {**os.environ, **env},
            timeout=180,
            command=[str(REPO / "run.sh"), "host", str(toml)],
            started=processes.append,
        ) as base:
            yield Hosted(base, root, dataset, state, tmp, writes, streamlit_pid(processes[0].pid), secrets)
    finally:
        stop(worker)
        worker_log.close()
