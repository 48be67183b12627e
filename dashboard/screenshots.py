"""Screenshots of every page on the demo data, taken in a real headless Chromium.

    .venv/bin/python dashboard/screenshots.py [--dataset data/demo] [--out docs/screenshots]

Starts ``streamlit run dashboard/app.py`` on a free local port, opens each page in Debian's
Chromium (``apt-get install chromium``) through Playwright, waits until the script has finished,
and saves a full-page PNG. ``serve`` and ``browser`` are shared with ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "dashboard" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGES = {"explain": "", "regions": "regions", "statistics": "statistics", "hpo": "hpo"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    command: Sequence[str] | None = None,
    started: Callable[[subprocess.Popen], None] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """``streamlit run`` on 127.0.0.1 and a free port; yields the base URL, stops the server afterwards.

    ``command``: what starts Streamlit instead of ``python -m streamlit run dashboard/app.py`` (e.g. ``./run.sh
    host FILE``); the options below are appended to it. ``started`` is given the process once it runs. ``port``:
    this one rather than any free one (an OIDC redirect URI must name it before the server starts)."""
    port = port or free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in the finally below, after the server stops
    server = subprocess.Popen(
        [
            *(command or (sys.executable, "-m", "streamlit", "run", str(APP))),
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited with {server.returncode}: {log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as answer:
                    if answer.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer on {base} within {timeout:.0f} s")
            time.sleep(0.5)
        if started is not None:
            started(server)
        yield base
    finally:
        stop(server)
        log.close()


def stop(process: subprocess.Popen) -> None:
    """Ask a server process to stop (SIGTERM), and kill it if it has not within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def browser(profile: Path, width: int = 1600, height: int = 1100, headers: dict[str, str] | None = None):
    """A fresh Chromium (empty profile folder) as a Playwright browser context; ``headers`` go with every request
    (e.g. the e-mail header an authenticating proxy sets)."""
    from playwright.sync_api import sync_playwright

    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            extra_http_headers=headers,
        )
        try:
            yield context
        finally:
            context.close()


def settled(page, timeout: float = 180_000) -> None:
    """Wait until the app has connected and its script has finished running."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout)
    page.wait_for_timeout(500)  # charts and images render just after the script ends
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="dataset folder (default: the demo)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--query", default="", help="extra query string for every page, e.g. 'methods=Gradient'")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        print(f"error: {CHROMIUM} is missing; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    env = {"XAI_DATASET": str(args.dataset.resolve())} if args.dataset else {}
    args.out.mkdir(parents=True, exist_ok=True)
    with serve(env) as base, tempfile.TemporaryDirectory() as profile, browser(Path(profile)) as context:
        page = context.new_page()
        for name, path in PAGES.items():
            page.goto(f"{base}/{path}?{args.query}")
            settled(page)
            # The app scrolls inside its own containers, so a "full page" shot is only the window: grow the window
            # to the content's height instead (capped to keep the PNG reasonable).
            height = page.evaluate("""Math.max(...['stMain', 'stSidebarContent'].map(id =>
                document.querySelector(`[data-testid="${id}"]`)?.scrollHeight ?? 0))""")
            page.set_viewport_size({"width": 1600, "height": min(max(height, 1100), 6000)})
            settled(page)
            target = args.out / f"{name}.png"
            page.screenshot(path=str(target))
            print(f"{target} ({page.locator('h1').first.inner_text()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
