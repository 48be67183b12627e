"""The dashboard's extraction jobs (issue 13): on disk, in a worker process, visible after a cleared cache."""

import shutil
import time

import polars as pl
import pytest
import streamlit as st

from core.job_queue import Job, JobQueue, local_jobs_dir, worker_alive
from core.layout import DatasetLayout
from core.relevance_store import RelevanceStore
from dashboard import jobs
from tests.dashboard.conftest import no_trouble, open_app

STATISTICS = "views/statistics.py"


@pytest.fixture(autouse=True)
def short_lived_workers(monkeypatch):
    """The workers these tests make the dashboard start leave soon after their last job."""
    monkeypatch.setattr(jobs, "WORKER_IDLE_EXIT_S", 20)


def local_queue() -> JobQueue:
    folder = local_jobs_dir()
    return JobQueue(folder / "queue.sqlite", folder / "audit.jsonl")


def get(queue: JobQueue, job_id: int) -> Job:
    job = queue.get(job_id)
    assert job is not None
    return job


@pytest.mark.slow
def test_clear_cache_during_a_job_leaves_it_visible_and_running(tiny_dataset, tmp_path):
    """Streamlit's clear_cache message (any client may send it) empties every st.cache_*; the job lives on disk."""
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, root)
    app = open_app({"dataset": str(root), "methods": "Gradient"}, page=STATISTICS)
    no_trouble(app)
    app.button(key="extract-val").click().run()
    no_trouble(app)
    [job] = local_queue().jobs()
    assert job.active and job.methods == ("Gradient",) and job.split == "val"
    assert app.get("progress"), "the page shows the job"
    deadline = time.monotonic() + 120
    while not worker_alive(local_queue()) and time.monotonic() < deadline:  # a worker process, not a thread
        time.sleep(0.5)
    assert worker_alive(local_queue())

    st.cache_data.clear()  # what Streamlit runs for a clear_cache message
    st.cache_resource.clear()
    app.run()
    no_trouble(app)
    assert get(local_queue(), job.id).active and app.get("progress"), "still listed and shown after clear_cache"
    deadline = time.monotonic() + 600
    while not app.dataframe and time.monotonic() < deadline:
        assert not app.exception and not app.error
        time.sleep(1)
        app.run()
    no_trouble(app)
    assert get(local_queue(), job.id).state == "done"
    current = DatasetLayout(root).current_results("val")
    assert current.version == 1 and RelevanceStore(current.relevance_store).complete
    assert pl.read_parquet(current.score_table)["method"].unique().to_list() == ["Gradient"]


def test_the_page_shows_a_queued_job_with_its_place_and_cancels_it(tiny_dataset, tmp_path, monkeypatch):
    """Without a worker (none may start here) a submitted job waits in the queue: the page shows its place and
    the submitter's Cancel button, which ends it; the results pages read stay as they were (none)."""
    monkeypatch.setattr(jobs, "ensure_worker", lambda queue: None)
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, root)
    app = open_app({"dataset": str(root), "methods": "Gradient"}, page=STATISTICS)
    app.button(key="extract-val").click().run()
    no_trouble(app)
    [job] = local_queue().jobs()
    [bar] = app.get("progress")
    assert "queued" in bar.proto.text and "next to start" in bar.proto.text and jobs.who() in bar.proto.text
    app.button(key=f"cancel-job-{job.id}").click().run()
    no_trouble(app)
    assert get(local_queue(), job.id).state == "cancelled"
    assert not app.get("progress") and app.button(key="extract-val")  # offered again
    assert DatasetLayout(root).current_results("val").version is None
