"""Extraction jobs as the pages see them: submitted to the queue on disk, run by a worker process.

The web server never extracts in its own threads. A page submits a ``core.job_queue.JobRequest``
to the queue (hosted mode: the deployment's ``jobs_db``; local mode: ``jobs/`` beside the result
cache) and polls it from an ``st.fragment(run_every=…)``; a worker process (``python -m core
worker``, started here when none serves the queue) runs the job in its own lower-priority process
with its own models and publishes a new result version when it is complete. Nothing of a job lives
in a Streamlit cache, so a ``clear_cache`` message (which any client may send) cannot hide or lose it.
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
import threading
import time

from core.job_queue import Job, JobQueue, worker_alive
from core.layout import REPO_ROOT
from dashboard import hosting

log = logging.getLogger(__name__)

WORKER_IDLE_EXIT_S = 300  # a worker the dashboard started leaves after this long with nothing to do
_RESPAWN_AFTER_S = 30.0  # a worker just started takes a few seconds to import torch and take its lock
_spawned: dict[str, float] = {}  # queue file -> when this server last started a worker for it
_spawn_lock = threading.Lock()


def queue() -> JobQueue:
    """This server's queue (a handle to files: cheap, made per call)."""
    return JobQueue.for_deployment(hosting.deployment())


def who() -> str:
    """The visitor as the queue knows them: the signed-in e-mail in hosted mode, the login name locally."""
    person = hosting.signed_in_person()
    if person is not None:
        return person.email
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def may_cancel(job: Job) -> bool:
    """The submitter, or an analyst (in local mode: the one user)."""
    return job.submitter == who() or hosting.may("analyst")


def ensure_worker(jobs: JobQueue) -> None:
    """Start ``python -m core worker`` when no worker serves ``jobs`` (a hosted deployment may instead run
    the worker as its own service; then this finds it alive and starts nothing)."""
    key = str(jobs.db)
    with _spawn_lock:
        if time.monotonic() - _spawned.get(key, -_RESPAWN_AFTER_S) < _RESPAWN_AFTER_S or worker_alive(jobs):
            return
        _spawned[key] = time.monotonic()
        # The environment carries $XAI_DEPLOYMENT (hosted) or $XAI_CACHE_DIR (local): the worker finds the
        # same queue. Its own session: a page's rerun or a stopped script does not stop its jobs.
        subprocess.Popen(
            [sys.executable, "-m", "core", "worker", "--idle-exit", str(WORKER_IDLE_EXIT_S)],
            cwd=REPO_ROOT,
            env=os.environ.copy(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("started an extraction worker")
