"""Extraction jobs that cannot harm others: a queue on disk, a worker process, versioned results, an audit log.

The dashboard never extracts in its own threads. It *submits* a ``JobRequest`` to a ``JobQueue`` (SQLite:
``Deployment.jobs_db`` in hosted mode, ``local_jobs_dir()`` in local mode) and polls the queue; a worker
(``python -m core worker``, ``run_worker``) claims queued jobs, at most ``Limits.jobs_running`` at once,
and runs each in a child process of its own (``multiprocessing`` spawn) that loads its own models (a job's
model is never the pages' model, so no page waits behind its lock), runs at a lower CPU priority
(``os.nice``) with ``Limits.job_threads`` torch threads, and reports progress into the queue.

States: queued -> running -> done | failed | cancelled (a queued job may also be cancelled). A person has
at most ``Limits.jobs_per_user`` jobs queued or running; cancelling (by the submitter or an analyst) marks
a queued job cancelled at once and makes the worker kill a running job's process.

Results are versioned (``core.layout``: versions/<split>/<n>/ and a ``current`` pointer): a job builds a
new version in a staging folder that starts as a hard-linked copy of the current one, extracts into it,
checks that it holds every method the current version held (a version never narrows), and only then
renames it into place and replaces the pointer (``os.replace``). A killed or cancelled job leaves only a
staging folder, which the worker removes; readers never see it. Versions beyond ``Limits.result_versions``
are pruned, never the current one.

The audit log (JSON lines) records who submitted, started, cancelled and ended which job: dataset id,
split, methods, relevance mode, profile, times and outcome; no photo content, no file or folder name, no
error text (which may name a file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR, DiskCache
from core.dataset import open_dataset
from core.deployment import Deployment, Limits
from core.errors import UserFacingError
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings
from core.regions import RegionSpec
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import SCORE_SCHEMA, write_score_table

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
ENGINE_ENV, RAY_ADDRESS_ENV = "XAI_EXTRACT_ENGINE", "XAI_RAY_ADDRESS"
DEVICE_ENV = "XAI_DEVICE"
# Local mode: one person, who may queue a job per dataset × split without waiting for the last.
LOCAL_LIMITS = Limits(jobs_running=1, jobs_per_user=8)
NICENESS = 10
_PROGRESS_EVERY_S = 0.5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    submitter TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    split TEXT NOT NULL,
    methods TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    what TEXT NOT NULL DEFAULT '',
    error TEXT,
    submitted REAL NOT NULL,
    started REAL,
    ended REAL,
    pid INTEGER,
    cancel_by TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
"""


class JobError(UserFacingError):
    """A job cannot be submitted or cancelled (a limit, a role, an unwritable queue)."""


class JobCancelled(Exception):
    """Raised inside a job's process when its job was cancelled (or taken from it)."""


def local_jobs_dir() -> Path:
    """Local mode's queue folder: ``jobs/`` beside the result cache (``$XAI_CACHE_DIR/../jobs``, else
    ``<repo>/.cache/jobs``), like the spec store, so each user (and each test) has their own."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).parent / "jobs"


def dataset_token(folder: str | Path) -> str:
    """Local mode's dataset id for the queue and audit log: opaque, so no folder name is logged."""
    return "local-" + hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:10]


def extraction_engine() -> str:
    """``XAI_EXTRACT_ENGINE``: ``local`` (default: the job's own process, CPU or GPU) or ``ray`` (the cluster
    at ``XAI_RAY_ADDRESS``; README, "Extraction on a Ray cluster")."""
    engine = (os.environ.get(ENGINE_ENV) or "local").strip().lower()
    if engine not in ("local", "ray"):
        raise UserFacingError(f"{ENGINE_ENV} must be local or ray, not {engine!r}")
    return engine


# ---------------------------------------------------------------- what a job does


