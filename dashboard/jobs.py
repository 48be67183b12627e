"""Long work (a dataset extraction) off the script thread, so no page or session waits for it.

One board per server process; at most one running job per key (e.g. dataset × split), whoever
started it. The work reports progress into its ``Job``; pages poll it from an
``st.fragment(run_every=…)``, which reruns only the fragment until the job ends. The work
function must not call Streamlit: it runs in a plain thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import streamlit as st

from core.errors import UserFacingError

log = logging.getLogger(__name__)


@dataclass
class Job:
    description: str
    done: int = 0
    total: int = 0
    what: str = ""
    error: str | None = None
    finished: bool = False
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def report(self, done: int, total: int, what: str = "") -> None:
        """The ``progress(done, total, what)`` callback core functions take."""
        self.done, self.total, self.what = done, total, what

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.description}: {self.done}/{self.total or '?'} {self.what} ({elapsed:.0f} s"
        if 0 < self.done < self.total:
            text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        return text + ")"


class JobBoard:
    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, key: str, description: str, work: Callable[[Job], None]) -> Job:
        """Start ``work(job)`` in a thread, unless a job with this key is still running (that one is returned)."""
        with self._lock:
            running = self._jobs.get(key)
            if running is not None and not running.finished:
                return running
            job = self._jobs[key] = Job(description)
        threading.Thread(target=self._run, args=(job, work), name=f"job: {description}", daemon=True).start()
        return job

    def get(self, key: str) -> Job | None:
        return self._jobs.get(key)

    def forget(self, key: str) -> None:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.finished:
                del self._jobs[key]

    @staticmethod
    def _run(job: Job, work: Callable[[Job], None]) -> None:
        try:
            work(job)
        except UserFacingError as error:
            job.error = str(error)
        except Exception as error:  # shown to the user as type and message; the log keeps the traceback
            log.exception("job %r failed", job.description)
            job.error = f"{type(error).__name__}: {error}"
        finally:
            job.ended = time.monotonic()
            job.finished = True


@st.cache_resource(show_spinner=False)
def board() -> JobBoard:
    return JobBoard()
