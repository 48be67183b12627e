"""Page latency of a hosted dashboard under many sessions, without and with an extraction job. Nothing asserted.

    .venv/bin/python bench/hosted_load.py                          # 20 sessions on the demo (python -m core demo)
    .venv/bin/python bench/hosted_load.py --dataset DIR --sessions 5 --rounds 1

Starts ``./run.sh host FILE`` (hosted mode, sign-in played by an authenticating proxy's header) on a deployment
file written to a temporary folder that serves DATASET by id, with its state (caches, specs, job queue,
versioned results) in that folder, so the run leaves the dataset as it was. Then:

1. Warm-up, not measured: one session opens each page once (fills the result cache for the Explain page).
2. ``--sessions`` sessions each open the warm pages ``--rounds`` times: Explain (the first face of the
   dataset, ``--methods``), Statistics (RQ1), HPO correlation (RQ2), each session starting at a different
   page. ``--client browser`` (default): Chromium browser contexts (Playwright on Debian's /usr/bin/chromium,
   one browser); a page's latency runs from navigation to the app settled: its title drawn, the script
   finished (``data-test-script-state`` ``notRunning``) and no running indicator. ``--client ws``: websocket
   clients speaking Streamlit's protocol (``tests/dashboard/streamlit_ws.py``), one thread each; a page's
   latency runs from opening a new session (a page load opens one) to the server's ``script_finished``,
   without the browser's own work, so on a small machine it is the server's share. Either way, a page that
   is not the one asked for (its title: a sign-in page when the proxy header is lost) or that shows an
   exception or error counts as a failure, not a time.
3. The same again while an extraction job runs: ``--job queue`` submits it the way the dashboard's Extract
   button does (a ``JobRequest`` in the deployment's queue) and runs the queue's worker
   (``python -m core worker --deployment FILE``) beside the server; ``--job process`` runs
   ``python -m core extract`` as a separate process instead (its output in the temporary folder). The job is
   started before the sessions and stopped (cancelled or terminated) after them; the table says whether it
   was running throughout.

Prints p50/p95/max per page and condition side by side. The browsers run on the same machine as the server and
the job: on a small machine they compete for the same cores, so read the numbers with the load average printed
beside them. The issue's goal: warm pages within 2 s at p95 with the job running.

Needs the dataset's val and test score tables (``python -m core extract``); ``--prepare`` makes them first
(Gradient and LayerGradCam) in the dataset's own results folder when they are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.layout import DatasetLayout, demo_dataset
from dashboard.screenshots import CHROMIUM, CHROMIUM_ARGS, REPO, serve

DATASET_ID = "bench"
HEADER = "X-Forwarded-Email"
READER = "reader@clinic.example"  # viewer: reads pages
ANALYST = "analyst@clinic.example"  # submits the job
PAGES = {"explain": "", "statistics": "statistics", "hpo": "hpo"}
# Each page's title: a sign-in page (the proxy's header lost) or another page has a different one.
TITLES = {"explain": "Explain a face", "statistics": "Statistics (RQ1)", "hpo": "HPO correlation (RQ2)"}
SETTLED = '[data-testid="stApp"][data-test-script-state="notRunning"]'
PROBLEMS = '[data-testid="stException"], [data-testid="stAlertContentError"]'
JOB_METHODS = "IntegratedGradients,SmoothGrad,DeepLIFT,GuidedGradCam"  # heavy enough to last the measurement


def deployment_toml(dataset: Path, state: Path) -> str:
    models = sorted((dataset / "models").glob("classifier-fold-*.json"))
    lines = [
        "[server]",
        f'state_dir = "{state}"',
        'allowed_hosts = ["127.0.0.1"]',
        "[auth]",
        'mode = "proxy"',
        f'proxy_header = "{HEADER}"',
        "[users]",
        f'"{READER}" = "viewer"',
        f'"{ANALYST}" = "analyst"',
        "[limits]",
        "jobs_running = 1",
        f"[datasets.{DATASET_ID}]",
        'title = "Benchmark dataset"',
        f'folder = "{dataset}"',
        f"[datasets.{DATASET_ID}.models]",
        *(f'{card.stem.removeprefix("classifier-")} = "{card}"' for card in models),
    ]
    return "\n".join(lines) + "\n"


def prepare(dataset: Path, methods: tuple[str, ...]) -> None:
    """Extract the val and test score tables the Statistics and HPO pages read, where missing."""
    from core.dataset import open_dataset
    from core.extract import ExtractionPlan, extract_scores, load_classifiers
    from core.pipeline import ExplainSettings
    from core.relevance_store import RelevanceStore
    from core.score_table import write_score_table

    layout = DatasetLayout(dataset)
    classifiers = load_classifiers(sorted(layout.models.glob("classifier-fold-*.json")))
    for split in ("val", "test"):
        if not layout.score_table(split).is_file():
            table = extract_scores(
                ExtractionPlan(open_dataset(dataset), classifiers, split),
                ExplainSettings(methods=methods),
                store=RelevanceStore(layout.relevance_store(split)),
            )
            write_score_table(table, layout.score_table(split))


@dataclass
class Condition:
    name: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: {page: [] for page in PAGES})
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAGES, 0))
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    job: str = ""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def open_page(page, url: str, title: str, timeout_ms: float) -> tuple[float, bool]:
    """Seconds from navigation until the app settled; False when the page is not the one asked for (its title)
    or shows an exception or error."""
    start = time.perf_counter()
    await page.goto(url, wait_until="commit", timeout=timeout_ms)
    await page.locator("h1").first.wait_for(timeout=timeout_ms)
    await page.wait_for_selector(SETTLED, timeout=timeout_ms)
    await page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)
    elapsed = time.perf_counter() - start
    heading = (await page.locator("h1").first.inner_text()).strip()
    return elapsed, heading.startswith(title) and await page.locator(PROBLEMS).count() == 0


async def session(browser, base: str, query: str, index: int, rounds: int, condition: Condition, timeout_ms: float):
    context = await browser.new_context(extra_http_headers={HEADER: READER}, viewport={"width": 1400, "height": 1000})
    try:
        page = await context.new_page()
        order = list(PAGES)
        order = order[index % len(order) :] + order[: index % len(order)]
        await asyncio.sleep(random.Random(index).uniform(0, 0.5))  # sessions arrive within half a second
        for _ in range(rounds):
            for name in order:
                try:
                    elapsed, clean = await open_page(page, f"{base}/{PAGES[name]}?{query}", TITLES[name], timeout_ms)
                except Exception:  # a timeout: counted, the session goes on
                    condition.failures[name] += 1
                    continue
                if clean:
                    condition.latencies[name].append(elapsed)
                else:
                    condition.failures[name] += 1
    finally:
        await context.close()


async def measure(base: str, query: str, sessions: int, rounds: int, condition: Condition, timeout_s: float) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            start = time.perf_counter()
            await asyncio.gather(
                *(session(browser, base, query, i, rounds, condition, timeout_s * 1000) for i in range(sessions))
            )
            condition.seconds = time.perf_counter() - start
        finally:
            await browser.close()


def ws_session(base: str, query: str, index: int, rounds: int, condition: Condition, timeout_s: float) -> None:
    """One session of websocket clients: a new connection per page load, as a browser tab opens one."""
    from streamlit.proto.Alert_pb2 import Alert

    from tests.dashboard.streamlit_ws import Session

    order = list(PAGES)
    order = order[index % len(order) :] + order[: index % len(order)]
    time.sleep(random.Random(index).uniform(0, 0.5))
    for _ in range(rounds):
        for name in order:
            start = time.perf_counter()
            try:
                with Session(base, headers={HEADER: READER}, timeout=timeout_s) as client:
                    page = client.run(PAGES[name], query)
            except Exception:  # refused, closed or timed out: counted, the session goes on
                condition.failures[name] += 1
                continue
            elapsed = time.perf_counter() - start
            titles = [heading.body for heading in page.of("heading")]
            errors = page.exceptions + [a.body for a in page.of("alert") if a.format == Alert.ERROR]
            if any(title.startswith(TITLES[name]) for title in titles) and not errors:
                condition.latencies[name].append(elapsed)
            else:
                condition.failures[name] += 1


def measure_ws(base: str, query: str, sessions: int, rounds: int, condition: Condition, timeout_s: float) -> None:
    import threading

    threads = [
        threading.Thread(target=ws_session, args=(base, query, i, rounds, condition, timeout_s))
        for i in range(sessions)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    condition.seconds = time.perf_counter() - start


async def warm_up(base: str, query: str, timeout_s: float) -> dict[str, bool]:
    """One session opens every page once; True per page that loaded without a problem."""
    condition = Condition("warm-up")
    await measure(base, query, 1, 1, condition, timeout_s)
    return {page: bool(condition.latencies[page]) for page in PAGES}


class Job:
    """An extraction running beside the server: through the deployment's queue and its worker, or a process."""

    def __init__(self, kind: str, toml: Path, dataset: Path, folder: Path, methods: str):
        self.kind, self.toml, self.dataset, self.folder, self.methods = kind, toml, dataset, folder, methods
        self.process: subprocess.Popen | None = None
        self.job_id: int | None = None

    def start(self) -> None:
        python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
        log = (self.folder / f"job-{self.kind}.log").open("wb")
        if self.kind == "queue":
            from core.deployment import read_deployment
            from core.job_queue import JobQueue, JobRequest
            from core.pipeline import ExplainSettings

            deployment = read_deployment(self.toml)
            entry = deployment.dataset(DATASET_ID)
            # What the Extract button submits in hosted mode: every fold model, results versioned under the
            # deployment's state folder, attributions memoised in its cache.
            request = JobRequest.from_settings(
                ExplainSettings(methods=tuple(self.methods.split(","))),
                dataset=str(entry.folder),
                dataset_id=DATASET_ID,
                split="test",
                cards=tuple(str(card) for card in entry.models.values()),
                parser=None if entry.parser is None else str(entry.parser),
                results_root=str(deployment.results(DATASET_ID)),
                cache_dir=str(deployment.cache_dir),
            )
            self.job_id = JobQueue.for_deployment(deployment).submit(request, ANALYST).id
            command = [python, "-m", "core", "worker", "--deployment", str(self.toml)]
        else:
            command = [
                python, "-m", "core", "extract", str(self.dataset), "--split", "test", "--methods", self.methods,
                "--out", str(self.folder / "job-scores.parquet"), "--no-store", "--no-cache", "--quiet",
            ]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def running(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        if self.kind == "queue":
            from core.deployment import read_deployment
            from core.job_queue import JobQueue

            job = JobQueue.for_deployment(read_deployment(self.toml)).get(self.job_id or 0)
            return job is not None and job.state == "running"
        return True

    def wait_running(self, timeout_s: float = 120) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running():
                return True
            if self.process is not None and self.process.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.kind == "queue" and self.job_id is not None:
            from core.deployment import read_deployment
            from core.job_queue import JobQueue

            with contextlib.suppress(Exception):
                JobQueue.for_deployment(read_deployment(self.toml)).cancel(self.job_id, ANALYST, analyst=True)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def hosted(dataset: Path, folder: Path) -> Iterator[tuple[str, Path]]:
    toml = folder / "deploy.toml"
    toml.write_text(deployment_toml(dataset, folder / "state"), encoding="utf-8")
    with serve(command=["./run.sh", "host", str(toml)], timeout=180) as base:
        yield base, toml


def table(conditions: list[Condition]) -> str:
    """p50/p95/max seconds and failures per page, one block of columns per condition, side by side."""
    columns = f"{'n':>5}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'failed':>8}"
    width = len(columns)
    lines = [
        " " * 12 + "   ".join(f" {condition.name} ".center(width, "-") for condition in conditions),
        "page".ljust(12) + "   ".join(columns for _ in conditions),
    ]
    for page in [*PAGES, "all"]:
        cells = []
        for condition in conditions:
            series = list(condition.latencies.values()) if page == "all" else [condition.latencies[page]]
            values = [value for values in series for value in values]
            failed = sum(condition.failures.values()) if page == "all" else condition.failures[page]
            cells.append(
                f"{len(values):>5}{quantile(values, 0.5):>8.2f}{quantile(values, 0.95):>8.2f}"
                f"{max(values, default=float('nan')):>8.2f}{failed:>8}"
            )
        lines.append(page.ljust(12) + "   ".join(cells))
    for condition in conditions:
        lines.append(
            f"{condition.name}: {condition.seconds:.0f} s, load average {condition.load[0]:.1f} -> "
            f"{condition.load[1]:.1f}{'; ' + condition.job if condition.job else ''}"
        )
    return "\n".join(lines)


def default_job_kind() -> str:
    try:
        from core.job_queue import JobQueue, JobRequest  # noqa: F401
    except ImportError:
        return "process"
    return "queue"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="dataset folder (default: the demo)")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="times each session opens each page")
    parser.add_argument("--methods", default="Gradient,LayerGradCam", help="the Explain page's methods")
    parser.add_argument("--client", choices=("browser", "ws"), default="browser", help="what a session is")
    parser.add_argument("--job", choices=("queue", "process"), help="how the job runs (default: queue if present)")
    parser.add_argument("--job-methods", default=JOB_METHODS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one page may take before it fails")
    parser.add_argument("--prepare", action="store_true", help="extract missing val/test score tables first")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        print(f"error: {CHROMIUM} is missing; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    dataset = (args.dataset or demo_dataset()).resolve()
    methods = tuple(args.methods.split(","))
    if args.prepare:
        prepare(dataset, methods)
    missing = [split for split in ("val", "test") if not DatasetLayout(dataset).score_table(split).is_file()]
    if missing:
        print(f"error: no score table for {', '.join(missing)}; run extract or pass --prepare", file=sys.stderr)
        return 2
    kind = args.job or default_job_kind()
    query = "&".join(f"methods={method}" for method in methods)
    print(
        f"{args.sessions} {args.client} sessions × {args.rounds} rounds × {len(PAGES)} pages; job: {kind} "
        f"({args.job_methods}, split test); {os.cpu_count()} CPUs",
        flush=True,
    )
    conditions = [Condition("without job"), Condition("with job")]
    with tempfile.TemporaryDirectory(prefix="hosted-load-") as scratch, hosted(dataset, Path(scratch)) as (base, toml):
        ready = asyncio.run(warm_up(base, query, args.timeout))
        print(f"warm-up: {ready}", flush=True)
        for condition in conditions:
            job = Job(kind, toml, dataset, Path(scratch), args.job_methods) if condition.name == "with job" else None
            if job is not None:
                job.start()
                condition.job = "job running" if job.wait_running() else "JOB NOT RUNNING at start"
            condition.load = (os.getloadavg()[0], 0.0)
            try:
                if args.client == "ws":
                    measure_ws(base, query, args.sessions, args.rounds, condition, args.timeout)
                else:
                    asyncio.run(measure(base, query, args.sessions, args.rounds, condition, args.timeout))
            finally:
                condition.load = (condition.load[0], os.getloadavg()[0])
                if job is not None:
                    still = job.running()
                    condition.job += ", still running at the end" if still else ", FINISHED before the end"
                    job.stop()
            print(f"{condition.name}: done in {condition.seconds:.0f} s", flush=True)
    print(table(conditions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