@dataclass(frozen=True)
class JobRequest:
    """Everything a worker needs to run one extraction, as plain data (it travels through SQLite as JSON).

    ``dataset``, ``cards``, ``parser``, ``results_root`` and ``cache_dir`` are server paths: the worker
    reads them, the audit log and the pages never show them (``dataset_id`` names the dataset there)."""

    dataset: str
    dataset_id: str
    split: str
    cards: tuple[str, ...]
    methods: tuple[str, ...]
    params: Mapping[str, Mapping[str, Any]]
    mode: str
    spec: str  # RegionSpec JSON
    profile: str = "project"
    parser: str | None = None  # face parser card
    target: str | int = "predicted"
    batch_size: int = 16
    landmark_parser: str = "landmarks68"
    results_root: str | None = None  # None: the dataset's own results/ (local mode)
    cache_dir: str | None = None  # None: no attribution cache

    @classmethod
    def from_settings(cls, settings: ExplainSettings, **fields: Any) -> JobRequest:
        """A request for ``settings`` (already under their profile); ``fields`` give the rest."""
        return cls(
            methods=tuple(settings.methods),
            params={m: settings.method_params(m) for m in settings.methods},
            mode=settings.mode,
            spec=settings.spec.to_json(),
            target=settings.target,
            batch_size=settings.batch_size,
            landmark_parser=settings.landmark_parser,
            **fields,
        )

    @property
    def key(self) -> str:
        """At most one job per key runs at once: jobs on one dataset × split build on each other's versions."""
        return f"{self.dataset_id} {self.split}"

    def layout(self) -> DatasetLayout:
        return DatasetLayout(Path(self.dataset), None if self.results_root is None else Path(self.results_root))

    def settings(
        self,
        parser=None,
        device: str = "cpu",
        methods: Sequence[str] | None = None,
        params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ExplainSettings:
        """The pipeline's settings of this request (of ``methods``, default its own; ``params`` for methods it
        does not name, e.g. those the current version held)."""
        methods = tuple(self.methods if methods is None else methods)
        every = {**(params or {}), **self.params}
        return ExplainSettings(
            methods=methods,
            params={m: dict(every[m]) for m in methods if m in every},
            mode=self.mode,
            spec=RegionSpec.from_json(self.spec),
            parser=parser,
            target=self.target,
            batch_size=self.batch_size,
            landmark_parser=self.landmark_parser,
            detector_device=device,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobRequest:
        data = json.loads(text)
        return cls(**{**data, "cards": tuple(data["cards"]), "methods": tuple(data["methods"])})


@dataclass(frozen=True)
class Job:
    """One row of the queue, as read."""

    id: int
    key: str
    submitter: str
    dataset_id: str
    split: str
    methods: tuple[str, ...]
    state: str
    done: int
    total: int
    what: str
    error: str | None
    submitted: float
    started: float | None
    ended: float | None
    pid: int | None
    cancel_by: str | None
    request: JobRequest

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def status(self, now: float | None = None) -> str:
        """One line for a progress bar: what, how far, how long."""
        now = time.time() if now is None else now
        if self.state == "queued":
            return f"extraction of split {self.split} queued ({now - self.submitted:.0f} s)"
        elapsed = now - (self.started or now)
        text = f"extracting split {self.split}: {self.done}/{self.total or '?'} {self.what} ({elapsed:.0f} s"
        if 0 < self.done < self.total:
            text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        return text + ")"


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        key=row["key"],
        submitter=row["submitter"],
        dataset_id=row["dataset_id"],
        split=row["split"],
        methods=tuple(json.loads(row["methods"])),
        state=row["state"],
        done=row["done"],
        total=row["total"],
        what=row["what"],
        error=row["error"],
        submitted=row["submitted"],
        started=row["started"],
        ended=row["ended"],
        pid=row["pid"],
        cancel_by=row["cancel_by"],
        request=JobRequest.from_json(row["request"]),
    )


# ---------------------------------------------------------------- the queue


class JobQueue:
    """The queue in one SQLite file (WAL: pages read while the worker writes) and its audit log beside it.

    Every method opens its own connection: the object is a handle to files, safe to make per call, in any
    thread or process. Nothing of it lives in a Streamlit cache, so no client can clear it away."""

    def __init__(self, db: str | Path, audit_log: str | Path, limits: Limits = LOCAL_LIMITS):
        self.db, self.audit_log, self.limits = Path(db), Path(audit_log), limits

    @classmethod
    def for_deployment(cls, deployment: Deployment | None) -> JobQueue:
        """Hosted mode's queue (the deployment's paths and limits), or local mode's (``local_jobs_dir``)."""
        if deployment is not None:
            return cls(deployment.jobs_db, deployment.audit_log, deployment.limits)
        folder = local_jobs_dir()
        return cls(folder / "queue.sqlite", folder / "audit.jsonl", LOCAL_LIMITS)

    @property
    def worker_lock(self) -> Path:
        """Held (flock) by the one worker serving this queue: ``worker_alive`` tries it."""
        return self.db.with_name(self.db.name + ".worker.lock")

    @contextlib.contextmanager
    def _connection(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            self.db.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise JobError(f"the job queue cannot be opened ({type(error).__name__})") from None
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
            if write:
                connection.execute("BEGIN IMMEDIATE")  # one writer at a time: limits are checked and kept together
            yield connection
            if write:
                connection.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            # A full or read-only disk: one clear line, no server path.
            raise JobError(f"the job queue cannot be written or read ({error.__class__.__name__}: {error})") from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    # Reading.
    def get(self, job_id: int) -> Job | None:
        with self._connection() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, key: str | None = None, states: Sequence[str] = STATES) -> list[Job]:
        """Jobs (of ``key``, in ``states``), oldest first."""
        query = f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))})"
        values: list[Any] = list(states)
        if key is not None:
            query += " AND key = ?"
            values.append(key)
        with self._connection() as db:
            return [_job(row) for row in db.execute(query + " ORDER BY id", values)]

    def latest(self, key: str) -> Job | None:
        """The newest job of ``key``: an active one if there is one, else the last that ended."""
        active = self.jobs(key, ACTIVE)
        if active:
            return active[0]
        with self._connection() as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return None if row is None else _job(row)

    def position(self, job: Job) -> int:
        """1 for the next queued job to start, 2 for the one after, …; 0 when not queued."""
        if job.state != "queued":
            return 0
        with self._connection() as db:
            (ahead,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND id < ?", (job.id,)).fetchone()
        return int(ahead) + 1

    # Submitting and cancelling.
    def submit(self, request: JobRequest, submitter: str) -> Job:
        """Queue ``request`` for ``submitter``; the same request already queued or running is returned as it is.

        Raises ``JobError`` when the submitter already has ``Limits.jobs_per_user`` jobs queued or running."""
        text = request.to_json()
        with self._connection(write=True) as db:
            same = db.execute(
                "SELECT * FROM jobs WHERE key = ? AND request = ? AND state IN ('queued', 'running')",
                (request.key, text),
            ).fetchone()
            if same is not None:
                return _job(same)
            (mine,) = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE submitter = ? AND state IN ('queued', 'running')", (submitter,)
            ).fetchone()
            limit = self.limits.jobs_per_user
            if mine >= limit:
                raise JobError(
                    f"you already have {mine} extraction job(s) queued or running, and this service allows "
                    f"{limit} per person; wait for one to end or cancel it"
                )
            cursor = db.execute(
                "INSERT INTO jobs (key, submitter, dataset_id, split, methods, request, state, submitted) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                (
                    request.key,
                    submitter,
                    request.dataset_id,
                    request.split,
                    json.dumps(request.methods),
                    text,
                    time.time(),
                ),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (cursor.lastrowid,)).fetchone()
        job = _job(row)
        self._audit("submitted", job)
        return job

    def cancel(self, job_id: int, by: str, analyst: bool = False) -> Job:
        """Cancel a job: by its submitter, or by an analyst (``analyst``). A queued job ends at once; a
        running one is killed by its worker within a second (its partial version is never published)."""
        with self._connection(write=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"there is no job {job_id}")
            job = _job(row)
            if job.submitter != by and not analyst:
                raise JobError("only the person who submitted a job, or an analyst, may cancel it")
            if not job.active:
                return job
            if job.state == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', ended = ?, cancel_by = ? WHERE id = ?",
                    (time.time(), by, job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_by = ? WHERE id = ?", (by, job_id))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = _job(row)
        self._audit("cancel requested", job, by=by)
        if job.state == "cancelled":
            self._audit("ended", job)
        return job

    # The worker's side.
    def claim(self, pid: int | None = None) -> Job | None:
        """The oldest queued job whose dataset × split has no running job, now running; None when the global
        limit is reached or nothing can start."""
        with self._connection(write=True) as db:
            running = [row["key"] for row in db.execute("SELECT key FROM jobs WHERE state = 'running'")]
            if len(running) >= self.limits.jobs_running:
                return None
            for row in db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id").fetchall():
                if row["key"] not in running:
                    db.execute(
                        "UPDATE jobs SET state = 'running', started = ?, pid = ? WHERE id = ?",
                        (time.time(), pid, row["id"]),
                    )
                    job = _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
                    break
            else:
                return None
        self._audit("started", job)
        return job

    def set_pid(self, job_id: int, pid: int | None) -> None:
        with self._connection(write=True) as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def report(self, job_id: int, done: int, total: int, what: str) -> bool:
        """Record progress; False when the job is no longer running or was cancelled (the job should stop)."""
        with self._connection(write=True) as db:
            db.execute("UPDATE jobs SET done = ?, total = ?, what = ? WHERE id = ?", (done, total, what, job_id))
            row = db.execute("SELECT state, cancel_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["state"] == "running" and row["cancel_by"] is None

    def finish(self, job_id: int, state: str, error: str | None = None) -> Job | None:
        """End a running job (``done``, ``failed`` or ``cancelled``); a job already ended stays as it is."""
        if state not in ("done", "failed", "cancelled"):
            raise ValueError(f"not an end state: {state!r}")
        with self._connection(write=True) as db:
            updated = db.execute(
                "UPDATE jobs SET state = ?, error = ?, ended = ? WHERE id = ? AND state = 'running'",
                (state, error, time.time(), job_id),
            ).rowcount
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = None if row is None else _job(row)
        if updated and job is not None:
            self._audit("ended", job)
        return job

    # The audit log.
    def _audit(self, event: str, job: Job, **more: Any) -> None:
        request = job.request
        line = {
            "time": _iso(time.time()),
            "event": event,
            "job": job.id,
            "who": job.submitter,
            "dataset": job.dataset_id,
            "split": job.split,
            "methods": list(job.methods),
            "mode": request.mode,
            "profile": request.profile,
            "models": len(request.cards),
            **more,
        }
        if event == "ended":
            line |= {
                "outcome": job.state,
                "submitted": _iso(job.submitted),
                "started": None if job.started is None else _iso(job.started),
                "ended": None if job.ended is None else _iso(job.ended),
            }
            if job.cancel_by is not None:
                line["cancelled_by"] = job.cancel_by
        try:
            self.audit_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.audit_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError as error:  # the job still runs; the service's log says the audit line was lost
            log.error("audit line of job %d not written (%s)", job.id, type(error).__name__)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- versioned results


def staging_folder(layout: DatasetLayout, split: str, job_id: int) -> Path:
    """Where job ``job_id`` builds its version; never read by anyone else, removed if the job does not finish."""
    return layout.versions(split) / f".staging-{job_id}"


def stage_version(layout: DatasetLayout, split: str, job_id: int) -> Path:
    """A staging folder holding a copy of the current results. A published version's array files are
    hard-linked: a version is never written again, and the store writes into a file only rows its journal
    does not claim, which no reader of that version reads (manifest and journal are replaced, never edited).
    The unversioned files ``extract`` writes are copied: a later ``extract`` run may write into them."""
    staging = staging_folder(layout, split, job_id)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    current = layout.current_results(split)
    store = layout.version_relevance_store(staging)
    if current.relevance_store.is_dir():
        copy = _link_or_copy if current.version is not None else shutil.copy2
        shutil.copytree(current.relevance_store, store, copy_function=copy, ignore=_no_lock)
    if current.score_table.is_file():
        shutil.copy2(current.score_table, staging / "previous.parquet")
    return staging


def _no_lock(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == ".lock" or n.endswith(".tmp")]


def _link_or_copy(source: str, target: str) -> None:
    if source.endswith((".npy", ".npz")):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def publish_version(layout: DatasetLayout, split: str, staging: Path, keep: int) -> int:
    """Make the finished ``staging`` folder the next version and switch readers to it (one ``os.replace`` of
    the pointer), then prune versions beyond ``keep`` (never the current one). Returns its number."""
    folder = layout.versions(split)
    numbers = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    number = max(numbers, default=0) + 1
    os.rename(staging, layout.version(split, number))
    pointer = layout.current_version_file(split)
    temporary = pointer.with_name(f".current.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="ascii") as handle:
        handle.write(f"{number}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, pointer)
    prune_versions(layout, split, keep)
    return number


def prune_versions(layout: DatasetLayout, split: str, keep: int) -> list[int]:
    """Delete the oldest versions beyond the newest ``keep`` (the current one always stays); the removed."""
    folder = layout.versions(split)
    if not folder.is_dir():
        return []
    current = layout.current_version(split)
    numbers = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True)
    removed = [n for n in numbers[max(keep, 1) :] if n != current]
    for number in removed:
        shutil.rmtree(layout.version(split, number), ignore_errors=True)
    return removed


# ---------------------------------------------------------------- running one job


def run_job(queue: JobQueue, job: Job, threads: int | None = None) -> int:
    """Run a claimed job here (the worker calls this in the job's own process): extract into a new version
    and publish it. Marks the job done, failed or cancelled; returns the published version's number (0 if none).
    """
    request = job.request
    layout = request.layout()
    staging = staging_folder(layout, request.split, job.id)
    last = [0.0]

    def progress(done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if now - last[0] < _PROGRESS_EVERY_S and done < total:
            return
        last[0] = now
        if not queue.report(job.id, done, total, what):
            raise JobCancelled

    try:
        number = _extract_version(request, layout, staging, progress, queue.limits.result_versions, job.id)
    except JobCancelled:
        shutil.rmtree(staging, ignore_errors=True)
        queue.finish(job.id, "cancelled")
        return 0
    except UserFacingError as error:
        shutil.rmtree(staging, ignore_errors=True)
        queue.finish(job.id, "failed", str(error))
        return 0
    except Exception as error:  # shown to its submitter as type and message; the log has the traceback at DEBUG
        # An error's text may name a photo or a server path: the log says at ERROR only which kind it was.
        log.error("job %d failed: %s", job.id, type(error).__name__)
        log.debug("job %d failed", job.id, exc_info=True)
        shutil.rmtree(staging, ignore_errors=True)
        queue.finish(job.id, "failed", f"{type(error).__name__}: {error}")
        return 0
    queue.finish(job.id, "done")
    return number


def _extract_version(
    request: JobRequest, layout: DatasetLayout, staging: Path, progress, keep: int, job_id: int
) -> int:
    from core.devices import resolve_device
    from models.parser import load_face_parser

    device = str(resolve_device(os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV))
    dataset = open_dataset(request.dataset)
    classifiers = load_classifiers(request.cards, device)
    parser = load_face_parser(request.parser, device) if request.parser else None
    cache = DiskCache(request.cache_dir) if request.cache_dir else None
    stage_version(layout, request.split, job_id)
    store_folder = layout.version_relevance_store(staging)
    previous_table = staging / "previous.parquet"
    before: set[str] = set()
    old_params: Mapping[str, Mapping[str, Any]] = {}
    if (store_folder / "manifest.json").is_file():
        old = RelevanceStore(store_folder).contents
        before |= set(old.methods)
        old_params = old.method_params
    if previous_table.is_file():
        before |= set(pl.read_parquet(previous_table, columns=["method"])["method"].unique().to_list())
    plan = ExtractionPlan(dataset, classifiers, request.split)
    fresh: list[pl.DataFrame] = []
    extracted: set[str] = set()
    # First the methods asked for; then any the current version held that the store did not keep (another
    # relevance mode, models or photos change what a store can hold): a version never narrows.
    for methods in (request.methods, None):
        if methods is None:
            held = set(RelevanceStore(store_folder).contents.methods)
            methods = tuple(sorted(before - held))
            if not methods:
                break
        settings = request.settings(parser, device, methods, old_params)
        fresh.append(_extract(plan, settings, cache, RelevanceStore(store_folder), progress))
        extracted |= set(methods)
    store = RelevanceStore(store_folder)
    held = set(store.contents.methods)
    if not before <= held:
        raise UserFacingError(
            f"the new results lack {', '.join(sorted(before - held))}, which the current ones hold; not published"
        )
    kept = [m for m in store.contents.methods if m not in extracted]
    spec = RegionSpec.from_json(request.spec)
    tables = [*fresh, rescore(store, spec, kept)] if kept else fresh
    columns = list(SCORE_SCHEMA)
    table = pl.concat([t.select(columns) for t in tables])
    write_score_table(table, layout.version_score_table(staging))
    previous_table.unlink(missing_ok=True)
    return publish_version(layout, request.split, staging, keep)


def _extract(plan: ExtractionPlan, settings: ExplainSettings, cache, store: RelevanceStore, progress) -> pl.DataFrame:
    if extraction_engine() == "ray":  # only then is Ray imported
        from core.extract_ray import extract_scores_ray

        address = os.environ.get(RAY_ADDRESS_ENV) or None
        return extract_scores_ray(plan, settings, cache, store, progress, address=address)
    return extract_scores(plan, settings, cache=cache, store=store, progress=progress)


def _job_process(
    db: str, audit_log: str, limits: Limits, job_id: int, prepare: Callable[[], None] | None = None
) -> None:
    """The body of a job's own process: ``prepare`` (the front end's log policy: a spawned process starts
    without it), lower priority, bounded threads, then ``run_job``."""
    if prepare is not None:
        prepare()
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    import torch

    torch.set_num_threads(max(1, limits.job_threads))
    queue = JobQueue(db, audit_log, limits)
    job = queue.get(job_id)
    if job is not None and job.state == "running":
        run_job(queue, job)


# ---------------------------------------------------------------- the worker


class Worker:
    """Serves one queue: claims jobs up to the global limit, runs each in its own process, kills cancelled
    ones, and cleans up after a process that died. One worker per queue (``run`` holds its lock)."""

    def __init__(self, queue: JobQueue, prepare: Callable[[], None] | None = None):
        self.queue = queue
        self.prepare = prepare  # run first in each job's process (a module-level function: it is pickled)
        self.children: dict[int, multiprocessing.process.BaseProcess] = {}
        self._context = multiprocessing.get_context("spawn")

    def recover(self) -> None:
        """Jobs left running by a worker that is gone: failed, their staging folders removed."""
        for job in self.queue.jobs(states=("running",)):
            if job.id not in self.children:
                self._discard(job)
                self.queue.finish(job.id, "failed", "the worker stopped while this job ran; submit it again")

    def step(self) -> bool:
        """One round: reap ended processes, kill cancelled ones, start what may start. True while busy."""
        for job_id, process in list(self.children.items()):
            job = self.queue.get(job_id)
            if not process.is_alive():
                process.join()
                del self.children[job_id]
                if job is not None and job.state == "running":  # it died without saying how it ended
                    self._discard(job)
                    if job.cancel_by is not None:
                        self.queue.finish(job_id, "cancelled")
                    else:
                        self.queue.finish(job_id, "failed", f"the job's process ended (exit code {process.exitcode})")
            elif job is None or job.cancel_by is not None or job.state != "running":
                process.kill()
                process.join()
                del self.children[job_id]
                if job is not None:
                    self._discard(job)
                    self.queue.finish(job_id, "cancelled")
        while True:
            job = self.queue.claim()
            if job is None:
                break
            process = self._context.Process(
                target=_job_process,
                args=(str(self.queue.db), str(self.queue.audit_log), self.queue.limits, job.id, self.prepare),
                name=f"extraction job {job.id}",
                daemon=False,
            )
            process.start()
            self.children[job.id] = process
            self.queue.set_pid(job.id, process.pid)
        return bool(self.children) or bool(self.queue.jobs(states=("queued",)))

    def stop(self) -> None:
        """Kill every running job (they fail: nothing of them is published)."""
        for job_id, process in list(self.children.items()):
            process.kill()
            process.join()
            job = self.queue.get(job_id)
            if job is not None:
                self._discard(job)
                self.queue.finish(job_id, "failed", "the worker was stopped while this job ran; submit it again")
        self.children.clear()

    @staticmethod
    def _discard(job: Job) -> None:
        shutil.rmtree(staging_folder(job.request.layout(), job.split, job.id), ignore_errors=True)


LOCK_PATIENCE_S = 2.0  # how long a starting worker waits for the queue's lock (a probe holds it for microseconds)


def worker_alive(queue: JobQueue) -> bool:
    """True when a worker holds this queue's lock."""
    queue.worker_lock.parent.mkdir(parents=True, exist_ok=True)
    with open(queue.worker_lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def run_worker(
    queue: JobQueue, poll_s: float = 0.5, idle_exit_s: float | None = None, prepare: Callable[[], None] | None = None
) -> int:
    """Serve ``queue`` until stopped (or idle for ``idle_exit_s``); returns soon, 0, when another worker
    already serves it. ``prepare`` runs first in every job's process."""
    queue.worker_lock.parent.mkdir(parents=True, exist_ok=True)
    with open(queue.worker_lock, "a") as lock:
        # ``worker_alive`` takes the lock for an instant to probe it: a worker starting at that instant must not
        # take the probe for another worker and leave, so it retries for a while before it gives way.
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.info("another worker serves this queue")
                    return 0
                time.sleep(0.05)
        worker = Worker(queue, prepare)
        worker.recover()
        idle_since = time.monotonic()
        try:
            while True:
                if worker.step():
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    return 0
                time.sleep(poll_s)
        finally:
            worker.stop()
